"""soragen: text to video with a Sora-style diffusion transformer."""

__version__ = "0.1.0"
