"""The map of a whole-scene prediction: per-pixel sums on disk, then a Cloud Optimized GeoTIFF.

The per-pixel sums of weighted outputs and weights live in a raw float32 scratch file beside the
output (8 bytes per pixel for VCF, 48 for WorldCover: 4.8 GB for a 10 000 x 10 000 px WorldCover
map; sparse until written), read-modified-written per window, so memory does not grow with the
scene. The final pass writes the map block by block as a tiled GTiff and copies it to a COG:
  * VCF: float32 percent tree cover, the weighted mean; no-data NaN; overviews averaged.
  * WorldCover: uint8 ESA codes (``schema.WORLDCOVER_CODES``) from the argmax of the blended
    softmax probabilities, no-data 0, with the ESA colour table and each code's class name as a
    band tag ``CLASS_<code>=<name>`` (``class_name_tags``); overviews nearest.
The COG is GDAL's COG driver's: tiled at every level, overviews down to one block, IFDs before
the data and the smallest overview's data first (what ``rio cogeo validate`` checks).

Two optional WorldCover rasters come from the same pass over the same sums (``write_map``'s
``probabilities`` and ``confidence``), so the map's class is their argmax wherever that is not
tied:
  * probabilities: 11 bands, one per class in ``schema.WORLDCOVER_CODES`` order, the blended
    softmax probabilities (sums / weight); each band's description is its class name and its tags
    ``CLASS_CODE`` / ``CLASS_NAME``;
  * confidence: 1 band, the largest of those probabilities.
Both are uint8 ``round(p * PROBABILITY_SCALE)`` (0..254, steps of 1/254, about 0.4 %), no-data
``PROBABILITY_NODATA`` (255), with GDAL's band scale 1/254 and offset 0 recorded, so a reader that
applies the scale (``rasterio``'s ``src.scales``, QGIS, ``gdal_translate -unscale``) gets the
probability back. Not float32: a quarter of the size (11 bands per pixel add up), and a step
far finer than any model's calibration. Rounding is monotonic, so the confidence band equals the
maximum over the probability bands exactly; the probability bands sum to 1 within 11 / 508.
Overviews are averaged.

In memory (the Python API, ``mae_jax.tools.api``), :class:`ArraySums` holds the sums, and
:func:`tree_cover`, :func:`class_index` and :func:`class_probabilities` turn them into the
values these rasters hold.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows

from data_pipeline import schema
from mae_jax.tools import scene_windows

# Largest block of the output COG and of the final pass over the scratch sums.
MAX_BLOCK = 512
# The probability and confidence rasters: uint8 round(p * PROBABILITY_SCALE), no-data 255.
PROBABILITY_SCALE = 254
PROBABILITY_NODATA = 255


class Accumulator:
  """Per-pixel float32 sums (height, width, channels) in a raw file, row-major.

  Regions are read and written with positioned I/O, one image row at a time, so memory holds
  one region, never the scene; the file is sparse until written (unwritten sums read as 0).
  Not ``np.memmap``: mapped pages count towards the process's resident memory.
  """

  def __init__(self, path: str, height: int, width: int, channels: int):
    self.path, self.height, self.width, self.channels = path, height, width, channels
    self._row_bytes = width * channels * 4
    self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(self._fd, height * self._row_bytes)

  def _offset(self, row: int, col: int) -> int:
    return row * self._row_bytes + col * self.channels * 4

  def read(self, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    out = np.empty((rows, cols, self.channels), np.float32)
    for i in range(rows):
      got = os.preadv(self._fd, [out[i]], self._offset(row + i, col))
      if got != out[i].nbytes:
        raise OSError(f'{self.path}: short read ({got} of {out[i].nbytes} bytes)')
    return out

  def add(self, row: int, col: int, values: np.ndarray) -> None:
    """sums[row:row + h, col:col + w] += values (h, w, channels)."""
    rows, cols = values.shape[:2]
    current = self.read(row, col, rows, cols)
    current += values
    for i in range(rows):
      os.pwrite(self._fd, current[i], self._offset(row + i, col))

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class ArraySums:
  """:class:`Accumulator`'s interface over an in-memory float32 array (height, width, channels),
  for results that are wanted in memory anyway (the Python API). The same float32 additions in
  the same order, so the sums equal the scratch file's bit for bit."""

  def __init__(self, sums: np.ndarray):
    if sums.ndim != 3 or sums.dtype != np.float32:
      raise ValueError(f'sums must be a float32 (height, width, channels) array, got '
                       f'{sums.dtype} {sums.shape}')
    self.sums = sums
    self.height, self.width, self.channels = sums.shape

  def read(self, row: int, col: int, rows: int, cols: int) -> np.ndarray:
    return self.sums[row:row + rows, col:col + cols].copy()

  def add(self, row: int, col: int, values: np.ndarray) -> None:
    rows, cols = values.shape[:2]
    self.sums[row:row + rows, col:col + cols] += values

  def close(self) -> None:
    pass


