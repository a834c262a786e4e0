"""The stages of clipreel, as verbs (extract, train, finetune, evaluate, protocols, demo), and the
data they read (`pipeline.data`).

May import: heads/, stores/ and the top-level utilities.
"""
