r"""Export of a mae_jax checkpoint: transformers' ViT-MAE layout, or a fine-tuned model as ONNX.

  python -m mae_jax.tools.export --checkpoint WORKDIR --output DIR [--part mae|encoder]
  python -m mae_jax.tools.export --checkpoint FINETUNE_WORKDIR --output DIR --format onnx

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

``--format onnx`` (fine-tuning or linear-probing checkpoints; the selected-best weights unless
``--nouse_best``) writes the whole model, encoder and head, as ``DIR/model.onnx``
(``mae_jax.tools.onnx_export``: raw dB tiles in, normalised inside the graph, named outputs) with
``DIR/item.json``, a STAC item of the Machine Learning Model extension describing its bands,
normalisation, input, outputs, checksum and provenance (``mae_jax.tools.stac_mlm``, validated
offline before anything is written). The same atomic write and ``--overwrite`` rules apply (a
previous ONNX export is ``model.onnx``, optionally ``model.onnx.data``, and an ``item.json``
with mae_jax's provenance).
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
FORMATS = ('safetensors', 'onnx')
# The ONNX export's files (onnx_export.MODEL_FILE and its external data, and the STAC item),
# named here so that checking an output folder needs no onnx import.
ONNX_FILE = 'model.onnx'
ONNX_DATA_FILE = 'model.onnx.data'
ITEM_FILE = 'item.json'
# The item property that marks an item.json as an export's (stac_mlm.build_item writes it).
ITEM_MARKER = 'mae_jax:checkpoint'
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


def _unrecognised_hf(path: str) -> list[str]:
  """What folder ``path`` holds that a safetensors export does not write: anything but the two
  files, and a config.json without the export's ``mae_jax`` entry (e.g. another transformers
  model's)."""
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


def _unrecognised_onnx(path: str) -> list[str]:
  """The same for an ONNX export: model.onnx (+ model.onnx.data) and an item.json that carries
  the export's provenance (not some other STAC item)."""
  other = replace.unrecognised_entries(
      path, lambda folder, name: name in (ONNX_FILE, ONNX_DATA_FILE, ITEM_FILE)
      and os.path.isfile(os.path.join(folder, name)))
  if other:
    return other
  if not os.path.exists(os.path.join(path, ITEM_FILE)):
    return [f'{ONNX_FILE} without {ITEM_FILE}']
  try:
    with open(os.path.join(path, ITEM_FILE)) as f:
      ours = ITEM_MARKER in json.load(f)['properties']
  except (OSError, ValueError, TypeError, KeyError):
    ours = False
  return [] if ours else [f'{ITEM_FILE} without the "{ITEM_MARKER}" property']


def unrecognised(path: str) -> list[str]:
  """What folder ``path`` holds that an export (of either format) does not write. A folder is
  judged as the format whose own files it holds, so either format may replace the other."""
  names = set(os.listdir(path))
  if names & {ONNX_FILE, ONNX_DATA_FILE, ITEM_FILE}:
    return _unrecognised_onnx(path)
  return _unrecognised_hf(path)


