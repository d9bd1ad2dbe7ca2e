"""dove-jax: DOVE, a vision encoder with a variable number of continuous tokens per image."""
