r"""Evaluation of downstream models over whole splits, per region, and the offline entrypoint.

  python -m mae_jax.main --config configs/evaluate.py --config.checkpoint=PATH [--workdir DIR]

``PATH`` is a fine-tuning or linear-probing workdir (its latest step) or one ``checkpoints/<step>``
folder, saved on any mesh. The run rebuilds the model from the checkpoint's own metadata,
restores it onto this machine's mesh, evaluates the validation and test splits and writes
``<workdir>/eval/<step>/``: ``metrics.json`` (per split, per region and over the whole split),
the WorldCover confusion matrices (``confusion_<split>.json`` and ``.png``) and
``predictions_<split>.png`` (SAR input / label / prediction for a few tiles). The workdir
defaults to the checkpoint's own.

Metrics are computed from statistics accumulated over every example of a split (sums of errors,
confusion matrices), never as means of per-batch values; padded examples of the last batch are
masked out. Losses are the training losses: VCF mean squared error in percentage points squared,
WorldCover cross-entropy per labelled pixel.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import matplotlib.figure
import numpy as np
import optax
from etils import epath
from matplotlib.backends import backend_agg

from data_pipeline import device_batches
from data_pipeline import input as data_input
from data_pipeline import quantise
from data_pipeline import render
from data_pipeline import schema
from mae_jax import metrics as metrics_lib
from mae_jax import preprocess

ALL = 'all'  # Name of the whole-split entry next to the regions.
REGION_NAMES = schema.REGIONS + (ALL,)


def label_feature(task: str) -> str:
  return schema.VCF if task == 'vcf' else schema.WORLDCOVER


def task_loss(task: str, output: jax.Array, labels: jax.Array,
              weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of per-example/pixel losses, their count) over labelled, unpadded examples.

  VCF: squared error in percentage points (examples with a NaN label are left out). WorldCover:
  softmax cross-entropy per pixel, pixels of ``schema.IGNORE_INDEX`` left out.
  """
  weight = weight.astype(jnp.float32)
  if task == 'vcf':
    target = labels.astype(jnp.float32)
    labelled = jnp.isfinite(target) * weight
    err = jnp.where(labelled > 0, output - target, 0.0)
    return (jnp.square(err) * labelled).sum(), labelled.sum()
  labels = labels.astype(jnp.int32)
  labelled = (labels != schema.IGNORE_INDEX) * weight[:, None, None]
  ce = optax.softmax_cross_entropy_with_integer_labels(
      output.astype(jnp.float32), jnp.where(labelled > 0, labels, 0))
  return (ce * labelled).sum(), labelled.sum()


def eval_step(variables, batch, *, model, mean, std, task, storage=quantise.FLOAT16):
  """Per-region sufficient statistics of one global batch, stacked over ``REGION_NAMES``.
  ``storage``: the form the batch's images are stored in (the data's)."""
  images, _ = preprocess.normalise(batch[schema.IMAGE], mean, std, storage)
  output = model.apply(variables, images)
  labels = batch[label_feature(task)]
  real = batch[data_input.EXAMPLE_MASK]
  region = batch[schema.REGION]
  weights = jnp.stack([real & (region == r) for r in range(len(schema.REGIONS))] + [real])

  def stats(weight):
    loss_sum, count = task_loss(task, output, labels, weight)
    out = {'loss_sum': loss_sum, 'loss_count': count}
    if task == 'vcf':
      target = labels.astype(jnp.float32)
      out.update(metrics_lib.regression_sums(output, target, weight & jnp.isfinite(target)))
    else:
      out['confusion'] = metrics_lib.confusion_matrix(
          labels, jnp.argmax(output, -1), schema.NUM_CLASSES, weight=weight)
    return out

  return jax.vmap(stats)(weights)


def make_eval_fn(model, mean, std, task: str, storage=quantise.FLOAT16):
  return jax.jit(functools.partial(eval_step, model=model, mean=mean, std=std, task=task,
                                   storage=storage))


