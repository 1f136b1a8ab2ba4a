"""data_pipeline.ingest.build on a small chip set in the poster authors' layout, and Ctrl-C."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_bounds
import tensorflow_datasets as tfds

import configs.data.geotiff as geotiff_config
import configs.data.m3leo as m3leo_config
from data_pipeline.ingest import build
from data_pipeline.ingest import m3leo
from data_pipeline import schema
from data_pipeline.ingest.sources import m3leo as m3leo_source
from tests import ingest_fixtures as fx
from tests.test_data_pipeline import records
from tests.test_m3leo import CHIPS, SIZE, _build_area

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_label(path, value, bounds, count=1):
  path.parent.mkdir(parents=True, exist_ok=True)
  with rasterio.open(path, 'w', driver='GTiff', width=8, height=8, count=count, dtype='uint8',
                     crs='EPSG:4326', transform=from_bounds(*bounds, 8, 8), nodata=0) as f:
    f.write(np.full((count, 8, 8), value, np.uint8))


def test_authors_chips_become_a_tfds_dataset(tmp_path):
  aoi, written = _build_area(tmp_path)
  train_id, train_bounds = CHIPS[0]
  # Labels for the training chip only: 40 % tree cover, all tree-cover class (code 10).
  _write_label(aoi / m3leo.VCF_DATASET / f'{train_id}.tif', 40, train_bounds)
  _write_label(aoi / m3leo.WORLDCOVER_DATASET / f'{train_id}.tif', 10, train_bounds)
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.tile_size = SIZE
  config.num_shards = 1
  contract, report = build.build(config, str(tmp_path / 'ds'))

  builder = tfds.builder_from_directory(str(tmp_path / 'ds'))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
      'train': 1, 'validation': 1, 'test': 1}
  assert report['left_out'] == {str(aoi): {'not_in_split_csv': 1, 'no_s1_file': 0}}
  example = next(iter(tfds.as_numpy(builder.as_dataset('train'))))
  assert example[schema.TILE_ID].decode() == train_id
  expected = m3leo.read_s1_chip(str(aoi / m3leo.S1_DATASET / f'{train_id}.tif'))
  np.testing.assert_array_equal(example[schema.IMAGE], expected.astype(np.float16))
  assert example[schema.VCF] == 40.0
  np.testing.assert_array_equal(example[schema.WORLDCOVER], 0)  # Code 10 = class 0.
  assert example[schema.LON] == np.float32(0.5 * (train_bounds[0] + train_bounds[2]))
  assert schema.REGIONS[example[schema.REGION]] == 'europe'
  # Chips without label files keep the image and get missing labels.
  test_example = next(iter(tfds.as_numpy(builder.as_dataset('test'))))
  assert np.isnan(test_example[schema.VCF])
  assert (test_example[schema.WORLDCOVER] == schema.IGNORE_INDEX).all()
  assert contract.composite == m3leo_source.COMPOSITE and len(contract.mean) == 12
  assert written  # The fixture wrote the S1 chips that were read back above.


def test_constant_chips_are_skipped_and_counted(tmp_path):
  aoi, written = _build_area(tmp_path)
  train_id, bounds = CHIPS[0]
  bands = written[train_id].copy()
  bands[10] = 0  # A summer without ascending VH: Earth Engine fills it with 0.
  with rasterio.open(aoi / m3leo.S1_DATASET / f'{train_id}.tif', 'r+') as f:
    f.write(bands)
  config = m3leo_config.get_config()
  config.areas[0].dir = str(aoi)
  config.tile_size = SIZE
  config.num_shards = 1
  # The only training chip is constant: its shard would be empty, which the writer refuses.
  with pytest.raises(ValueError, match=r"none of its 1 units gave a tile \(skipped: "
                     r"\{'constant channel': 1\}\)"):
    build.build(config, str(tmp_path / 'ds'))


def test_command_line(tmp_path):
  aoi, _ = _build_area(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipeline.ingest.build', '--config', 'configs/data/m3leo.py',
       '--output', str(tmp_path / 'ds'), f'--config.areas[0].dir={aoi}',
       f'--config.tile_size={SIZE}', '--config.num_shards=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f'Wrote 3 tiles to {tmp_path / "ds"}' in result.stdout
  assert "'not_in_split_csv': 1" in result.stdout


# --- Ctrl-C during a parallel build ------------------------------------------------------------

# A 10 x 10 tile composite: 100 tiles (60 train, 21 validation, 19 test) in 3 x 8 shards,
# written by 2 workers.
MANY_TILES, MANY_SHARDS = 10, 8
MANY_SETTINGS = {'kind': 'composites', 'tile_size': 32, 'num_shards': MANY_SHARDS,
                 'resample_in_linear_power': False}


@pytest.fixture(scope='module')
def many_tiles(tmp_path_factory):
  """(composite path, shard name -> records of an uninterrupted build of it)."""
  folder = tmp_path_factory.mktemp('many_tiles')
  rng = np.random.default_rng(5)
  size = MANY_TILES * MANY_SETTINGS['tile_size']
  bands = (-12 + 2 * rng.standard_normal((8, size, size))).astype(np.float32)
  bands[4:] -= 6
  path = fx.write_tif(folder / 'composite.tif', bands, fx.utm_transform(),
                      descriptions=[f'{p}_{s}' for p in ('VV', 'VH') for s in schema.SEASONS])
  build.build(_many_tiles_config(path), str(folder / 'reference'))
  return path, _shard_records(folder / 'reference')


def _many_tiles_config(path):
  config = geotiff_config.get_config()
  config.areas[0].scenes = path
  config.update(MANY_SETTINGS)
  return config


def _shard_records(folder):
  """Shard name -> its records, parsed (protobuf map order may differ between processes)."""
  return {p.name: records(p) for p in folder.glob('*.tfrecord-*') if p.suffix != '.json'}


@pytest.mark.multiprocess  # A build with two worker processes, in a process of its own.
@pytest.mark.parametrize('target', ['process group', 'main process'])
def test_ctrl_c_stops_a_parallel_build_which_then_resumes(tmp_path, many_tiles, target):
  """Ctrl-C (SIGINT to the process group, as a terminal sends it, or to the main process alone)
  stops a 2-worker build within seconds without starting another shard; the rerun resumes."""
  path, reference = many_tiles
  output = tmp_path / 'ds'
  settings = [f'--config.{key}={value}' for key, value in MANY_SETTINGS.items()]
  with open(tmp_path / 'stderr.txt', 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, '-m', 'data_pipeline.ingest.build', '--config',
         'configs/data/geotiff.py', '--output', str(output), f'--config.areas[0].scenes={path}',
         '--config.workers=2', *settings],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
        # A shell runs background jobs with SIGINT ignored, and Python keeps an inherited
        # SIG_IGN: give the build the default a terminal gives it, so Ctrl-C raises there.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.monotonic() + 120
    while (not list(output.glob('*.tfrecord-*.json')) and process.poll() is None
           and time.monotonic() < deadline):
      time.sleep(0.02)
    assert process.poll() is None, (tmp_path / 'stderr.txt').read_text()[-3000:]
    done_at_signal = len(list(output.glob('*.tfrecord-*.json')))
    if target == 'process group':
      os.killpg(process.pid, signal.SIGINT)
    else:
      process.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    process.wait(timeout=60)
    took = time.monotonic() - signalled
  finally:
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGKILL)
      process.wait()
  errors = (tmp_path / 'stderr.txt').read_text()
  assert process.returncode != 0 and 'KeyboardInterrupt' in errors, errors[-3000:]
  assert took < 5, f'{took:.1f} s from Ctrl-C to exit'
  finished = [p.name for p in output.glob('*.tfrecord-*.json')]
  # No shard started after Ctrl-C: at most the two being written then were finished.
  assert len(finished) <= done_at_signal + 2 < 3 * MANY_SHARDS, finished
  assert not list(output.glob('*.incomplete*'))
  assert not (output / 'dataset_info.json').exists()
  kept = {}
  for name in finished:
    shard = (output / name[:-len('.json')]).stat()
    kept[name[:-len('.json')]] = (shard.st_ino, shard.st_mtime_ns)

  build.build(_many_tiles_config(path), str(output))  # The rerun resumes: same units, shards.
  assert _shard_records(output) == reference
  for name, identity in kept.items():  # Shards finished before Ctrl-C were kept, not rewritten.
    shard = (output / name).stat()
    assert (shard.st_ino, shard.st_mtime_ns) == identity, name