# --- Sums -> values (shared by the rasters and the Python API) -------------------------------


def covered(sums: np.ndarray) -> np.ndarray:
  """Pixels with a positive weight (..., H, W): a valid input band under a computed window."""
  return sums[..., -1] > 0


def tree_cover(sums: np.ndarray) -> np.ndarray:
  """VCF: float32 percent tree cover, the weighted mean of the windows' outputs; NaN = no-data."""
  weight = sums[..., -1]
  out = np.full(weight.shape, np.nan, np.float32)
  np.divide(sums[..., 0], weight, out=out, where=weight > 0)
  return out


def class_index(sums: np.ndarray) -> np.ndarray:
  """WorldCover: int16 class index (0..10) per pixel, -1 = no-data. The argmax of the summed
  weighted probabilities: dividing by the (positive) weight would not change it."""
  return np.where(covered(sums), np.argmax(sums[..., :-1], axis=-1), -1).astype(np.int16)


def worldcover_codes(index: np.ndarray) -> np.ndarray:
  """uint8 ESA WorldCover codes of class indices (:func:`class_index`); -1 -> no-data (0)."""
  codes = np.asarray(schema.WORLDCOVER_CODES, np.uint8)[np.maximum(index, 0)]
  return np.where(index >= 0, codes, np.uint8(schema.WORLDCOVER_NODATA_CODE)).astype(np.uint8)


def class_probabilities(sums: np.ndarray) -> np.ndarray:
  """WorldCover: float32 blended class probabilities (..., H, W, classes); NaN = no-data."""
  weight = sums[..., -1:]
  out = np.full(sums.shape[:-1] + (sums.shape[-1] - 1,), np.nan, np.float32)
  np.divide(sums[..., :-1], weight, out=out, where=weight > 0)
  return out


def quantise_probability(values: np.ndarray) -> np.ndarray:
  """Probabilities (NaN = no-data) -> the rasters' uint8 (module docstring)."""
  scaled = np.rint(np.clip(values, 0.0, 1.0) * PROBABILITY_SCALE)
  return np.where(np.isnan(values), PROBABILITY_NODATA, scaled).astype(np.uint8)


def check_output(path: str) -> None:
  """Raises before any work if ``path`` cannot be written: missing folder, or a folder."""
  if not path:
    raise ValueError('no output path given')
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'output folder {folder!r} does not exist (for output {path!r}); '
                            'create it first')
  if os.path.isdir(path):
    raise IsADirectoryError(f'output {path!r} is a folder; give a file name, e.g. '
                            f'{os.path.join(path, "map.tif")}')
  if not os.access(folder, os.W_OK):
    raise PermissionError(f'output folder {folder!r} is not writable')


def class_name_tags() -> dict[str, str]:
  """The WorldCover map's band tags naming each code: ``CLASS_<code>=<name>``
  (``schema.WORLDCOVER_NAMES``). Tags, not GDAL category names or a raster attribute table:
  the GTiff driver keeps those only in a ``.aux.xml`` side file, which a COG copied or served
  alone loses (and rasterio cannot write either); the tags live in the TIFF itself."""
  return {f'CLASS_{code}': name
          for code, name in zip(schema.WORLDCOVER_CODES, schema.WORLDCOVER_NAMES)}


def block_size(height: int, width: int) -> int:
  """The COG's tile size: MAX_BLOCK, halved while it exceeds the map's longer side, down to
  128 (the COG driver's minimum), so a small map is not one mostly empty 512 px tile."""
  block = MAX_BLOCK
  while block > 128 and block > max(height, width):
    block //= 2
  return block


def _open_tiled(path: str, scene, block: int, count: int, dtype: str, nodata: float):
  return rasterio.open(path, 'w', driver='GTiff', width=scene.width, height=scene.height,
                       count=count, dtype=dtype, crs=scene.crs, transform=scene.transform,
                       nodata=nodata, tiled=True, blockxsize=block, blockysize=block,
                       compress='deflate', BIGTIFF='IF_SAFER')


