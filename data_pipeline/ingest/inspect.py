r"""Looks inside a mae_jax dataset: counts, value ranges, label histograms and a few rendered tiles.

  python -m data_pipeline.ingest.inspect DIR [--sample 256] [--num_tiles 4] [--output DIR/inspect]

Prints examples per split and region (a full pass over the records, images skipped undecoded),
per-channel dB percentiles and no-data fractions and the WorldCover class histogram over the
first ``--sample`` tiles of each split, VCF statistics, and the stored input contract; writes
``tiles_<split>.png`` with SAR false colour next to the WorldCover labels for ``--num_tiles``
tiles per split.
"""

from __future__ import annotations

import collections
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from data_pipeline import atomic
from data_pipeline import input as data_input
from data_pipeline import quantise
from data_pipeline import render
from data_pipeline import schema

def split_counts(builder, split: str) -> dict[str, collections.Counter]:
  """Examples per region, and VCF values, over the whole split (images are not decoded)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  skip = {schema.IMAGE: tfds.decode.SkipDecoding(), schema.WORLDCOVER: tfds.decode.SkipDecoding()}
  regions = collections.Counter()
  vcf = []
  for example in tfds.as_numpy(builder.as_dataset(split=split, decoders=skip)):
    regions[schema.REGIONS[example[schema.REGION]]] += 1
    vcf.append(float(example[schema.VCF]))
  return {'regions': regions, 'vcf': np.asarray(vcf)}


def sample_tiles(builder, split: str, count: int,
                 storage: quantise.StorageForm = quantise.FLOAT16) -> dict[str, np.ndarray]:
  """The first ``count`` tiles of ``split``: images decoded from ``storage`` to float32 dB."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images, labels = [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split).take(count)):
    images.append(storage.decode(example[schema.IMAGE]))
    labels.append(example[schema.WORLDCOVER])
  return {'image': np.stack(images), 'worldcover': np.stack(labels)}


def channel_table(images: np.ndarray, band_names) -> str:
  values = images.astype(np.float32).reshape(-1, images.shape[-1])
  lines = [f'  {"band":<22}{"p1":>8}{"p50":>8}{"p99":>8}{"no-data":>9}']
  for index, name in enumerate(band_names):
    column = values[:, index]
    valid = column[np.isfinite(column)]
    p1, p50, p99 = np.percentile(valid, [1, 50, 99]) if valid.size else (np.nan,) * 3
    lines.append(f'  {name:<22}{p1:8.2f}{p50:8.2f}{p99:8.2f}{1 - valid.size / column.size:9.1%}')
  return '\n'.join(lines)


def class_table(labels: np.ndarray) -> str:
  counts = np.bincount(labels.reshape(-1), minlength=256)
  total = counts.sum()
  lines = []
  for index, name in enumerate(schema.WORLDCOVER_NAMES):
    lines.append(f'  {index:>2} {schema.WORLDCOVER_CODES[index]:>3} {name:<24}'
                 f'{counts[index] / total:7.1%}')
  lines.append(f'  -- no data {"":<24}{counts[schema.IGNORE_INDEX] / total:7.1%}')
  return '\n'.join(lines)


def tile_sheet(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Rows of (summer false colour | WorldCover) with a 4 px white gutter."""
  rows = []
  for image, label in zip(images, labels):
    sar = render.sar_false_colour(image.astype(np.float32))
    gutter = np.full((sar.shape[0], 4, 3), 255, np.uint8)
    rows.append(np.concatenate([sar, gutter, render.worldcover_colour(label)], axis=1))
    rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
  return np.concatenate(rows[:-1], axis=0)


def inspect(data_dir: str, sample: int, num_tiles: int, output: str) -> str:
  """Returns the report text and writes the PNGs."""
  dataset = data_input.HostDataset(data_dir, 'train', process_index=0, process_count=1)
  builder, contract = dataset.builder, dataset.contract
  os.makedirs(output, exist_ok=True)
  report = [f'{data_dir}: {builder.info.description}',
            f'tiles {contract.tile_size} px, bands {", ".join(contract.band_names)}',
            f'units {contract.units}, clip {contract.clip_range}, stored as '
            f'{contract.storage_summary()} ({contract.quantisation}), composite: '
            f'{contract.composite}']
  for split in builder.info.splits:
    counts = split_counts(builder, split)
    total = sum(counts['regions'].values())
    regions = ', '.join(f'{name} {n}' for name, n in sorted(counts['regions'].items()))
    vcf = counts['vcf']
    finite = vcf[np.isfinite(vcf)]
    report.append(f'\n[{split}] {total} tiles ({regions})')
    if finite.size:
      report.append(f'  VCF tree cover: mean {finite.mean():.1f} %, median {np.median(finite):.1f} %, '
                    f'range {finite.min():.1f}..{finite.max():.1f} %, missing {vcf.size - finite.size}')
    tiles = sample_tiles(builder, split, min(sample, total), quantise.form_of(contract))
    report.append(f'  backscatter (dB) over {len(tiles["image"])} tiles:')
    report.append(channel_table(tiles['image'], contract.band_names))
    report.append('  WorldCover classes:')
    report.append(class_table(tiles['worldcover']))
    path = os.path.join(output, f'tiles_{split}.png')
    sheet = tile_sheet(tiles['image'][:num_tiles], tiles['worldcover'][:num_tiles])
    render.write_png(path, sheet)
    report.append(f'  rendered {min(num_tiles, total)} tiles to {path}')
  text = '\n'.join(report)
  atomic.write_bytes(os.path.join(output, 'report.txt'), text.encode())
  return text


def main(argv):
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # TFDS logs every dataset it opens at INFO.
  if len(argv) != 2:
    raise app.UsageError('usage: python -m data_pipeline.ingest.inspect DIR [--flags]')
  data_dir = argv[1]
  values = flags.FLAGS
  print(inspect(data_dir, values.sample, values.num_tiles,
                values.output or os.path.join(data_dir, 'inspect')))


def console_main() -> None:
  """The command (``python -m`` or setup.py's console script ``mae-jax-inspect-dataset``)."""
  # Flags are defined here, not at import, so importing this module next to other command-line
  # modules (tests, notebooks) defines nothing twice.
  flags.DEFINE_integer('sample', 256, 'Tiles per split for value and label statistics.')
  flags.DEFINE_integer('num_tiles', 4, 'Tiles per split rendered to PNG.')
  flags.DEFINE_string('output', '', 'Folder for the PNGs and report (default DIR/inspect).')
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
