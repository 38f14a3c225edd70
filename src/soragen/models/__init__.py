"""Models: the DiT composed from the layers, the VAE and text encoders behind small adapters, LoRA on the DiT, CPU fast paths."""
