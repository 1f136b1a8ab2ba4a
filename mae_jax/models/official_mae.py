"""Key names of the official MAE release (facebookresearch/mae ``.pth``) as transformers' ViT-MAE.

The official checkpoints (``mae_pretrain_vit_{base,large,huge}.pth``: encoder only;
``mae_visualize_vit_*.pth``: encoder and decoder) hold ``{'model': state_dict}`` of timm-style
modules. They differ from transformers' ``ViTMAEForPreTraining`` only in names and in one
layout: timm fuses query, key and value into one ``qkv`` Linear whose output rows are
``[q; k; v]`` (each heads-major, as transformers' separate projections are). So this file only
renames and splits; :mod:`mae_jax.models.hf_convert` does the rest.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

# Keys that only the official classification fine-tuning checkpoints have.
CLASSIFIER_KEYS = ('head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias')

_TOP = {
    'cls_token': 'vit.embeddings.cls_token',
    'pos_embed': 'vit.embeddings.position_embeddings',
    'patch_embed.proj.weight': 'vit.embeddings.patch_embeddings.projection.weight',
    'patch_embed.proj.bias': 'vit.embeddings.patch_embeddings.projection.bias',
    'norm.weight': 'vit.layernorm.weight',
    'norm.bias': 'vit.layernorm.bias',
    'decoder_embed.weight': 'decoder.decoder_embed.weight',
    'decoder_embed.bias': 'decoder.decoder_embed.bias',
    'mask_token': 'decoder.mask_token',
    'decoder_pos_embed': 'decoder.decoder_pos_embed',
    'decoder_norm.weight': 'decoder.decoder_norm.weight',
    'decoder_norm.bias': 'decoder.decoder_norm.bias',
    'decoder_pred.weight': 'decoder.decoder_pred.weight',
    'decoder_pred.bias': 'decoder.decoder_pred.bias',
}
# Within a block: official suffix -> transformers suffix (qkv is split separately).
_BLOCK = {
    'norm1.weight': 'layernorm_before.weight', 'norm1.bias': 'layernorm_before.bias',
    'attn.proj.weight': 'attention.o_proj.weight', 'attn.proj.bias': 'attention.o_proj.bias',
    'norm2.weight': 'layernorm_after.weight', 'norm2.bias': 'layernorm_after.bias',
    'mlp.fc1.weight': 'mlp.fc1.weight', 'mlp.fc1.bias': 'mlp.fc1.bias',
    'mlp.fc2.weight': 'mlp.fc2.weight', 'mlp.fc2.bias': 'mlp.fc2.bias',
}
_BLOCK_KEY = re.compile(r'^(blocks|decoder_blocks)\.(\d+)\.(.+)$')


def is_official(state: Mapping[str, Any]) -> bool:
  """Whether ``state`` uses the official (timm-style) names."""
  return 'patch_embed.proj.weight' in state or any(k.startswith('blocks.') for k in state)


def unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
  """The state dict inside an official ``.pth`` (``{'model': ...}``) or the dict itself."""
  for key in ('model', 'state_dict'):
    if key in checkpoint and isinstance(checkpoint[key], Mapping):
      return checkpoint[key]
  return checkpoint


def to_hf_names(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an official MAE state dict to transformers' names, splitting each fused ``qkv``.

  Raises:
    ValueError: for a classification fine-tuning checkpoint (``head``/``fc_norm``: it has no
      final encoder LayerNorm to import) or keys that are not MAE's.
  """
  if any(k in state for k in CLASSIFIER_KEYS):
    raise ValueError('this is an official MAE classification fine-tuning checkpoint (it has '
                     f'{[k for k in CLASSIFIER_KEYS if k in state]}); import a pretraining one '
                     '(mae_pretrain_vit_*.pth or mae_visualize_vit_*.pth)')
  out, unknown = {}, []
  for key, value in state.items():
    if key in _TOP:
      out[_TOP[key]] = value
      continue
    match = _BLOCK_KEY.match(key)
    if not match:
      unknown.append(key)
      continue
    stack, index, suffix = match.groups()
    prefix = f'vit.layers.{index}.' if stack == 'blocks' else f'decoder.decoder_layers.{index}.'
    if suffix in ('attn.qkv.weight', 'attn.qkv.bias'):
      kind = suffix.rsplit('.', 1)[1]
      value = np.asarray(value)
      if value.shape[0] % 3:
        raise ValueError(f'{key} has {value.shape[0]} rows, not 3 x width')
      for name, part in zip(('q_proj', 'k_proj', 'v_proj'), np.split(value, 3, axis=0)):
        out[f'{prefix}attention.{name}.{kind}'] = part
    elif suffix in _BLOCK:
      out[prefix + _BLOCK[suffix]] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f'keys that are not part of an official MAE model: {sorted(unknown)[:8]}')
  return out
