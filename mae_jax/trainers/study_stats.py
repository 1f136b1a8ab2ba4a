"""Uncertainty of the label-efficiency study: bootstrap intervals and monotone label savings.

Each fine-tuning run of the study saves per-test-tile sufficient statistics (``tile_stats.npz``,
written by ``mae_jax.trainers.finetune``): for VCF the squared error of each tile's prediction,
for WorldCover each tile's confusion matrix. Every run of a study is tested on the same tiles in
the same order, so runs can be compared tile by tile. From them, per (task, region):

* **Point estimates**: the headline metric of each seed on the whole test set (exactly what
  ``final_metrics.json`` reports), averaged over seeds.
* **Intervals** (:func:`bootstrap_panel`): a two-level bootstrap. Each replicate resamples the
  test tiles with replacement (tiles, not pixels: neighbouring pixels are not independent) and
  the seeds with replacement, and recomputes every cell's seed-averaged metric from the
  resampled tiles (RMSE from summed squared errors, mIoU from summed confusion matrices, never
  from per-tile metrics). The same draw serves every cell of the panel, so differences and
  curves are paired: pretrained and scratch of the same seed share their label subset
  (``data_pipeline/subsets.py``) and both see the same resampled tiles. 95 % intervals are the
  2.5 and 97.5 percentiles of the replicates.
* **Differences** pretrained - scratch per fraction, with their paired interval; a difference
  is *clear* when its interval excludes 0, and then says which initialisation is better.
* **Label savings** (:func:`monotone_savings`) computed on monotone fits of both curves, with
  an interval from the same replicates.

Pure numpy; no JAX.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np

from data_pipeline import atomic

# Replicates of the bootstrap and the interval's coverage.
NUM_REPLICATES = 2000
LEVEL = 0.95
TILE_STATS_FILE = 'tile_stats.npz'


# --- Per-tile statistics of one run ----------------------------------------------------------


def save_tile_stats(path: str, task: str, stats: Mapping[str, np.ndarray]) -> None:
  """Writes one run's per-tile statistics (see :func:`tile_metric`) atomically as .npz."""
  buffer = io.BytesIO()
  np.savez(buffer, task=np.asarray(task), **stats)
  atomic.write_bytes(path, buffer.getvalue())


def load_tile_stats(path: str) -> dict[str, np.ndarray]:
  """Reads :func:`save_tile_stats`'s file: {'task', 'region', and 'sq_error' or 'confusion'}."""
  with np.load(path) as data:
    return {key: data[key] for key in data.files}


