r"""Builds a pre-sharded TFDS dataset of 12-channel tiles from real Sentinel-1 data.

  python -m data_pipeline.ingest.build --config configs/data/<source>.py --output DIR [--config.x=y]

``config.source`` picks the input (``data_pipeline/ingest/sources/``); ``config.storage`` how the
images are stored (``'float16'`` dB, the default, or ``'uint8'`` codes: ``data_pipeline.quantise``):

* ``m3leo`` (``configs/data/m3leo.py``): the poster authors' released chips;
* ``geotiff`` (``configs/data/geotiff.py``): GeoTIFFs per acquisition, or ready composites;
* ``earth_engine`` (``configs/data/earth_engine.py``): Earth Engine TFRecord patch exports.

The source plans the tiles, their files and splits before reading a pixel; the writer
(``data_pipeline.writer``, the one the embedded dataset uses) then runs one job per shard, in
parallel worker processes, resumably. Afterwards ``split_map.png`` in the output folder
shows every planned tile's centre coloured by split (including tiles later skipped for too little
valid data). Bad input stops the build with an error naming the
file; finished shards stay for a resume and no TFDS metadata is written, so no reader ever opens
a half-built dataset. ``--overwrite`` replaces only a dataset the writer made (never a folder
holding other files): the new one is built beside it and swapped in once complete, so a failed
build leaves the old dataset as it was (and its temporary folder is deleted).
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from data_pipeline import schema
from data_pipeline.ingest import labels
from data_pipeline.ingest import splits
from data_pipeline import writer

SOURCES = ('m3leo', 'geotiff', 'earth_engine')
SPLIT_MAP = writer.SPLIT_MAP


def plan(config):
  """The source's :class:`data_pipeline.ingest.sources.common.Plan` for ``config``."""
  if config.source not in SOURCES:
    raise ValueError(f'config.source {config.source!r} is not one of {SOURCES}')
  module = importlib.import_module(f'data_pipeline.ingest.sources.{config.source}')
  return module.plan(config)


def build(config, output: str, overwrite: bool = False, progress: bool = False):
  """Builds the dataset of ``config`` into ``output``; returns (contract, report).

  ``output`` is checked first (a foreign or read-only folder, or a dataset without
  ``overwrite``, stops the build before planning); see :func:`writer.build_dataset`.
  """
  writer.check_output(output, overwrite)
  build_plan = plan(config)
  if not build_plan.units:
    raise ValueError(f'config gives no tiles at all (left out: {build_plan.left_out})')
  lon = [v for split in schema.SPLITS for v in build_plan.centres.get(split, ([], []))[0]]
  lat = [v for split in schema.SPLITS for v in build_plan.centres.get(split, ([], []))[1]]
  names = [split for split in schema.SPLITS for _ in build_plan.centres.get(split, ([], []))[0]]
  title = f'{os.path.basename(os.path.abspath(output))}: tiles by split'
  # The source says what the pixels are; the config how they are stored.
  contract = build_plan.contract.with_storage(config.get('storage', schema.STORAGE_DTYPE))
  contract, report = writer.build_dataset(
      output, build_plan.units, build_plan.make_examples, contract,
      num_shards=config.num_shards, host_count=config.host_count, workers=config.workers,
      overwrite=overwrite, progress=progress, description=build_plan.description,
      statistics_by_region=config.get('statistics_by_region', False),
      extra_files=lambda folder: splits.split_map_png(os.path.join(folder, SPLIT_MAP), lon, lat,
                                                      names, title=title))
  report['left_out'] = build_plan.left_out
  return contract, report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from data_pipeline import input as data_input  # pylint: disable=g-import-not-at-top
  data_input.configure_tensorflow()
  t0 = time.perf_counter()
  try:
    _, report = build(flags.FLAGS.config, flags.FLAGS.output, flags.FLAGS.overwrite,
                      progress=True)
  except (FileExistsError, PermissionError, FileNotFoundError, ValueError,
          labels.RasterReadError) as e:
    # The output folder, a missing input, a bad config or data without a usable pixel: the
    # message names what and where, so no traceback.
    print(f'data_pipeline.ingest.build: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)
  tiles = sum(v['examples'] for k, v in report.items() if k in schema.SPLITS)
  elapsed = time.perf_counter() - t0
  print(f'Wrote {tiles} tiles to {flags.FLAGS.output} in {elapsed:.1f} s '
        f'({tiles / elapsed:.1f} tiles/s): {report}')


def console_main() -> None:
  """The command (``python -m`` or setup.py's console script ``mae-jax-build-dataset``)."""
  # Flags are defined here, not at import, so importing this module defines nothing.
  config_flags.DEFINE_config_file('config', None, 'configs/data/<file>.py', lock_config=True)
  flags.DEFINE_string('output', None, 'Dataset folder to create (or to resume).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing dataset made by this writer '
                    '(built beside it, swapped in once complete; other folders are refused).')
  flags.mark_flags_as_required(['config', 'output'])
  from data_pipeline import console  # pylint: disable=g-import-not-at-top
  console.run(main, __name__)


if __name__ == '__main__':
  console_main()
