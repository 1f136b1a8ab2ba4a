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
"""

from __future__ import annotations

import os

import numpy as np
import rasterio
import rasterio.shutil
import rasterio.windows

from data_pipeline import schema
from mae_jax.tools import scene_windows

# Largest block of the output COG and of the final pass over the scratch sums.
MAX_BLOCK = 512



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


def write_map(accumulator: Accumulator, task: str, path: str, cog_path: str, scene,
               tags: dict[str, str]) -> None:
  """Final pass: sums -> map, block by block into a tiled GTiff, then copied to a COG."""
  height, width = scene.height, scene.width
  block = block_size(height, width)
  vcf = task == 'vcf'
  profile = dict(driver='GTiff', width=width, height=height, count=1,
                 dtype='float32' if vcf else 'uint8', crs=scene.crs, transform=scene.transform,
                 nodata=np.nan if vcf else schema.WORLDCOVER_NODATA_CODE, tiled=True,
                 blockxsize=block, blockysize=block, compress='deflate', BIGTIFF='IF_SAFER')
  codes = np.asarray(schema.WORLDCOVER_CODES, np.uint8)
  with rasterio.open(path, 'w', **profile) as out:
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
    for row, col, rows, cols in scene_windows.blocks(height, width, block):
      sums = accumulator.read(row, col, rows, cols)
      weight = sums[..., -1]
      covered = weight > 0  # No valid input band, or no computed window: no-data.
      if vcf:
        values = np.full((rows, cols), np.nan, np.float32)
        np.divide(sums[..., 0], weight, out=values, where=covered)
      else:
        # Dividing by the weight would not change the argmax.
        values = np.where(covered, codes[np.argmax(sums[..., :-1], axis=-1)],
                          np.uint8(schema.WORLDCOVER_NODATA_CODE)).astype(np.uint8)
      out.write(values, 1, window=rasterio.windows.Window(col, row, cols, rows))
  # Classes are subsampled (an average of codes means nothing); tree cover is averaged.
  # The driver makes overviews down to one block; a map of one block still gets one level.
  levels = {} if max(height, width) > block else {'overview_count': 1}
  rasterio.shutil.copy(path, cog_path, driver='COG', blocksize=block, compress='DEFLATE',
                       predictor='YES' if vcf else 'NO',
                       overview_resampling='average' if vcf else 'nearest', BIGTIFF='IF_SAFER',
                       **levels)