def export(checkpoint: str, output: str, part: str = 'mae', use_best: bool = True,
           overwrite: bool = False) -> str:
  """Writes ``output``/{model.safetensors,config.json}; returns the output folder."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  if part not in hf_convert.PARTS:
    raise ValueError(f'--part must be one of {hf_convert.PARTS}, got {part!r}')
  output = _check_output_parent(output)
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


def _check_output_parent(output: str) -> str:
  output = os.path.abspath(output)
  parent = os.path.dirname(output)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f'the folder {parent!r} for --output does not exist')
  return output


def export_onnx(checkpoint: str, output: str, use_best: bool = True,
                overwrite: bool = False) -> str:
  """Writes ``output``/{model.onnx,item.json} of a fine-tuned model; returns the output folder.

  Raises:
    ValueError: A checkpoint without a head (pretraining), or no mean/std in its contract.
    FileNotFoundError, FileExistsError, PermissionError: Paths, as for :func:`export`.
    ImportError: onnx or pystac missing (the ``[onnx]`` extra).
  """
  try:
    # pylint: disable=g-import-not-at-top
    import onnx
    import pystac.errors
    from mae_jax.tools import inference
    from mae_jax.tools import onnx_export
    from mae_jax.tools import stac_mlm
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'--format=onnx needs onnx and pystac ({e}): pip install '
                      "'mae_jax[onnx]'") from e
  output = _check_output_parent(output)
  check = lambda: replace.check_output(output, overwrite, WHAT, unrecognised)
  check()
  directory, step = ckpt_lib.locate(checkpoint)
  task = ckpt_lib.read_metadata(directory, step).get('task')
  if task != 'finetune':
    raise ValueError(f'{directory}/{step} is a {task!r} checkpoint, which has no head: '
                     '--format=onnx exports a fine-tuned model (encoder + head); fine-tune it '
                     'first, or export its encoder with --format=safetensors --part=encoder')
  # One device: the weights are only read into host memory.
  loaded = inference.load_downstream(f'{directory}/{step}', mesh_config={'num_devices': 1},
                                     use_best=use_best)
  exported = onnx_export.build(loaded)
  config = loaded.config
  provenance = {'checkpoint': loaded.checkpoint, 'step': loaded.step, 'weights': loaded.weights,
                'init_checkpoint': config.get('init_checkpoint') or config.get('init_from'),
                'label_fraction': loaded.metadata.get('label_fraction')}
  with replace.written_aside(output, check=check) as tmp:
    files = onnx_export.save(exported, tmp)
    item = stac_mlm.build_item(
        folder=tmp, model_file=files[0], weights_file=files[1] if len(files) > 1 else None,
        input_spec=exported.input, output_specs=exported.outputs, task=exported.task,
        head_kind=exported.head_kind, contract=loaded.contract,
        hyperparameters=exported.hyperparameters, total_parameters=exported.total_parameters,
        framework_version=onnx.__version__, provenance=provenance)
    try:  # Offline (vendored schemas); a bad item leaves nothing behind.
      stac_mlm.validate(item)
    except pystac.errors.STACValidationError as e:
      # pystac's message: the schema on its first line, the failed rule on the second.
      what = ': '.join(str(e).splitlines()[:2])[:500]
      raise ValueError(f'the STAC MLM item of the export does not validate (a mae_jax bug): '
                       f'{what}') from e
    stac_mlm.write_item(item, os.path.join(tmp, ITEM_FILE))
  return output


def define_flags() -> None:
  """The command-line flags; defined only when run as a program, so importing this module
  next to other entrypoints (tests, notebooks) defines no flags."""
  flags.DEFINE_string('checkpoint', None, 'A mae_jax workdir, its checkpoints/ folder or one '
                      'checkpoints/<step> folder.', required=True)
  flags.DEFINE_string('output', None, 'Folder to write (model.safetensors and config.json, or '
                      'model.onnx and item.json).', required=True)
  flags.DEFINE_enum('format', 'safetensors', FORMATS, "'safetensors': transformers' ViT-MAE "
                    "layout (--part); 'onnx': a fine-tuned model, encoder + head, as model.onnx "
                    'with a STAC MLM item.json.')
  flags.DEFINE_enum('part', 'mae', hf_convert.PARTS, "--format=safetensors: 'mae': the whole MAE "
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
  # Bad flags, paths, checkpoints or outputs, or a missing extra: the message says it.
  try:
    if f.format == 'onnx':
      if f['part'].present:
        raise ValueError('--part applies to --format=safetensors; --format=onnx exports the '
                         'whole fine-tuned model (encoder + head)')
      out = export_onnx(f.checkpoint, f.output, f.use_best, f.overwrite)
    else:
      out = export(f.checkpoint, f.output, f.part, f.use_best, f.overwrite)
  except (ValueError, OSError, ImportError) as e:
    print(f'mae_jax.tools.export: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  if f.format == 'onnx':
    print(f'Wrote {out}/{ONNX_FILE} and {ITEM_FILE} (onnxruntime.InferenceSession; STAC MLM '
          'item)', flush=True)
  else:
    print(f'Wrote {out}/{WEIGHTS_FILE} and {CONFIG_FILE} '
          f'(transformers.{ARCHITECTURES[f.part]}.from_pretrained)', flush=True)


def console_main() -> None:
  """The ``mae-jax-export`` command (setup.py's console script)."""
  define_flags()
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
