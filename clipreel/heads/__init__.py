"""Trainable video heads (nn.Modules), as nouns."""
