"""Converters from the reference implementations' released checkpoints into clipreel's models.

One module per source layout, each a function from the checkpoint's tensors (and, where the
checkpoint lacks weights, the base CLIP's) to an `Imported` (`common.py`):

- ``evl``      OpenGVLab/efficient-video-recognition: the decoder + classifier; backbone from --clip;
- ``xclip``    microsoft/VideoX X-CLIP: the whole model;
- ``xclip_hf`` transformers' X-CLIP (``microsoft/xclip-*``): mapped onto X-CLIP's own layout;
- ``vifi``     ViFi-CLIP, fine-tuned or prompted (bridge and prompt); token table from --clip;
- ``ezclip``   EZ-CLIP's training dict (fp16).

``export`` writes a ViFi-CLIP model, which is still a plain CLIP, as an open_clip checkpoint.
``clip_layout`` holds the OpenAI CLIP layout they share.
"""
