"""Physics checks on prediction inputs: pixel size, CRS and units against the input contract.

A scene on another grid than the model's (20 m, 5 m, EPSG:4326) is resampled onto the model's
10 m grid in a projected CRS, bilinearly in linear power, and the map is written on that grid
(``mae_jax.tools.scene_grid``); ``--noresample`` refuses it instead. Stated units that the
values clearly contradict are refused naming ``--units``. Every decision is one line.

The truths are independent of the resampling code: scenes whose linear power is a linear
function of the map coordinates, which bilinear interpolation reproduces exactly, evaluated
here at the 10 m pixel centres; and a checkerboard whose power mean and dB mean differ by
2.4 dB. The tests that predict use a tiny initialised model (no training: the checks are about
the inputs, not the weights) and the scene helpers of ``tests/test_predict.py``.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import rasterio.crs
import rasterio.warp
from rasterio.transform import from_origin

from configs import downstream as downstream_configs
from data_pipeline import quantise
from data_pipeline import schema
from mae_jax.tools import inference
from mae_jax.tools import predict
from mae_jax.tools import scene_grid
from mae_jax.tools import scene_reader
from tests.test_predict import CRS, read_map, write_tif

UTM = rasterio.crs.CRS.from_string(CRS)
LEFT, TOP = 499_980.0, 5_300_040.0  # On the 20 m lattice, so a 20 m scene keeps its extent.
SIDE_M = 640.0  # 64 px at 10 m, 32 px at 20 m, 128 px at 5 m.
RESAMPLED_20M = 'pixel size 20 m -> resampled to 10 m (bilinear in linear power)'
# float16 storage of values around -10 dB: < 0.004 dB.
DB_ATOL = 0.01


def linear_power_scene(pixel_size, side_m=SIDE_M):
  """(12, H, W) float32 dB on a ``pixel_size`` grid from (LEFT, TOP): in every band the linear
  power (the ratio for VV-VH) is a linear function of the map coordinates, different per band."""
  n = int(round(side_m / pixel_size))
  centres = (np.arange(n) + 0.5) * pixel_size
  x, y = np.meshgrid(centres, centres)  # Metres right of LEFT, below TOP.
  bands = []
  for b in range(schema.NUM_CHANNELS):
    if b < 4:  # VV-VH: ratios 2 .. 6, i.e. +3 .. +8 dB.
      power = 2.0 + (b + 1) * x / side_m + y / side_m
    else:  # VV and VH: 0.01 .. 0.25, i.e. -20 .. -6 dB.
      power = 0.01 + 0.02 * (b % 4 + 1) * x / side_m + 0.1 * y / side_m
    bands.append(10.0 * np.log10(power))
  return np.stack(bands).astype(np.float32)


def write_scene(path, image, pixel_size):
  """A scene in UTM zone 33N (``tests.test_predict.write_tif``) at (LEFT, TOP)."""
  return write_tif(path, image, transform=from_origin(LEFT, TOP, pixel_size, pixel_size))


def geographic_scene(path, shape=(60, 80)):
  """A 12-band EPSG:4326 scene at Earth Engine's "10 m" (8.983e-5 degrees) near 15.1 E 45 N
  (UTM zone 33N): constant VV-VH, VV and VH per band. Returns (path, the 12 values)."""
  values = np.array([6.0, 6.5, 7.0, 7.5, -11.0, -11.5, -12.0, -12.5, -17.0, -18.0, -19.0,
                     -20.0], np.float32)
  image = np.broadcast_to(values[:, None, None], (12,) + shape).copy()
  with rasterio.open(path, 'w', driver='GTiff', width=shape[1], height=shape[0], count=12,
                     dtype='float32', crs='EPSG:4326',
                     transform=from_origin(15.1, 45.0, 8.983e-5, 8.983e-5)) as out:
    out.write(image)
  return str(path), values


def read_all(scene):
  """The whole scene through SceneReader, (H, W, 12) float32 dB (NaN = no-data)."""
  reader = scene_reader.SceneReader(scene, quantise.FLOAT16)
  try:
    return reader.read(0, 0, max(scene.height, scene.width))[:scene.height, :scene.width].astype(
        np.float32)
  finally:
    reader.close()


# --- The grid decision alone ---------------------------------------------------------------


def grid(crs, transform, width=100, height=100):
  return scene_grid.Grid(None if crs is None else rasterio.crs.CRS.from_user_input(crs),
                         transform, width, height)


def test_model_grid_decisions():
  ten = from_origin(LEFT, TOP, 10.0, 10.0)
  # The model's grid, and within the 1 % tolerance: read as stored.
  for transform in (ten, from_origin(LEFT, TOP, 10.04, 10.04)):
    target, line = scene_grid.model_grid(grid(CRS, transform), 10.0)
    assert target is None and 'resampled' not in line and "the model's grid" in line
  # 20 m in UTM: the same CRS and extent, twice the pixels.
  target, line = scene_grid.model_grid(grid(CRS, from_origin(LEFT, TOP, 20.0, 20.0)), 10.0)
  assert line == RESAMPLED_20M
  assert (target.crs, target.transform, target.width, target.height) == (UTM, ten, 200, 200)
  # A contract of 20 m pixels takes a 20 m scene as it is.
  assert scene_grid.model_grid(grid(CRS, from_origin(LEFT, TOP, 20.0, 20.0)), 20.0)[0] is None
  # Projected in US feet: the UTM zone of the centre (NY state plane -> zone 18N).
  target, line = scene_grid.model_grid(grid('EPSG:2263', from_origin(980_000, 200_000, 30, 30)),
                                       10.0)
  assert line.startswith('CRS EPSG:2263 is not projected in metres -> resampled to EPSG:32618')
  assert target.crs == rasterio.crs.CRS.from_epsg(32618) and target.transform.a == 10.0
  # A rotated grid: north-up 10 m pixels in its own CRS.
  rotated = ten * rasterio.Affine.rotation(10)
  target, line = scene_grid.model_grid(grid(CRS, rotated), 10.0)
  assert 'pixels of 10 x 10 m, not north-up squares -> resampled to 10 m' in line
  assert target.crs == UTM and target.transform.b == 0 and target.transform.a == 10.0
  # No CRS: nothing to check against; read as stored, and said so.
  target, line = scene_grid.model_grid(grid(None, ten), 10.0)
  assert target is None and line.startswith('no CRS')
  # Resampling off: refused, naming the flag.
  with pytest.raises(ValueError, match='pixel size 20 m.*--noresample'):
    scene_grid.model_grid(grid(CRS, from_origin(LEFT, TOP, 20.0, 20.0)), 10.0, resample=False)
  assert scene_grid.model_grid(grid(CRS, ten), 10.0, resample=False)[0] is None


def test_contracts_without_a_pixel_size_load_as_10_m():
  old = schema.InputContract().to_dict()
  del old['pixel_size_m']
  assert schema.InputContract.from_dict(old).pixel_size_m == schema.PIXEL_SIZE_M == 10.0


# --- Reading resampled scenes --------------------------------------------------------------


def test_10m_utm_scene_is_read_as_stored(tmp_path):
  image = linear_power_scene(10.0)
  scene = scene_reader.on_grid(scene_reader.open_scene([write_scene(tmp_path / 's.tif', image,
                                                                    10.0)]))
  assert scene.files_grid is None
  assert scene.decisions == ('units: dB detected', "pixel size 10 m, EPSG:32633: the model's grid")
  assert not any('resampl' in line for line in scene.decisions)
  np.testing.assert_array_equal(read_all(scene),
                                image.transpose(1, 2, 0).astype(np.float16).astype(np.float32))


def test_20m_scene_is_resampled_onto_the_10m_grid_of_its_extent(tmp_path):
  path = write_scene(tmp_path / 's20.tif', linear_power_scene(20.0), 20.0)
  scene = scene_reader.on_grid(scene_reader.open_scene([path]))
  assert scene.decisions == ('units: dB detected', RESAMPLED_20M)
  # The grid the 10 m scene of the same extent is on.
  assert (scene.crs, scene.transform, scene.width, scene.height) == (
      UTM, from_origin(LEFT, TOP, 10.0, 10.0), 64, 64)
  values = read_all(scene)
  truth = linear_power_scene(10.0).transpose(1, 2, 0)
  # Bilinear in linear power is exact on a field linear in power, wherever a pixel centre has
  # source centres on both sides (all but the outermost 10 m pixels, 5 m from the edge).
  np.testing.assert_allclose(values[1:-1, 1:-1], truth[1:-1, 1:-1], rtol=0, atol=DB_ATOL)
  assert np.isfinite(values).all()  # The edge pixels are not lost.
  # Applying the check again starts from the files: the same scene.
  assert scene_reader.on_grid(scene) == scene
  # Resampling off: refused.
  with pytest.raises(ValueError, match=r's20.tif: pixel size 20 m, .*--noresample'):
    scene_reader.on_grid(scene, resample=False)


def test_coarsening_averages_linear_power_not_db(tmp_path):
  # 5 m checkerboard of -5 and -15 dB: a 10 m pixel's power mean is -7.4 dB, the dB mean -10.
  cells = np.indices((128, 128)).sum(axis=0) % 2
  image = np.where(cells[None], -5.0, -15.0).repeat(12, axis=0).astype(np.float32)
  image[:4] = 6.0  # VV-VH.
  path = write_scene(tmp_path / 's5.tif', image, 5.0)
  scene = scene_reader.on_grid(scene_reader.open_scene([path]))
  assert scene.decisions[1] == 'pixel size 5 m -> resampled to 10 m (bilinear in linear power)'
  assert (scene.width, scene.height) == (64, 64)
  vv = read_all(scene)[1:-1, 1:-1, 4:]
  power_mean = 10 * np.log10((10 ** -0.5 + 10 ** -1.5) / 2)
  np.testing.assert_allclose(vv, power_mean, atol=0.05)


def test_geographic_scene_is_resampled_onto_its_utm_zone(tmp_path):
  path, values = geographic_scene(tmp_path / 'g.tif')
  scene = scene_reader.on_grid(scene_reader.open_scene([path]))
  assert scene.decisions[1] == ('CRS EPSG:4326 is geographic -> resampled to EPSG:32633, 10 m '
                                '(bilinear in linear power)')
  assert scene.crs == UTM and scene.transform.a == 10.0 and scene.transform.e == -10.0
  # The grid covers the scene: its bounds in UTM lie inside the grid's.
  with rasterio.open(path) as src:
    left, bottom, right, top = rasterio.warp.transform_bounds(src.crs, UTM, *src.bounds)
  g = scene.transform
  assert g.c <= left and g.f >= top
  assert g.c + 10 * scene.width >= right and g.f - 10 * scene.height <= bottom
  # 80 x 8.983e-5 degrees east at 45 N is 565 m (57 px at 10 m); 60 x 8.983e-5 north is 599 m.
  assert (scene.width, scene.height) == (57, 61)
  image = read_all(scene)
  inside = np.isfinite(image[..., 4])
  assert inside.mean() > 0.95
  np.testing.assert_allclose(image[inside], np.broadcast_to(values, image.shape)[inside],
                             atol=DB_ATOL)
  with pytest.raises(ValueError, match='CRS EPSG:4326 is geographic.*--noresample'):
    scene_reader.on_grid(scene, resample=False)


# --- Units -----------------------------------------------------------------------------------


def test_stated_units_that_the_values_contradict_are_refused(tmp_path):
  db = linear_power_scene(10.0)
  db_path = write_scene(tmp_path / 'db.tif', db, 10.0)
  linear_path = write_scene(tmp_path / 'linear.tif', 10 ** (db / 10), 10.0)
  with pytest.raises(ValueError, match=r'db.tif: --units linear contradicts the values: dB '
                                       r'detected.*give --units dB'):
    scene_reader.open_scene([db_path], units='linear')
  with pytest.raises(ValueError, match='--units dB contradicts the values: linear detected'):
    scene_reader.open_scene([linear_path], units='dB')
  assert scene_reader.open_scene([linear_path]).decisions == (
      'units: linear power detected -> converted to dB',)
  assert scene_reader.open_scene([db_path], units='dB').decisions == (
      'units: dB (stated with --units; detected too)',)
  # Ambiguous values (all positive dB, median above the linear range): the statement stands.
  bright = write_scene(tmp_path / 'bright.tif', np.abs(db) + 2.0, 10.0)
  with pytest.raises(ValueError, match='cannot tell dB from linear power'):
    scene_reader.open_scene([bright])
  scene = scene_reader.open_scene([bright], units='dB')
  assert scene.units == 'dB'
  assert scene.decisions == ('units: dB (stated with --units; the values do not tell)',)


# --- Maps ------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """A 32 px VCF model, initialised (not trained), saved as a fine-tuning checkpoint."""
  config = downstream_configs.build('vcf', 'finetune', 'tiny')
  config.model.image_size = 32
  config.model.encoder.update(dict(width=32, depth=1, heads=2, mlp_dim=64))
  config.head.options = {'hidden': (16, 8)}
  contract = schema.InputContract(tile_size=32, mean=(6.0,) * 4 + (-11.0,) * 4 + (-17.0,) * 4,
                                  std=(3.0,) * 12)
  workdir = str(tmp_path_factory.mktemp('model'))
  inference.save_initialised(config, workdir, contract)
  return workdir


@pytest.mark.integration
def test_20m_scene_map_is_on_the_10m_grid_and_matches_the_10m_map(model, tmp_path):
  loaded = inference.load_downstream(model)
  maps, lines = {}, []
  for pixel_size in (10.0, 20.0):
    # 128 px at 10 m: 32 px windows at 0, 28, 56, 84 and 96 down and across.
    image = linear_power_scene(pixel_size, side_m=1280.0)
    path = write_scene(tmp_path / f's{pixel_size:g}.tif', image, pixel_size)
    maps[pixel_size] = str(tmp_path / f'map{pixel_size:g}.tif')
    predict.predict_scene(loaded, [path], maps[pixel_size], batch_size=8, progress=False,
                          log=lines.append)
  assert lines.count(RESAMPLED_20M) == 1
  assert "pixel size 10 m, EPSG:32633: the model's grid" in lines
  with rasterio.open(maps[20.0]) as resampled, rasterio.open(maps[10.0]) as reference:
    assert (resampled.crs, resampled.transform, resampled.shape) == (
        reference.crs, reference.transform, reference.shape)
    assert RESAMPLED_20M in resampled.tags()['MAE_JAX_INPUT_DECISIONS']
  ten, twenty = read_map(maps[10.0]), read_map(maps[20.0])
  assert np.isfinite(twenty).all() and np.ptp(ten) > 1.0  # The windows do differ.
  # Rows and columns 32..95 only blend windows that hold no outermost pixel, where the inputs
  # are equal but for float16 rounding: equal maps. The outermost pixels differ by < 0.1 dB
  # (bilinear clamps at the edge where the 10 m scene continues the field), and so do the maps
  # of the windows that hold them, a little.
  np.testing.assert_allclose(twenty[32:96, 32:96], ten[32:96, 32:96], rtol=0, atol=0.01)
  np.testing.assert_allclose(twenty, ten, rtol=0, atol=0.5)


@pytest.mark.integration
def test_geographic_scene_map_is_on_its_utm_grid(model, tmp_path, capsys):
  path, _ = geographic_scene(tmp_path / 'g.tif')
  output = str(tmp_path / 'map.tif')
  predict.run(model, [path], output, batch_size=8, progress=False)
  printed = capsys.readouterr().out.splitlines()
  resampled = [line for line in printed if 'resampled' in line]
  assert resampled == ['CRS EPSG:4326 is geographic -> resampled to EPSG:32633, 10 m '
                       '(bilinear in linear power)']
  assert 'units: dB detected' in printed
  with rasterio.open(output) as src:
    assert src.crs == UTM and src.transform.a == 10.0 and src.shape == (61, 57)


def run_cli(args):
  """``python -m mae_jax.tools.predict ARGS`` in a fresh process: (exit code, output)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, '-m', 'mae_jax.tools.predict', *args], cwd=root,
                        capture_output=True, text=True, check=False)
  return done.returncode, done.stdout + done.stderr


@pytest.mark.integration
def test_cli_refuses_a_geographic_scene_with_noresample_and_db_given_as_linear(model, tmp_path):
  geographic, _ = geographic_scene(tmp_path / 'g.tif')
  db = write_scene(tmp_path / 'db.tif', linear_power_scene(10.0), 10.0)
  output = str(tmp_path / 'map.tif')
  code, text = run_cli(['--checkpoint', model, '--input', geographic, '--output', output,
                        '--noresample', '--noprogress'])
  assert code == 1, text
  assert 'error: ' in text and 'CRS EPSG:4326 is geographic' in text and '--noresample' in text
  code, text = run_cli(['--checkpoint', model, '--input', db, '--output', output,
                        '--units', 'linear', '--noprogress'])
  assert code == 1, text
  assert '--units linear contradicts the values: dB detected' in text
  assert not os.path.exists(output)
