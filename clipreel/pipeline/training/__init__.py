"""The one training kit of both trainers (`pipeline.train`: cache heads, `pipeline.finetune`:
raw-frame methods): the optimiser and its schedule, the epoch loop, checkpoints and the one resume
rule, logs and curves, and data-parallel training through Ray Train.

May import: torch, numpy, pandas, ray, matplotlib, clipreel.errors, clipreel.heads.registry,
clipreel.stores.runs, clipreel.pipeline.raycluster.
"""
