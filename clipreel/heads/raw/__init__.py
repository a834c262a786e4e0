"""Methods that run (and fine-tune or prompt) the CLIP itself on raw frames: ViFi-CLIP, bridge-and-prompt, X-CLIP, EZ-CLIP."""
