"""Models: the SR backbone (transformer + VAE + LR conditioning), LoRA adapters, the flow-matching
sampler and training loss."""
