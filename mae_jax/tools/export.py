r"""Export of a mae_jax checkpoint to transformers' ViT-MAE layout (safetensors + config.json).

  python -m mae_jax.tools.export --checkpoint WORKDIR --output DIR [--part mae|encoder]

``--part mae`` (pretraining checkpoints) writes the whole MAE for
``transformers.ViTMAEForPreTraining.from_pretrained(DIR)``; ``--part encoder`` (pretraining or
fine-tuning checkpoints; for the latter the selected-best weights unless ``--nouse_best``)
writes the encoder for ``transformers.ViTMAEModel.from_pretrained(DIR)``. ``DIR`` gets
``model.safetensors`` (float32) and ``config.json``; the latter also carries, under ``mae_jax``,
where the weights came from and the input contract: the 12 bands in order, their units and the
normalisation statistics a PyTorch user must apply (``(x_dB - mean) / std``, no-data set to 0).

An encoder export sets ``mask_ratio`` to 0, so ``ViTMAEModel`` keeps every patch; it still
orders them by ``noise`` (pass ``noise=torch.arange(L).expand(B, L)`` for grid order) and
returns ``ids_restore`` to undo a random order. The folder is written beside ``DIR`` (as
``.DIR.tmp-<random>``) and renamed into place, so a failed export leaves nothing and an old
``DIR`` stays as it was. ``--overwrite`` replaces only a previous export (a folder holding just
``config.json`` with the ``mae_jax`` entry and ``model.safetensors``, or nothing); a workdir,
a checkpoint or any other file there is refused, untouched. ``--config.init_from=DIR`` imports
an export back (bitwise the same params).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging

from data_pipeline import replace
from mae_jax import checkpoint as ckpt_lib
from mae_jax.models import hf_convert
from mae_jax.models import mae

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
ARCHITECTURES = {'mae': 'ViTMAEForPreTraining', 'encoder': 'ViTMAEModel'}
WHAT = 'a mae_jax export'  # For messages: what --overwrite replaces.


def load_params(path: str, part: str = 'mae', use_best: bool = True):
  """(float32 MaskedAutoencoder, numpy params of ``part``, metadata, 'dir/step') of a checkpoint.

  Only the arrays of ``part`` are read, onto this host's first device.
  """
  directory, step = ckpt_lib.locate(path)
  where = f'{directory}/{step}'
  metadata = ckpt_lib.read_metadata(directory, step)
  if 'model' not in metadata:
    raise ValueError(f'{where}: no model in the checkpoint metadata; not a mae_jax checkpoint')
  task = metadata.get('task')
  if part == 'mae' and task != 'pretrain':
    raise ValueError(f'{where} is a {task!r} checkpoint, which has no decoder: export its '
                     'encoder with --part=encoder')
  model = mae.model_from_config(ml_collections.ConfigDict(metadata['model']),
                                dtype_override=jnp.float32, attention_override='auto')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = flax.traverse_util.unflatten_dict({
      key: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=device)
      for key, shape in hf_convert.param_shapes(model, part).items()})
  best = (task == 'finetune' and use_best
          and metadata.get('config', {}).get('select_best', True))
  target = {'best': {'params': abstract}} if best else {'params': abstract}
  restored = ckpt_lib.restore_subtree(directory, step, target)
  params = (restored['best'] if best else restored)['params']
  return model, jax.tree.map(np.asarray, params), metadata, where


def hf_config(model: mae.MaskedAutoencoder, part: str, provenance: dict[str, Any]) -> dict:
  """The ``config.json`` of an export: ``ViTMAEConfig`` fields plus the ``mae_jax`` entry."""
  config = hf_convert.hf_config_dict(model, part)
  if part == 'encoder':
    config['mask_ratio'] = 0.0
  config.update(model_type='vit_mae', architectures=[ARCHITECTURES[part]], dtype='float32',
                mae_jax=provenance)
  return config


def unrecognised(path: str) -> list[str]:
  """What folder ``path`` holds that an export does not write: anything but the two files, and
  a config.json without the export's ``mae_jax`` entry (e.g. another transformers model's)."""
  other = replace.unrecognised_entries(
      path, lambda folder, name: name in (CONFIG_FILE, WEIGHTS_FILE)
      and os.path.isfile(os.path.join(folder, name)))
  if other or not os.listdir(path):
    return other
  if not os.path.exists(os.path.join(path, CONFIG_FILE)):
    return [f'{WEIGHTS_FILE} without {CONFIG_FILE}']
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      ours = 'mae_jax' in json.load(f)
  except (OSError, ValueError, TypeError):
    ours = False
  return [] if ours else [f'{CONFIG_FILE} without the "mae_jax" entry']


def export(checkpoint: str, output: str, part: str = 'mae', use_best: bool = True,
           overwrite: bool = False) -> str:
  """Writes ``output``/{model.safetensors,config.json}; returns the output folder."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  if part not in hf_convert.PARTS:
    raise ValueError(f'--part must be one of {hf_convert.PARTS}, got {part!r}')
  output = os.path.abspath(output)
  parent = os.path.dirname(output)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f'the folder {parent!r} for --output does not exist')
  check = lambda: replace.check_output(output, overwrite, WHAT, unrecognised)
  check()
  model, params, metadata, where = load_params(checkpoint, part, use_best)
  state = hf_convert.to_hf_state_dict(model, params, part=part)
  if part == 'encoder':
    state = hf_convert.encoder_state_dict_for_model(state)
  provenance = {'checkpoint': where, 'task': metadata.get('task'), 'part': part,
                'input_contract': metadata.get('input_contract'),
                'normalisation': '(x_dB - mean) / std per band, no-data pixels set to 0',
                'pixel_values_layout': 'NCHW, channels in input_contract band order'}
  config = hf_config(model, part, provenance)
  with replace.written_aside(output, check=check) as tmp:
    # save() then a plain write, not save_file(): safetensors 0.8 writes a 0600 temporary file
    # and renames it, so the weights would not get the umask's mode like config.json does.
    weights = safetensors_numpy.save({k: np.ascontiguousarray(v) for k, v in state.items()},
                                     metadata={'format': 'pt'})
    with open(os.path.join(tmp, WEIGHTS_FILE), 'wb') as f:
      f.write(weights)
    del weights
    with open(os.path.join(tmp, CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=2, sort_keys=True)
  return output


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so importing this module
  next to other entrypoints (tests, notebooks) defines no flags."""
  flags.DEFINE_string('checkpoint', None, 'A mae_jax workdir, its checkpoints/ folder or one '
                      'checkpoints/<step> folder.', required=True)
  flags.DEFINE_string('output', None, 'Folder to write (model.safetensors, config.json).',
                      required=True)
  flags.DEFINE_enum('part', 'mae', hf_convert.PARTS, "'mae': the whole MAE "
                    "(ViTMAEForPreTraining); 'encoder': the encoder (ViTMAEModel).")
  flags.DEFINE_bool('use_best', True, 'Fine-tuning checkpoints: the weights selected on '
                    'validation loss, not the last step.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing --output folder that holds a '
                    'previous export (nothing else: a workdir or other files are refused).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO (~80 lines).
  try:
    out = export(f.checkpoint, f.output, f.part, f.use_best, f.overwrite)
  except (ValueError, OSError) as e:  # Bad paths, checkpoints or outputs: the message says it.
    print(f'mae_jax.tools.export: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  print(f'Wrote {out}/{WEIGHTS_FILE} and {CONFIG_FILE} '
        f'(transformers.{ARCHITECTURES[f.part]}.from_pretrained)', flush=True)


def console_main() -> None:
  """The ``mae-jax-export`` command (setup.py's console script)."""
  define_flags()
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
