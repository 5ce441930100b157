"""oars-fast: online RL alignment of generative 4x real-world super-resolution (OARS)."""
__version__ = "0.1.0"
