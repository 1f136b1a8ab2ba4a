"""Tools on trained checkpoints: whole-scene maps (predict, with scene_windows and the model
loader in inference), embeddings per tile (embed), weights out to transformers (export)."""
