"""Weight import from PyTorch checkpoints (diffusers VQModel, GPT-NeoX/Pythia)."""
