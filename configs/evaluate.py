r"""Offline evaluation of a fine-tuning or linear-probing checkpoint (any step, any mesh).

  python -m mae_jax.main --config configs/evaluate.py --config.checkpoint=PATH [--workdir DIR]

PATH: a fine-tuning workdir (latest step) or one of its ``checkpoints/<step>`` folders. Writes
``<workdir>/eval/<step>/metrics.json`` (per split and region: VCF RMSE / MAE / R^2 in percentage
points, WorldCover mIoU / overall accuracy / per-class IoU), ``confusion_<split>.{json,png}``
and ``predictions_<split>.png``. The workdir defaults to the checkpoint's own.
"""

import ml_collections

from configs import pretrain


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = 'evaluate'
  c.checkpoint = ''
  c.data_dir = ''  # '' = the dataset the checkpoint was trained on.
  c.splits = ('validation', 'test')
  c.batch_size = 0  # Global; 0 = the run's eval batch size.
  c.use_best = True  # The step selected on validation loss (if the run selected one).
  c.num_images = 4  # Tiles per split drawn as SAR / label / prediction.
  c.mesh = pretrain.base_config().mesh
  return c