def accumulate(eval_fn, variables, batches: Iterable[dict[str, np.ndarray]], sharding,
               keep_images: int = 0):
  """Runs ``eval_fn`` over host batches; returns (float64/int64 totals, a few example tiles)."""
  totals = None
  examples: dict[str, list[np.ndarray]] = {}
  for host_batch in batches:
    # The first batch is always kept (maybe no real rows), so every key has its shape.
    if keep_images and (not examples or
                        sum(len(v) for v in examples[schema.IMAGE]) < keep_images):
      real = host_batch[data_input.EXAMPLE_MASK]
      for key in (schema.IMAGE, schema.VCF, schema.WORLDCOVER):
        if key in host_batch:
          examples.setdefault(key, []).append(np.array(host_batch[key][real]))
    stats = eval_fn(variables, device_batches.global_batch(host_batch, sharding))
    totals = metrics_lib.add_sums(totals, jax.device_get(stats))
  kept = {k: np.concatenate(v)[:keep_images] for k, v in examples.items()}
  return totals, kept


def tile_stats_step(variables, batch, *, model, mean, std, task, storage=quantise.FLOAT16):
  """Per-example statistics of one global batch: a test tile is the unit the study's bootstrap
  resamples (``mae_jax.trainers.study_stats``). VCF: squared error in percentage points squared
  (NaN without a target); WorldCover: the tile's (C, C) confusion matrix."""
  images, _ = preprocess.normalise(batch[schema.IMAGE], mean, std, storage)
  output = model.apply(variables, images)
  labels = batch[label_feature(task)]
  out = {'real': batch[data_input.EXAMPLE_MASK], 'region': batch[schema.REGION]}
  if task == 'vcf':
    target = labels.astype(jnp.float32)
    error = output.astype(jnp.float32) - target
    out['sq_error'] = jnp.where(jnp.isfinite(target), jnp.square(error), jnp.nan)
  else:
    predicted = jnp.argmax(output, -1)
    out['confusion'] = jax.vmap(lambda l, p: metrics_lib.confusion_matrix(
        l[None], p[None], schema.NUM_CLASSES))(labels, predicted)
  return out


def make_tile_stats_fn(model, mean, std, task: str, storage=quantise.FLOAT16):
  return jax.jit(functools.partial(tile_stats_step, model=model, mean=mean, std=std, task=task,
                                   storage=storage))


