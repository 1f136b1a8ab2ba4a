"""The tiny preset shrunk to 32 px tiles and a few steps, and how tests run it (in process or CLI).

``python -m mae_jax.main --config tests/tiny_config.py:/path/to/dataset --workdir W`` runs the
same config that ``make_tiny_config(path)`` returns.
"""

TILE_SIZE = 32


def make_tiny_config(data_dir):
  import configs.pretrain as pretrain  # pylint: disable=g-import-not-at-top
  config = pretrain.preset_config('tiny')
  config.dataset.data_dir = data_dir
  config.dataset.shuffle_buffer = 16
  config.model.image_size = TILE_SIZE
  config.model.encoder.update(dict(width=32, depth=2, heads=2, mlp_dim=64))
  config.model.decoder.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
  config.batch_size = 8
  config.total_steps = 3
  config.log_every_steps = 1
  config.image_every_steps = 1000
  config.checkpoint.every_steps = 1000
  config.checkpoint.async_save = False
  return config


def get_config(data_dir):
  return make_tiny_config(data_dir)


def run(config, workdir, **overrides):
  """Pretrains ``config`` with dotted overrides (``'checkpoint.every_steps': 1``) in ``workdir``;
  returns the config used."""
  from mae_jax.trainers import pretrain  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for name in parents:
      target = target[name]
    target[leaf] = value
  pretrain.train_and_evaluate(config, str(workdir))
  return config


def losses(workdir):
  """{step: loss} from a workdir's metrics.jsonl."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}
