r"""Builds the embedded synthetic Sentinel-1-like dataset as pre-sharded TFRecords + TFDS metadata.

  python -m data_pipeline.build_synthetic --output data/synthetic_tiny --tile_size 128 \
      --train 768 --validation 128 --test 640 --num_shards 8 [--storage uint8]

Tiles come from :mod:`data_pipeline.synthetic` (deterministic in --seed and the tile index);
splits use disjoint index ranges. The writer (:mod:`data_pipeline.writer`) is the one real data
uses: shards are written in parallel (--workers), an interrupted build resumes when run again,
TFDS opens the folder only once it is complete, and --overwrite replaces only a dataset the
writer made, once the new one is complete. --storage picks how images are stored
(``data_pipeline.quantise``): float16 dB (the default) or uint8 codes (half the bytes).
"""

from __future__ import annotations

import functools
import os
import sys
import time

from absl import flags

from data_pipeline import schema
from data_pipeline import synthetic
from data_pipeline import writer

_OUTPUT = flags.DEFINE_string('output', None, 'Dataset folder to create.')
_TILE_SIZE = flags.DEFINE_integer('tile_size', 448, 'Tile side in pixels (10 m).')
_TRAIN = flags.DEFINE_integer('train', 768, 'Training tiles.')
_VALIDATION = flags.DEFINE_integer('validation', 128, 'Validation tiles.')
_TEST = flags.DEFINE_integer('test', 128, 'Test tiles.')
_NUM_SHARDS = flags.DEFINE_integer('num_shards', 8, 'Files per split (multiple of host_count).')
_HOST_COUNT = flags.DEFINE_integer('host_count', 1, 'Hosts that will read the dataset.')
_SEED = flags.DEFINE_integer('seed', 0, 'Generator seed.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing dataset made by this '
                               'writer (built beside it, swapped in once complete; other '
                               'folders are refused).')
_SKIP_EXISTING = flags.DEFINE_bool('skip_existing', False,
                                   'Do nothing if a complete dataset already exists there.')
_STORAGE = flags.DEFINE_enum(
    'storage', schema.STORAGE_DTYPE, schema.STORAGE_DTYPES,
    'How images are stored: float16 dB, or uint8 codes over fixed per-product dB ranges '
    '(schema.UINT8_RANGE_DB; half the bytes, at most half a code step of error).')
_WORKERS = flags.DEFINE_integer(
    'workers', 1, 'Processes writing shards in parallel. Each worker starts TensorFlow (~5 s), '
    'so more than 1 pays off only for builds of minutes (e.g. thousands of 448 px tiles).')


def tile_example(tile: synthetic.SyntheticTile) -> dict:
  return {schema.IMAGE: tile.image, schema.WORLDCOVER: tile.worldcover, schema.VCF: tile.vcf,
          schema.LAT: tile.lat, schema.LON: tile.lon, schema.REGION: tile.region,
          schema.TILE_ID: tile.tile_id, **schema.NOT_GEOREFERENCED,
          schema.SOURCES: f'synthetic:{tile.tile_id}'}


def synthetic_examples(index: int, seed: int, tile_size: int) -> list[dict]:
  """The work unit of the synthetic dataset: one tile index gives one tile."""
  return [tile_example(synthetic.generate_tile(seed, index, tile_size))]


def split_units(train: int, validation: int, test: int) -> dict[str, list[int]]:
  """Disjoint tile-index ranges per split."""
  return {'train': list(range(train)),
          'validation': list(range(train, train + validation)),
          'test': list(range(train + validation, train + validation + test))}


def build(output: str, tile_size: int, train: int, validation: int, test: int, num_shards: int,
          host_count: int = 1, seed: int = 0, overwrite: bool = False, workers: int = 1,
          progress: bool = False, storage: str = schema.STORAGE_DTYPE) -> schema.InputContract:
  units = {name: ids for name, ids in split_units(train, validation, test).items() if ids}
  contract = schema.InputContract(tile_size=tile_size,
                                  composite=schema.COMPOSITE_METHOD_SYNTHETIC
                                  ).with_storage(storage)
  description = (f'Synthetic Sentinel-1-like tiles (seed {seed}, {tile_size} px) from '
                 'data_pipeline.synthetic')
  make_examples = functools.partial(synthetic_examples, seed=seed, tile_size=tile_size)
  contract, _ = writer.build_dataset(output, units, make_examples, contract,
                                     num_shards=num_shards, host_count=host_count,
                                     workers=workers, description=description,
                                     overwrite=overwrite, progress=progress)
  return contract


def main(argv):
  del argv
  output = _OUTPUT.value
  if _SKIP_EXISTING.value and os.path.exists(os.path.join(output, 'dataset_info.json')):
    print(f'{output} already exists; nothing to do.')
    return
  t0 = time.perf_counter()
  try:
    contract = build(output, _TILE_SIZE.value, _TRAIN.value, _VALIDATION.value, _TEST.value,
                     _NUM_SHARDS.value, _HOST_COUNT.value, _SEED.value, _OVERWRITE.value,
                     workers=_WORKERS.value, progress=True, storage=_STORAGE.value)
  except (FileExistsError, PermissionError) as e:  # The output folder: the message says it.
    print(f'data_pipeline.build_synthetic: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  total = _TRAIN.value + _VALIDATION.value + _TEST.value
  elapsed = time.perf_counter() - t0
  print(f'Wrote {total} tiles of {_TILE_SIZE.value} px ({contract.storage_summary()}) to '
        f'{output} in {elapsed:.1f} s ({total / elapsed:.1f} tiles/s).')
  print('Training-split channel means (dB): ' + ', '.join(f'{m:.2f}' for m in contract.mean))


def console_main() -> None:
  """The ``mae-jax-synthetic-dataset`` command (setup.py's console script)."""
  flags.mark_flag_as_required('output')
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
