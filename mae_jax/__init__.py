"""mae_jax: Masked Autoencoders (ViT-MAE) for Sentinel-1 SAR in JAX/Flax.

``mae_jax.load(path)`` loads a fine-tuned, pretrained or exported model for notebooks
(``mae_jax.tools.api``: ``model.predict(array)``, ``model.embed(tiles)``). It is imported on
first use (PEP 562), so ``import mae_jax`` stays cheap: no JAX until a model is loaded.
"""

import importlib

# Public names -> the module that defines them, imported when first asked for.
_LAZY = {'load': 'mae_jax.tools.api'}

__all__ = sorted(_LAZY)


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # Later lookups skip this function.
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
