"""Flax model definitions: the ViT encoder blocks and the masked autoencoder."""
