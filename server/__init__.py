"""Coordinator side of fedembed: the Flower ServerApp, strategies and checkpoints."""
