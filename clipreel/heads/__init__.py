"""Every nn.Module of clipreel and what builds one: CLIP loading and taps, cache heads, raw-frame methods.

May import: torch, open_clip, clipreel.errors, clipreel.config, clipreel.devices. Nothing from
pipeline/ or stores/.
"""
