"""Fast compute with plain-PyTorch references (not built yet)."""
