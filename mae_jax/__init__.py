"""mae_jax: Masked Autoencoders (ViT-MAE) for Sentinel-1 SAR in JAX/Flax."""