def tile_metric(task: str, stats: Mapping[str, np.ndarray], counts: np.ndarray) -> np.ndarray:
  """The headline metric of seeds on weighted sets of test tiles.

  Args:
    task: 'vcf' (RMSE in percentage points from ``sq_error`` (S, T), NaN for an unlabelled
      tile) or 'worldcover' (mIoU over the classes present, from ``confusion`` (S, T, C, C),
      rows = true class).
    stats: Per-seed, per-tile statistics stacked over S seeds.
    counts: (B, T) how many times each tile is in each of B tile sets (ones = the test set).

  Returns:
    (B, S) float64 metrics; NaN where a set has no labelled tile (VCF) or pixel (WorldCover).
  """
  counts = np.asarray(counts, np.float64)
  if task == 'vcf':
    sq_error = np.asarray(stats['sq_error'], np.float64)
    labelled = np.isfinite(sq_error)
    total = counts @ np.where(labelled, sq_error, 0.0).T  # (B, S)
    number = counts @ labelled.T.astype(np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
      return np.sqrt(total / number)
  if task == 'worldcover':
    # (B, T) x (S, T, C, C) -> (B, S, C, C) as one matrix product (einsum would not use BLAS).
    confusion = np.tensordot(counts, np.asarray(stats['confusion'], np.float64), axes=(1, 1))
    diagonal = np.einsum('bsii->bsi', confusion)
    union = confusion.sum(-1) + confusion.sum(-2) - diagonal
    present = union > 0
    with np.errstate(invalid='ignore', divide='ignore'):
      iou = np.where(present, diagonal / np.where(present, union, 1.0), 0.0)
      return iou.sum(-1) / present.sum(-1)
  raise ValueError(f'unknown task {task!r}: vcf or worldcover')


# --- Monotone fits and label savings ---------------------------------------------------------


def isotonic(values: Sequence[float], increasing: bool = True) -> np.ndarray:
  """Least-squares monotone fit of equally weighted values (pool adjacent violators)."""
  y = np.asarray(values, np.float64)
  if not increasing:
    return -isotonic(-y, True)
  blocks: list[list[float]] = []  # [sum, count] of pooled runs, left to right.
  for value in y:
    blocks.append([value, 1.0])
    while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
      total, count = blocks.pop()
      blocks[-1][0] += total
      blocks[-1][1] += count
  return np.concatenate([np.full(int(c), s / c) for s, c in blocks]) if blocks else y


@dataclasses.dataclass(frozen=True)
class Saving:
  """How many times fewer labels the pretrained model needs than scratch, at one fraction.

  ``bound``: 'exact' (``factor`` = f / f*), 'lower' (reached at the smallest fraction already:
  ``factor`` = f / f_min is a lower bound), 'not reached' (within the grid), 'worse' (the
  pretrained mean at f is worse than scratch's: no savings, whatever the fits say) or
  'undefined' (a NaN in either curve).
  """
  bound: str
  factor: float | None = None

  @property
  def value(self) -> float:
    """The factor as a number for intervals: no savings ('not reached', 'worse') count as 0."""
    if self.bound in ('exact', 'lower'):
      return float(self.factor)
    return 0.0 if self.bound in ('not reached', 'worse') else math.nan


def monotone_savings(fractions: Sequence[float], pretrained: Sequence[float],
                     scratch: Sequence[float], higher_is_better: bool) -> list[Saving]:
  """Label savings at each fraction, on monotone fits of both curves.

  More labels are assumed never to hurt, so each curve is replaced by its least-squares
  monotone fit (improving with the fraction) before the crossing is sought: a dip such as
  mIoU 0.268 at 10 % and 0.250 at 100 % is pooled into a plateau, and a later, worse point can
  no longer make the pretrained curve cross the scratch level early. At fraction f the scratch
  fit's value is the target; f* is the smallest fraction at which the pretrained fit reaches it
  (linear in log10 fraction between grid points) and the factor is f / f*. Where the pretrained
  MEAN at f is worse than the scratch mean at f, the result is 'worse' (no savings), so a
  worse pretrained model can never show savings.

  Args:
    fractions: Ascending label fractions of both curves.
    pretrained, scratch: Mean metric per fraction.
    higher_is_better: The metric's direction (mIoU True, RMSE False).

  Returns:
    One :class:`Saving` per fraction.
  """
  f = np.asarray(fractions, np.float64)
  pre, scr = np.asarray(pretrained, np.float64), np.asarray(scratch, np.float64)
  if not (f.size == pre.size == scr.size) or np.any(np.diff(f) <= 0):
    raise ValueError('monotone_savings needs ascending fractions and one value per fraction')
  if not (np.all(np.isfinite(pre)) and np.all(np.isfinite(scr))):
    return [Saving('undefined')] * f.size
  sign = 1.0 if higher_is_better else -1.0  # Work with "higher is better" values.
  pre_fit, scr_fit = isotonic(sign * pre), isotonic(sign * scr)
  log_f = np.log10(f)
  out = []
  for i in range(f.size):
    if sign * pre[i] < sign * scr[i]:
      out.append(Saving('worse'))
      continue
    target = scr_fit[i]
    if pre_fit[0] >= target:
      out.append(Saving('lower', float(f[i] / f[0])))
      continue
    reached = np.nonzero(pre_fit >= target)[0]
    if not reached.size:
      out.append(Saving('not reached'))
      continue
    j = int(reached[0])  # pre_fit[j - 1] < target <= pre_fit[j]: one crossing on the segment.
    t = (target - pre_fit[j - 1]) / (pre_fit[j] - pre_fit[j - 1])
    f_star = 10.0**(log_f[j - 1] + t * (log_f[j] - log_f[j - 1]))
    out.append(Saving('exact', float(f[i] / f_star)))
  return out


# --- The bootstrap over tiles and seeds ------------------------------------------------------


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
  """The percentile interval of bootstrap replicates (NaN replicates left out)."""
  finite = replicates[np.isfinite(replicates)]
  if not finite.size:
    return (math.nan, math.nan)
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(finite, [tail, 100 - tail])
  return (float(low), float(high))


def draws(num_tiles: int, num_seeds: int, replicates: int, seed: int
          ) -> tuple[np.ndarray, np.ndarray]:
  """(tile counts (B, T), seed counts (B, S)) of a two-level bootstrap, reproducible in seed."""
  rng = np.random.default_rng(seed)
  tiles = rng.multinomial(num_tiles, np.full(num_tiles, 1.0 / num_tiles), size=replicates)
  seeds = rng.multinomial(num_seeds, np.full(num_seeds, 1.0 / num_seeds), size=replicates)
  return tiles, seeds


def bootstrap_panel(task: str, higher_is_better: bool,
                    cells: Mapping[tuple[float, str], Mapping[str, np.ndarray]],
                    replicates: int = NUM_REPLICATES, seed: int = 0) -> dict[str, Any]:
  """Point estimates, intervals, paired differences and savings of one (task, region) panel.

  Args:
    task: 'vcf' or 'worldcover'.
    higher_is_better: The headline metric's direction.
    cells: (fraction, init) -> per-tile statistics stacked over the same S seeds in the same
      order (see :func:`tile_metric`), on the panel's test tiles (the same T tiles in every
      cell). init is 'pretrained' or 'scratch'.
    replicates: Bootstrap replicates B.
    seed: Seed of the draws (fixed, so that a report is reproducible).

  Returns:
    {'cells': {(fraction, init): {'mean', 'low', 'high', 'per_seed'}},
     'differences': {fraction: {'mean', 'low', 'high', 'per_seed', 'clear', 'better'}},
     'savings': {fraction: {'saving': Saving, 'low', 'high'}}, 'num_tiles', 'num_seeds'}.
    'better' is 'pretrained', 'scratch' or None (not clear at the interval's level).
  """
  shapes = {key: _shape(task, stats) for key, stats in cells.items()}
  if len(set(shapes.values())) != 1:
    raise ValueError(f'cells differ in (seeds, tiles): {shapes}')
  num_seeds, num_tiles = next(iter(shapes.values()))
  tile_counts, seed_counts = draws(num_tiles, num_seeds, replicates, seed)
  ones = np.ones((1, num_tiles))
  out: dict[str, Any] = {'cells': {}, 'differences': {}, 'savings': {},
                         'num_tiles': num_tiles, 'num_seeds': num_seeds, 'replicates': replicates}
  replicated = {}
  for key, stats in cells.items():
    per_seed = tile_metric(task, stats, ones)[0]
    # Seed-resampled mean of each replicate: seed s counted seed_counts[b, s] times.
    replicated[key] = (tile_metric(task, stats, tile_counts) * seed_counts).sum(-1) / num_seeds
    low, high = interval(replicated[key])
    out['cells'][key] = {'mean': float(per_seed.mean()), 'low': low, 'high': high,
                         'per_seed': per_seed.tolist()}
  fractions = sorted({f for f, _ in cells})
  for f in fractions:
    if (f, 'pretrained') not in cells or (f, 'scratch') not in cells:
      continue
    pre, scr = out['cells'][(f, 'pretrained')], out['cells'][(f, 'scratch')]
    low, high = interval(replicated[(f, 'pretrained')] - replicated[(f, 'scratch')])
    clear = bool(low > 0 or high < 0)
    better = None
    if clear:
      better = 'pretrained' if (low > 0) == higher_is_better else 'scratch'
    out['differences'][f] = {
        'mean': pre['mean'] - scr['mean'], 'low': low, 'high': high, 'clear': clear,
        'better': better,
        'per_seed': (np.asarray(pre['per_seed']) - np.asarray(scr['per_seed'])).tolist()}
  both = [f for f in fractions if (f, 'pretrained') in cells and (f, 'scratch') in cells]
  if both:
    point = monotone_savings(both, [out['cells'][(f, 'pretrained')]['mean'] for f in both],
                             [out['cells'][(f, 'scratch')]['mean'] for f in both],
                             higher_is_better)
    values = np.empty((replicates, len(both)))
    pre_rep = np.stack([replicated[(f, 'pretrained')] for f in both], -1)
    scr_rep = np.stack([replicated[(f, 'scratch')] for f in both], -1)
    for b in range(replicates):
      values[b] = [s.value for s in monotone_savings(both, pre_rep[b], scr_rep[b],
                                                     higher_is_better)]
    for i, f in enumerate(both):
      low, high = interval(values[:, i])
      out['savings'][f] = {'saving': point[i], 'low': low, 'high': high}
  return out


def _shape(task: str, stats: Mapping[str, np.ndarray]) -> tuple[int, int]:
  array = stats['sq_error'] if task == 'vcf' else stats['confusion']
  return tuple(np.shape(array)[:2])