def _describe_probability_raster(out, tags: dict[str, str], what: str) -> None:
  """Band names, tags and the scale that turns the stored uint8 back into a probability."""
  if out.count == schema.NUM_CLASSES:
    for band, (code, name) in enumerate(zip(schema.WORLDCOVER_CODES, schema.WORLDCOVER_NAMES),
                                        start=1):
      out.set_band_description(band, name)
      out.update_tags(band, CLASS_CODE=str(code), CLASS_NAME=name)
  else:
    out.set_band_description(1, what)
  out.scales = (1.0 / PROBABILITY_SCALE,) * out.count
  out.offsets = (0.0,) * out.count
  out.update_tags(**tags, MAE_JAX_PRODUCT=what,
                  MAE_JAX_ENCODING=f'uint8 round(p * {PROBABILITY_SCALE}); '
                  f'{PROBABILITY_NODATA} = no-data; band scale 1/{PROBABILITY_SCALE}')


def _copy_to_cog(path: str, cog_path: str, block: int, height: int, width: int,
                 predictor: bool, resampling: str) -> None:
  # The driver makes overviews down to one block; a raster of one block still gets one level.
  levels = {} if max(height, width) > block else {'overview_count': 1}
  rasterio.shutil.copy(path, cog_path, driver='COG', blocksize=block, compress='DEFLATE',
                       predictor='YES' if predictor else 'NO', overview_resampling=resampling,
                       BIGTIFF='IF_SAFER', **levels)


def write_map(accumulator: Accumulator, task: str, path: str, cog_path: str, scene,
              tags: dict[str, str], probabilities: tuple[str, str] | None = None,
              confidence: tuple[str, str] | None = None) -> None:
  """Final pass: sums -> map, block by block into a tiled GTiff, then copied to a COG.

  ``probabilities`` and ``confidence`` (WorldCover only) are (tiled GTiff, COG) paths of the
  optional rasters (module docstring), written from the same blocks of sums.
  """
  height, width = scene.height, scene.width
  block = block_size(height, width)
  vcf = task == 'vcf'
  if vcf and (probabilities or confidence):
    raise ValueError('class probability and confidence rasters are WorldCover outputs; a VCF '
                     'model predicts tree cover, not classes')
  with contextlib.ExitStack() as stack:
    out = stack.enter_context(_open_tiled(
        path, scene, block, 1, 'float32' if vcf else 'uint8',
        np.nan if vcf else schema.WORLDCOVER_NODATA_CODE))
    if vcf:
      out.set_band_description(1, 'percent_tree_cover')
      out.set_band_unit(1, 'percent')
    else:
      out.set_band_description(1, 'worldcover_code')
      colours = {code: tuple(rgb) + (255,)
                 for code, rgb in zip(schema.WORLDCOVER_CODES, schema.WORLDCOVER_COLORS)}
      colours[schema.WORLDCOVER_NODATA_CODE] = (0, 0, 0, 0)
      out.write_colormap(1, colours)
      out.update_tags(1, **class_name_tags())
    out.update_tags(**tags)
    extra = {}
    for name, paths, count in (('class_probabilities', probabilities, schema.NUM_CLASSES),
                               ('confidence', confidence, 1)):
      if paths:
        extra[name] = stack.enter_context(_open_tiled(paths[0], scene, block, count, 'uint8',
                                                      PROBABILITY_NODATA))
        _describe_probability_raster(extra[name], tags, name)
    for row, col, rows, cols in scene_windows.blocks(height, width, block):
      window = rasterio.windows.Window(col, row, cols, rows)
      sums = accumulator.read(row, col, rows, cols)
      if vcf:
        out.write(tree_cover(sums), 1, window=window)
        continue
      out.write(worldcover_codes(class_index(sums)), 1, window=window)
      if extra:
        blended = class_probabilities(sums)
        if 'class_probabilities' in extra:
          extra['class_probabilities'].write(
              np.moveaxis(quantise_probability(blended), -1, 0), window=window)
        if 'confidence' in extra:
          # max() keeps NaN (no-data) where every class is NaN.
          extra['confidence'].write(quantise_probability(blended.max(axis=-1)), 1,
                                    window=window)
  # Classes are subsampled (an average of codes means nothing); tree cover and probabilities
  # are averaged.
  _copy_to_cog(path, cog_path, block, height, width, predictor=vcf,
               resampling='average' if vcf else 'nearest')
  for paths in (probabilities, confidence):
    if paths:
      _copy_to_cog(*paths, block, height, width, predictor=True, resampling='average')
