"""Nyx: a LoRA trainer for diffusion models that lives in the terminal."""

__version__ = "0.1.0"
