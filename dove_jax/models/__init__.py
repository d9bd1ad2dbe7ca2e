"""Flax NNX modules of DOVE."""
