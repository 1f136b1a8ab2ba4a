"""Which records to train on: label fractions and region / label-availability selections.

Fine-tuning with a fraction of the labels follows the poster's authors: the labelled subset for
fraction ``f`` is the first ``k`` tile ids of a seeded permutation of the sorted unique tile ids.
Drawing from the *sorted ids*, not from records in file order, makes a subset depend only on
(ids, fraction, seed), not on how the dataset was sharded or written; taking a prefix of one
permutation makes the subsets of a seed nested (the 0.1 % tiles are among the 1 % tiles, and so
on), so results across fractions differ by the amount of labels only.

:func:`select_records` turns a split index (``data_pipeline.input.read_split_index``) into global
record indices for ``HostDataset(records=...)``: fine-tuning uses it for its training set,
pretraining can use it to keep only the pretraining regions.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from data_pipeline import schema

# The label fractions fine-tuning is run at (0.1 %, 1 %, 10 %, 100 % of the labelled tiles).
LABEL_FRACTIONS = (0.001, 0.01, 0.1, 1.0)

# Values of select_records(labelled=...).
_LABELS = (None, schema.VCF, schema.WORLDCOVER)


def subset_size(num_tiles: int, fraction: float) -> int:
  """Tiles in the subset for ``fraction`` of ``num_tiles``: max(1, floor(f * N + 0.5)).

  Rounds half up, the same for every fraction (Python's round() would round half to even), and
  never gives an empty subset: a tiny fraction of a small set is still one tile.
  """
  return min(num_tiles, max(1, math.floor(fraction * num_tiles + 0.5)))


def _as_str(tile_id) -> str:
  return tile_id.decode() if isinstance(tile_id, bytes) else str(tile_id)


def label_subset(tile_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
  """Indices into ``tile_ids`` of the labelled subset for ``fraction`` (sorted, int64).

  The subset is the first :func:`subset_size` ids of
  ``np.random.default_rng(seed).permutation`` of the sorted ids: for one seed, the subsets of
  smaller fractions are contained in those of larger ones, and the ids chosen do not depend on
  the order of ``tile_ids``.

  Args:
    tile_ids: Unique tile ids (str; bytes are decoded as UTF-8).
    fraction: Fraction of the tiles to keep, in (0, 1].
    seed: Seed of the permutation (non-negative int).

  Raises:
    ValueError: ``fraction`` outside (0, 1], no tile ids, or a tile id given twice.
  """
  if not 0 < fraction <= 1:  # Also refuses NaN.
    raise ValueError(f'label fraction must lie in (0, 1], got {fraction}')
  ids = [_as_str(t) for t in tile_ids]
  if not ids:
    raise ValueError('no tile ids to draw a label subset from')
  order = sorted(range(len(ids)), key=ids.__getitem__)
  for a, b in zip(order, order[1:]):
    if ids[a] == ids[b]:
      raise ValueError(f'tile id {ids[a]!r} appears more than once (at {a} and {b}); label '
                       'subsets are drawn over unique tiles')
  permutation = np.random.default_rng(seed).permutation(len(ids))
  chosen = permutation[:subset_size(len(ids), fraction)]
  return np.sort(np.asarray(order, np.int64)[chosen])


def select_records(index: Mapping[str, np.ndarray], *, regions: Sequence[str] | None = None,
                   labelled: str | None = None, fraction: float = 1.0,
                   seed: int = 0) -> np.ndarray:
  """Global record indices (sorted, int64) of the records to read, from a split index.

  In this order: (1) keep records whose region is in ``regions``; (2) keep those with the label
  ``labelled`` available; (3) draw the label ``fraction`` among what is left with
  :func:`label_subset` on their tile ids. The fraction is thus a fraction of the usable tiles,
  and for one seed and filter the selections of growing fractions are nested.

  Args:
    index: From ``data_pipeline.input.read_split_index``: ``schema.TILE_ID`` always,
      ``schema.REGION`` when ``regions`` is given, ``schema.VCF`` when ``labelled='vcf'``.
    regions: Region names from ``schema.REGIONS`` (e.g. ``schema.PRETRAIN_REGIONS``); None: all.
    labelled: None (no filter); ``'vcf'``: a finite VCF tree cover (NaN marks a tile without
      one); ``'worldcover'``: no filter, as every tile carries a WorldCover map (a map that is
      all ``schema.IGNORE_INDEX`` would need the map read, which this index does not hold).
    fraction: Label fraction in (0, 1]; 1 keeps every remaining record.
    seed: Seed of the label subset.

  Raises:
    ValueError: Unknown regions or label, a missing index entry, or nothing left to select.
  """
  if labelled not in _LABELS:
    raise ValueError(f'labelled must be one of {_LABELS}, got {labelled!r}')
  if schema.TILE_ID not in index:
    raise ValueError(f'the index has no {schema.TILE_ID!r}; read it with read_split_index')
  keep = np.ones(len(index[schema.TILE_ID]), bool)
  what = []
  if regions is not None:
    if isinstance(regions, str):
      regions = (regions,)
    unknown = [r for r in regions if r not in schema.REGIONS]
    if unknown:
      raise ValueError(f'unknown regions {unknown}; known: {schema.REGIONS}')
    if schema.REGION not in index:
      raise ValueError(f'the index has no {schema.REGION!r} to select regions by')
    codes = [schema.REGIONS.index(r) for r in regions]
    keep &= np.isin(np.asarray(index[schema.REGION]), codes)
    what.append(f'in regions {list(regions)}')
  if labelled == schema.VCF:
    if schema.VCF not in index:
      raise ValueError(f'the index has no {schema.VCF!r} to check VCF labels by')
    keep &= np.isfinite(np.asarray(index[schema.VCF], np.float64))
    what.append('with a VCF label')
  candidates = np.flatnonzero(keep)
  if not candidates.size:
    raise ValueError(f'no records {" ".join(what) or "in the index"} '
                     f'(out of {len(keep)} records)')
  ids = [index[schema.TILE_ID][i] for i in candidates]
  return candidates[label_subset(ids, fraction, seed)].astype(np.int64)
