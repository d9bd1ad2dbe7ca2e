"""Training: mesh, state, the jitted step, checkpoints and the loop."""