def tile_stats(tile_stats_fn, variables, batches: Iterable[dict[str, np.ndarray]], sharding
               ) -> dict[str, np.ndarray]:
  """Per-tile statistics of a split, in its evaluation order, padding removed: ``region``
  (T,) index into ``schema.REGIONS``, and ``sq_error`` (T,) or ``confusion`` (T, C, C)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  parts: dict[str, list[np.ndarray]] = {}
  for host_batch in batches:
    out = tile_stats_fn(variables, device_batches.global_batch(host_batch, sharding))
    out = (multihost_utils.process_allgather(out, tiled=True) if jax.process_count() > 1
           else jax.device_get(out))
    real = np.asarray(out.pop('real'), bool)
    for key, value in out.items():
      parts.setdefault(key, []).append(np.asarray(value)[real])
  return {key: np.concatenate(value) for key, value in parts.items()}


def finalise(task: str, totals: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
  """Metrics per region name (regions without labelled examples are left out)."""
  out = {}
  for i, name in enumerate(REGION_NAMES):
    count = float(totals['loss_count'][i])
    if count <= 0:
      continue
    entry: dict[str, Any] = {'loss': float(totals['loss_sum'][i]) / count}
    if task == 'vcf':
      sums = {k: float(v[i]) for k, v in totals.items() if k not in ('loss_sum', 'loss_count')}
      entry.update(metrics_lib.regression_metrics(sums))
    else:
      entry.update(metrics_lib.segmentation_metrics(totals['confusion'][i]))
      entry['confusion_matrix'] = totals['confusion'][i].tolist()
    out[name] = entry
  return out


# Scalars logged at each validation of a fine-tuning run, by task: (log name, metric name).
LOGGED_METRICS = {'vcf': (('rmse', 'rmse'), ('mae', 'mae'), ('bias', 'bias'), ('r2', 'r2')),
                  'worldcover': (('miou', 'miou'), ('accuracy', 'overall_accuracy'))}


def split_scalars(task: str, totals: dict[str, np.ndarray], prefix: str = 'val_'
                  ) -> dict[str, float]:
  """The loss and the task's metrics (``LOGGED_METRICS``) of a whole split (``ALL``), from the
  totals of :func:`accumulate`, as ``{prefix}loss``, ``{prefix}rmse``, ...: scalars for the
  training logs. The loss is the sum over the count (as for best-step selection); metrics that
  are undefined (no labelled example, a NaN prediction, R^2 of constant targets) are left out."""
  count = float(totals['loss_count'][-1])
  out = {f'{prefix}loss': float(totals['loss_sum'][-1]) / max(count, 1.0)}
  if count <= 0:
    return out
  try:
    if task == 'vcf':
      metrics = metrics_lib.regression_metrics(
          {k: v[-1] for k, v in totals.items() if k in metrics_lib.REGRESSION_SUM_KEYS})
    else:
      metrics = metrics_lib.segmentation_metrics(totals['confusion'][-1])
  except ValueError:  # Non-finite sums or no labelled pixel: the loss says so already.
    return out
  for name, key in LOGGED_METRICS[task]:
    value = metrics.get(key)
    if value is not None and np.isfinite(value):
      out[f'{prefix}{name}'] = float(value)
  return out


def summary_line(task: str, split: str, per_region: dict[str, dict[str, Any]]) -> str:
  """One line of a split's metrics (:func:`finalise`): the task's metrics over the whole split,
  then the headline metric (RMSE or mIoU) per region."""
  logged = LOGGED_METRICS[task]
  whole = per_region.get(ALL)
  parts = []
  if whole:
    parts.append('all ' + ', '.join(f'{name} {whole[key]:.4g}' for name, key in logged
                                     if whole.get(key) is not None))
  regions = [r for r in schema.REGIONS if r in per_region]
  headline, key = logged[0]
  if regions:
    parts.append(f'{headline} by region: ' + ', '.join(
        f'{r} {per_region[r][key]:.4g}' for r in regions))
  return f'{split}: ' + ('; '.join(parts) or 'no labelled example')


def evaluate_splits(task: str, data_dir: str, eval_fn, variables, batch_sharding,
                    eval_batch: int, splits, features, keep_images: int = 0):
  """{'splits': {split: {region: metrics}}} plus, with keep_images, the kept tiles per split."""
  results: dict[str, Any] = {'splits': {}}
  kept = {}
  for split in splits:
    data = data_input.HostDataset(data_dir, split)
    totals, kept[split] = accumulate(
        eval_fn, variables, data.eval_batches(eval_batch // jax.process_count(),
                                              features=features),
        batch_sharding, keep_images=keep_images)
    results['splits'][split] = finalise(task, totals)
  if keep_images:
    results['_kept'] = kept
  return results


def predict_fn(model, mean, std, out_sharding=None, storage=quantise.FLOAT16):
  def predict(variables, stored_images):
    images, _ = preprocess.normalise(stored_images, mean, std, storage)
    return model.apply(variables, images)
  return jax.jit(predict, out_shardings=out_sharding)


def tiles_of_process_0(tiles: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
  """Process 0's kept tiles, on every process (figures run a jitted prediction, which every
  process must call with the same inputs). Each process's arrays have their trailing shapes even
  when empty, so all can pad to ``count`` rows for the broadcast."""
  if jax.process_count() == 1:
    return tiles
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  real = int(multihost_utils.broadcast_one_to_all(np.int32(len(tiles.get(schema.IMAGE, ())))))
  padded = {k: np.concatenate([v[:count], np.zeros((max(count - len(v), 0),) + v.shape[1:],
                                                   v.dtype)]) for k, v in tiles.items()}
  shared = multihost_utils.broadcast_one_to_all(padded)
  return {k: np.asarray(v)[:real] for k, v in shared.items()}


def prediction_figure(task: str, images_db: np.ndarray, labels: np.ndarray,
                      predictions: np.ndarray, season: str = 'summer') -> np.ndarray:
  """SAR false colour / label / prediction per tile (WorldCover), or SAR with label and
  prediction in the title (VCF); returns an RGB uint8 image."""
  rows = images_db.shape[0]
  cols = 3 if task == 'worldcover' else 1
  figure = matplotlib.figure.Figure(figsize=(2.2 * cols, 2.2 * rows + 0.3), dpi=100,
                                    facecolor='white')
  canvas = backend_agg.FigureCanvasAgg(figure)
  axes = figure.subplots(rows, cols, squeeze=False)
  sar = render.sar_false_colour(images_db.astype(np.float32), season)
  for r in range(rows):
    if task == 'worldcover':
      panels = (sar[r], render.worldcover_colour(labels[r]),
                render.worldcover_colour(predictions[r]))
      titles = (f'SAR ({season})', 'WorldCover label', 'prediction')
    else:
      panels = (sar[r],)
      titles = (f'VCF label {labels[r]:.1f} %, predicted {predictions[r]:.1f} %',)
    for c, (panel, title) in enumerate(zip(panels, titles)):
      ax = axes[r, c]
      ax.imshow(panel, interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0 or task == 'vcf':
        ax.set_title(title, fontsize=8)
  figure.tight_layout(pad=0.3)
  canvas.draw()
  rgb = np.array(canvas.buffer_rgba())[..., :3]
  figure.clear()
  return rgb


def confusion_figure(confusion: np.ndarray) -> np.ndarray:
  """Row-normalised confusion matrix (rows: true class) as an RGB uint8 image."""
  confusion = np.asarray(confusion, np.float64)
  rows = confusion.sum(1, keepdims=True)
  normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
  figure = matplotlib.figure.Figure(figsize=(6.5, 5.5), dpi=100, facecolor='white')
  canvas = backend_agg.FigureCanvasAgg(figure)
  ax = figure.subplots()
  image = ax.imshow(normalised, vmin=0.0, vmax=1.0, cmap='viridis')
  names = schema.WORLDCOVER_NAMES
  ax.set_xticks(range(len(names)), names, rotation=60, ha='right', fontsize=7)
  ax.set_yticks(range(len(names)), names, fontsize=7)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true (row-normalised)')
  figure.colorbar(image, ax=ax)
  figure.tight_layout()
  canvas.draw()
  rgb = np.array(canvas.buffer_rgba())[..., :3]
  figure.clear()
  return rgb


def write_report(out_dir: str, task: str, results: dict[str, Any],
                 pictures: dict[str, np.ndarray]) -> None:
  """Writes metrics.json, confusion matrices and PNGs into ``out_dir`` (process 0 only)."""
  if jax.process_index() != 0:
    return
  path = epath.Path(out_dir)
  path.mkdir(parents=True, exist_ok=True)
  for split, per_region in results['splits'].items():
    if task == 'worldcover' and ALL in per_region:
      matrix = per_region[ALL]['confusion_matrix']
      (path / f'confusion_{split}.json').write_text(json.dumps(
          {'rows': 'true class', 'cols': 'predicted class',
           'classes': list(schema.WORLDCOVER_NAMES), 'matrix': matrix}, indent=1))
      render.write_png(os.fspath(path / f'confusion_{split}.png'), confusion_figure(matrix))
  for name, image in pictures.items():
    render.write_png(os.fspath(path / f'predictions_{name}.png'), image)
  slim = json.loads(json.dumps(results))
  for per_region in slim['splits'].values():
    for entry in per_region.values():
      entry.pop('confusion_matrix', None)  # In confusion_<split>.json instead.
  tmp = path / 'metrics.json.tmp'
  tmp.write_text(json.dumps(slim, indent=2, sort_keys=True))
  tmp.rename(path / 'metrics.json')


def evaluate_checkpoint(eval_config, workdir: str | None = None) -> dict[str, Any]:
  """The offline entrypoint: restores any fine-tuning / linear-probing step and evaluates it.

  The model, head, task and dataset come from the checkpoint's metadata; ``eval_config`` sets
  the mesh, the splits, the batch size and optionally another dataset folder.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from mae_jax.tools import inference  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top

  if not eval_config.checkpoint:
    raise ValueError('config.checkpoint is empty: pass --config.checkpoint=PATH (a fine-tuning '
                     'workdir or one of its checkpoints/<step> folders)')
  loaded = inference.load_downstream(eval_config.checkpoint, mesh_config=eval_config.mesh,
                                     use_best=eval_config.use_best)
  config, model, mesh, variables = loaded.config, loaded.model, loaded.mesh, loaded.variables
  metadata, contract, task, step = loaded.metadata, loaded.contract, loaded.task, loaded.step
  directory = loaded.checkpoint.rsplit('/', 1)[0]
  if eval_config.data_dir:
    config.dataset.data_dir = eval_config.data_dir
  workdir = workdir or os.path.dirname(directory.rstrip('/'))
  dataset = data_input.HostDataset(config.dataset.data_dir, config.dataset.validation_split)
  differences = contract.differences(dataset.contract)
  if differences:
    raise ValueError(f'{config.dataset.data_dir} differs from the data the checkpoint was '
                     'trained on: ' + '; '.join(differences))
  if contract.storage_differences(dataset.contract) and jax.process_index() == 0:
    # Accepted: each side decodes its own storage form to dB (schema.InputContract.differences).
    print(f'Note: the checkpoint was trained on data stored as {contract.storage_summary()}, '
          f'{config.dataset.data_dir} is stored as {dataset.contract.storage_summary()}; both '
          'decode to dB, so it takes them.', flush=True)
  mean, std = np.asarray(contract.mean, np.float32), np.asarray(contract.std, np.float32)
  storage = quantise.form_of(dataset.contract)  # The data's own form decodes them.
  batch = eval_config.batch_size or config.get('eval_batch_size', 0) or config.batch_size
  with jax.set_mesh(mesh), nn.logical_axis_rules(loaded.rules):
    eval_fn = make_eval_fn(model, mean, std, task, storage)
    features = (schema.IMAGE, label_feature(task), schema.REGION)
    results = evaluate_splits(task, config.dataset.data_dir, eval_fn, variables,
                              sharding.batch_sharding(mesh), batch, tuple(eval_config.splits),
                              features, keep_images=eval_config.num_images)
  kept = results.pop('_kept')
  pictures = {}
  predict = predict_fn(model, mean, std, out_sharding=sharding.replicated(mesh), storage=storage)
  for split, tiles in kept.items():
    tiles = tiles_of_process_0(tiles, eval_config.num_images)
    if not len(tiles.get(schema.IMAGE, ())):
      continue
    predictions = np.asarray(predict(variables, tiles[schema.IMAGE]))
    images = storage.decode(tiles[schema.IMAGE])  # dB for the picture.
    if task == 'worldcover':
      # Pixels without any valid input are no-data in the picture, as in the label.
      no_data = np.isnan(images).all(axis=-1)
      predictions = np.where(no_data, schema.IGNORE_INDEX, predictions.argmax(-1))
    pictures[split] = prediction_figure(task, images, tiles[label_feature(task)], predictions)
  results.update({'checkpoint': f'{directory}/{step}', 'step': step, 'task_name': task,
                  'head_kind': config.head.kind, 'weights': loaded.weights,
                  'init_checkpoint': metadata.get('init_checkpoint'),
                  'label_fraction': metadata.get('label_fraction')})
  out_dir = os.path.join(workdir, 'eval', str(step))
  write_report(out_dir, task, results, pictures)
  if jax.process_index() == 0:
    for split, per_region in results['splits'].items():
      headline = 'rmse' if task == 'vcf' else 'miou'
      print(f'{split}: ' + ', '.join(f'{region} {headline} {m[headline]:.4g}'
                                       for region, m in per_region.items()), flush=True)
    print(f'Wrote {out_dir}/metrics.json', flush=True)
  return results
