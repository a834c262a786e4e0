"""Methods that run (and fine-tune or prompt) the CLIP itself on raw frames: ViFi-CLIP, bridge-and-prompt,
X-CLIP, EZ-CLIP.

Importing this package registers every method (`clipreel.heads.registry`), in the order of these
imports (the order `list_methods()` and the CLI's help show them in).

May import: its own modules.
"""

import clipreel.heads.raw.vifi
import clipreel.heads.raw.bridge_prompt
import clipreel.heads.raw.xclip
import clipreel.heads.raw.ezclip  # noqa: F401
