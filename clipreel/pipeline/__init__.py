"""The stages of clipreel, as verbs (extract, train, finetune, evaluate, protocols, demo), the data
they read (`pipeline.data`) and the training kit both trainers share (`pipeline.training`).

May import: heads/, stores/ and the top-level utilities.
"""
