"""Shared library of fedembed: encoders, embedding cache, data, heads, losses, training, metrics."""
