"""Heads trained from the feature cache: EVL, X-CLIP MIT and prompts, text prompts, baselines, zero-shot.

Importing this package registers every cache head (`clipreel.heads.registry`), in the order of
these imports (the order `list_heads()` and the CLI's help show them in).

May import: its own modules.
"""

import clipreel.heads.cache.evl
import clipreel.heads.cache.xclip
import clipreel.heads.cache.text_prompt
import clipreel.heads.cache.baselines
import clipreel.heads.cache.zeroshot  # noqa: F401
