"""Diffusion: what training minimises (objectives) and how sampling walks back from noise (samplers, guidance)."""
