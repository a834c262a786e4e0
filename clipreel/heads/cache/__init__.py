"""Heads trained from the feature cache: EVL, X-CLIP MIT and prompts, text prompts, baselines, zero-shot."""
