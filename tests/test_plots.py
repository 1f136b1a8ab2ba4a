"""Tests for mae_jax.plots: false-colour stretch, reconstruction figure and atomic PNG writes."""

import os

import numpy as np
from PIL import Image
import pytest

from data_pipeline import render
from data_pipeline import schema
from mae_jax import plots


def _image(vv, vh, ratio, season='summer', shape=(2, 3)):
  """A tile with constant VV, VH, VV-VH in one season; the other seasons hold decoys."""
  image = np.full(shape + (schema.NUM_CHANNELS,), 99.0, dtype=np.float32)
  image[..., schema.band_index('vv', season)] = vv
  image[..., schema.band_index('vh', season)] = vh
  image[..., schema.band_index('vv_minus_vh', season)] = ratio
  return image


def test_false_colour_hand_computed():
  # VV -12.5 of -25..0 -> 0.5; VH -25 of -30..-5 -> 0.2; VV-VH 12 of 0..15 -> 0.8.
  rgb = render.sar_false_colour(_image(-12.5, -25.0, 12.0))
  assert rgb.shape == (2, 3, 3)
  assert rgb.dtype == np.uint8
  expected = (round(255 * 12.5 / 25), round(255 * 5 / 25), round(255 * 12 / 15))
  assert expected == (128, 51, 204)
  np.testing.assert_array_equal(rgb, np.broadcast_to(expected, (2, 3, 3)))


def test_false_colour_uses_requested_season():
  rgb = render.sar_false_colour(_image(0.0, -30.0, 7.5, season='winter'), season='winter')
  np.testing.assert_array_equal(rgb[0, 0], (255, 0, 128))
  # The decoy 99 dB values elsewhere are not read: summer of this tile is all 99 -> clipped 255.
  np.testing.assert_array_equal(render.sar_false_colour(
      _image(0.0, -30.0, 7.5, season='winter'), season='summer')[0, 0], (255, 255, 255))


def test_false_colour_clips_at_range_ends():
  low = render.sar_false_colour(_image(-60.0, -45.0, -3.0))
  high = render.sar_false_colour(_image(20.0, 5.0, 40.0))
  edge_low = render.sar_false_colour(_image(-25.0, -30.0, 0.0))
  edge_high = render.sar_false_colour(_image(0.0, -5.0, 15.0))
  assert (low == 0).all() and (edge_low == 0).all()
  assert (high == 255).all() and (edge_high == 255).all()


def test_false_colour_nan_is_black():
  image = _image(-12.5, -25.0, 12.0)
  image[0, 0, schema.band_index('vh', 'summer')] = np.nan  # one shown band missing
  image[1, 2, :] = np.nan  # whole pixel missing
  image[0, 1, schema.band_index('vh', 'winter')] = np.nan  # unshown band: no effect
  rgb = render.sar_false_colour(image)
  np.testing.assert_array_equal(rgb[0, 0], (0, 0, 0))
  np.testing.assert_array_equal(rgb[1, 2], (0, 0, 0))
  np.testing.assert_array_equal(rgb[0, 1], (128, 51, 204))


def test_false_colour_float16_and_bad_input():
  rgb = render.sar_false_colour(_image(-12.5, -25.0, 12.0).astype(np.float16))
  np.testing.assert_array_equal(rgb[0, 0], (128, 51, 204))
  with pytest.raises(ValueError):
    render.sar_false_colour(np.zeros((4, 4, 11)))
  with pytest.raises(ValueError):
    render.sar_false_colour(np.zeros((4, 4, 12)), season='monsoon')


def _batch(num_tiles, size=16, seed=0):
  rng = np.random.default_rng(seed)
  original = rng.uniform(-30.0, 5.0, (num_tiles, size, size, schema.NUM_CHANNELS))
  masked = original.copy()
  masked[:, :8, :8, :] = np.nan
  reconstruction = original + rng.normal(0.0, 1.0, original.shape)
  return original, masked, reconstruction


@pytest.mark.parametrize('num_tiles', [1, 3])
def test_reconstruction_figure_shape(num_tiles):
  figure = plots.reconstruction_figure(*_batch(num_tiles))
  assert figure.dtype == np.uint8
  assert figure.ndim == 3 and figure.shape[-1] in (3, 4)
  # 2 inch panels at 100 dpi: one row of panels per tile, three columns.
  assert figure.shape[1] == 600
  assert figure.shape[0] == num_tiles * 200 + 30
  assert figure.std() > 0  # something was drawn


def test_reconstruction_figure_rows_scale_and_grey_mask():
  one = plots.reconstruction_figure(*_batch(1))
  four = plots.reconstruction_figure(*_batch(4))
  assert four.shape[0] > 3 * one.shape[0]
  # The masked column shows the hidden patch in grey.
  assert (np.all(one == plots.MASKED_RGB, axis=-1)).sum() > 100


def test_reconstruction_figure_rejects_mismatch():
  original, masked, reconstruction = _batch(2)
  with pytest.raises(ValueError):
    plots.reconstruction_figure(original, masked[:1], reconstruction)


def test_write_png_round_trip_and_no_temp_file(tmp_path):
  rng = np.random.default_rng(1)
  for shape in [(5, 7, 3), (5, 7, 4), (5, 7)]:
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / 'out.png'
    render.write_png(str(path), image)  # second and third calls overwrite
    with Image.open(path) as png:
      np.testing.assert_array_equal(np.asarray(png), image)
  assert os.listdir(tmp_path) == ['out.png']


def test_write_png_rejects_bad_input_and_leaves_nothing(tmp_path):
  with pytest.raises(ValueError):
    render.write_png(str(tmp_path / 'x.png'), np.zeros((4, 4, 3), dtype=np.float32))
  with pytest.raises(ValueError):
    render.write_png(str(tmp_path / 'x.png'), np.zeros((4, 4, 2), dtype=np.uint8))
  assert not os.listdir(tmp_path)


def test_worldcover_colours_are_esas_and_no_data_is_black():
  labels = np.array([[0, 7], [10, schema.IGNORE_INDEX]], np.uint8)
  rgb = render.worldcover_colour(labels)
  np.testing.assert_array_equal(rgb, [[[0, 100, 0], [0, 100, 200]],
                                      [[250, 230, 160], [0, 0, 0]]])
