"""Layers: the DiT's building blocks (patches, positions, adaLN, attention, the block), plain torch."""
