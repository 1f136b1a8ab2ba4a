r"""Whole-scene prediction: a fine-tuned model applied in overlapping windows, written as a COG.

  python -m mae_jax.tools.predict --checkpoint PATH --input scene.tif [more.tif ...] --output map.tif \
      [--overlap PX] [--batch_size N] [--nouse_best] [--units auto|dB|linear] [--noprogress]

``PATH`` is a fine-tuning or linear-probing workdir (its latest step) or one ``checkpoints/<step>``
folder; the model, head, task and input contract come from its metadata (``mae_jax.tools.inference``).

Inputs: one or more GeoTIFFs on one pixel grid (same CRS, transform and size) whose bands,
concatenated in the order given, are the model's 12 channels in ``schema.BAND_NAMES`` order:
e.g. one 12-band file or three 4-band files (VV-VH, VV, VH, each winter..fall). When every band
has a description and they name the channels (any case or separators), the bands are put in
order by name instead. Values are sigma0 in dB (linear power is detected from the VV and VH
bands, or stated with ``--units``, and converted; VV-VH then is the ratio). No-data as the
GeoTIFF ingestion has it: the files' nodata values and masks, NaN and infinities, and in VV and
VH exact 0 and values below the noise floor. Each window is then clipped and quantised as the
dataset tiles were (``InputContract.clip_range``, float16), so a window seen here equals the
same pixels seen as a dataset tile.

Windows of the model's tile size, each overlapping its neighbours by ``overlap`` px (default
size / 8), cover the scene (``mae_jax.tools.scene_windows``: grid, tapered blending); windows without
any valid pixel are not computed. Batches of windows run jitted and sharded over every device. Outputs, on the input's
grid:
  * VCF: float32 percent tree cover, each pixel the taper-weighted mean of the per-window
    predictions covering it; no-data NaN; overviews averaged.
  * WorldCover: uint8 ESA codes (``schema.WORLDCOVER_CODES``) from the argmax of the blended
    softmax probabilities, no-data 0, with the ESA colour table; overviews nearest.
Pixels without any valid input band are no-data in either map.

Memory does not grow with the scene: windows are read from disk as they are needed, the
per-pixel sums of weighted outputs and weights live in a raw float32 scratch file beside the
output (8 bytes per pixel for VCF, 48 for WorldCover: 4.8 GB for a 10 000 x 10 000 px WorldCover
map; sparse until written) that is read-modified-written per window, and the map is written block
by block as a tiled GTiff and then copied to a Cloud Optimized GeoTIFF. GDAL's block cache is
sized from the inputs' block layout and the window, not from the scene (``read_cache_bytes``;
``GDAL_CACHEMAX`` in the environment overrides it). Everything is written under temporary names
in the output's folder and renamed at the end: on any error no partial map and no scratch file
is left.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import itertools
import math
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np
import rasterio
import rasterio.errors
import rasterio.shutil
import rasterio.windows

from data_pipeline.ingest import composite
from data_pipeline import schema
from mae_jax.tools import scene_windows

# GDAL's block cache (decoded input blocks, output blocks waiting to be written) is set from the
# inputs' block layout, never from the scene's size (read_cache_bytes), within these bounds, in
# bytes (rasterio hands an integer to GDAL as bytes). Too small a cache thrashes: a window whose
# blocks do not all fit decodes a tile again for every band.
MIN_GDAL_CACHE = 32 << 20
MAX_GDAL_CACHE = 2 << 30
# Cache for opening the inputs (the patches that decide the units).
OPEN_GDAL_CACHE = 64 << 20
# Largest block of the output COG and of the final pass over the scratch sums.
MAX_BLOCK = 512
# Windows per device and batch when --batch_size is 0.
WINDOWS_PER_DEVICE = 8
# Threads reading windows (GDAL decodes with the GIL released); each has its own file handles.
READ_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Windows read per task of a reading thread.
READ_CHUNK = 4
# The units are decided on UNITS_PATCHES x UNITS_PATCHES patches of UNITS_PATCH px spread over
# the scene.
UNITS_PATCHES = 5
UNITS_PATCH = 64
UNITS = ('auto', 'dB', 'linear')
# Relative tolerance (in pixel sizes) when comparing geotransforms: float text in headers.
TRANSFORM_TOLERANCE = 1e-6


# --- Inputs ----------------------------------------------------------------------------------


def _band_key(description: str) -> str:
  """'VV Winter' / 'vv-winter' / 'vv_winter' -> 'vv_winter'."""
  return re.sub(r'[^a-z0-9]+', '_', description.strip().lower()).strip('_')


@dataclasses.dataclass(frozen=True)
class Scene:
  """The input files of one scene and how their bands map onto the model's channels."""
  paths: tuple[str, ...]
  height: int
  width: int
  crs: Any
  transform: Any
  band_names: tuple[str, ...]
  # Per model channel: (file index, 1-based band of that file).
  sources: tuple[tuple[int, int], ...]
  # Per file, per band (1-based band b at [b - 1]): the declared nodata value or None.
  nodata: tuple[tuple[float | None, ...], ...]
  units: str  # 'dB' or 'linear' (decided)
  # Per file: GDAL's block (rows, cols) and the bytes of one pixel over all its bands.
  block_shapes: tuple[tuple[int, int], ...] = ()
  bytes_per_pixel: tuple[int, ...] = ()

  @property
  def striped(self) -> list[str]:
    """The files stored in strips (blocks of whole rows) rather than tiles."""
    return [p for p, (rows, cols) in zip(self.paths, self.block_shapes)
            if cols >= self.width and rows < self.height]


def _grid_differences(a, b) -> list[str]:
  out = []
  if a.crs != b.crs:
    out.append(f'CRS {a.crs} != {b.crs}')
  if (a.width, a.height) != (b.width, b.height):
    out.append(f'size {a.width} x {a.height} px != {b.width} x {b.height} px')
  pixel = max(abs(a.transform.a), abs(a.transform.e), 1e-12)
  if not a.transform.almost_equals(b.transform, precision=TRANSFORM_TOLERANCE * pixel):
    out.append(f'transform {tuple(a.transform)[:6]} != {tuple(b.transform)[:6]}')
  return out


def _channel_sources(paths: Sequence[str], descriptions: Sequence[Sequence[str | None]],
                     band_names: Sequence[str]) -> tuple[tuple[int, int], ...]:
  """(file, band) per channel: by band descriptions when they name every channel, else in the
  order given."""
  flat = [(f, b, d) for f, per_file in enumerate(descriptions)
          for b, d in enumerate(per_file, start=1)]
  named = [(f, b, d) for f, b, d in flat if d]
  if not named:
    return tuple((f, b) for f, b, _ in flat)
  keys = {_band_key(d): (f, b) for f, b, d in named}
  wanted = [_band_key(n) for n in band_names]
  if len(named) == len(flat) and len(keys) == len(flat) and set(keys) == set(wanted):
    return tuple(keys[k] for k in wanted)
  listing = ', '.join(f'{paths[f]} band {b}: {d!r}' for f, b, d in flat)
  raise ValueError(f'band descriptions ({listing}) do not name the model\'s channels '
                   f'{tuple(band_names)} once each; fix them, or remove every description to '
                   'take the bands in the order given')


def _is_backscatter(band_name: str) -> bool:
  """VV or VH (not the VV-VH ratio, which may be 0 or very negative)."""
  return not band_name.startswith('vv_minus_vh')


def _read_masked(dataset, indexes: Sequence[int], nodata: Sequence[float | None],
                 backscatter: Sequence[bool], units: str, **read_kwargs) -> np.ndarray:
  """Bands ``indexes`` as float32 dB (bands, rows, cols), no-data NaN.

  No-data as the GeoTIFF ingestion (``data_pipeline.ingest.sources.geotiff``, default settings) has
  it, so that a window equals a dataset tile made from the same file: the file's mask and
  nodata value, NaN and infinities, and in VV and VH bands exact 0 (Earth Engine's fill) and
  values below the noise floor (``composite.DEFAULT_NOISE_FLOOR_DB``, after conversion to dB).
  """
  data = dataset.read(list(indexes), masked=True, **read_kwargs)
  values = np.ma.filled(data.astype(np.float32), np.nan)
  for i, band in enumerate(indexes):
    declared = nodata[band - 1]
    fills = (() if declared is None else (declared,)) + (
        composite.DEFAULT_NODATA_VALUES if backscatter[i] else ())
    # Fill values are stored values: compare before any conversion.
    values[i] = composite.mask_nodata(values[i], nodata_values=fills, noise_floor_db=None)
    if units == 'linear':
      values[i] = composite.linear_to_db(values[i])
    if backscatter[i]:
      values[i] = composite.mask_nodata(values[i], nodata_values=(),
                                        noise_floor_db=composite.DEFAULT_NOISE_FLOOR_DB)
  return values


def _detect_units(scene: Scene, datasets) -> str:
  """'dB' or 'linear' (composite.detect_units) from the VV and VH channels (VV-VH is positive
  in dB and would confuse the rule) of a grid of small full-resolution patches. Not a
  decimated read: that goes band by band over the whole scene, and when the decoded tiles do
  not fit GDAL's cache it decodes every tile again for every band."""
  side = min(UNITS_PATCH, scene.height, scene.width)
  rows = np.linspace(0, scene.height - side, UNITS_PATCHES).astype(int)
  cols = np.linspace(0, scene.width - side, UNITS_PATCHES).astype(int)
  samples = []
  for f, dataset in enumerate(datasets):
    bands = [b for (g, b), name in zip(scene.sources, scene.band_names)
             if g == f and _is_backscatter(name)]
    if not bands:
      continue
    for row in sorted(set(rows)):
      for col in sorted(set(cols)):
        window = rasterio.windows.Window(int(col), int(row), side, side)
        samples.append(_read_masked(dataset, bands, scene.nodata[f], [True] * len(bands), 'dB',
                                    window=window).ravel())
  values = np.concatenate(samples) if samples else np.zeros(0, np.float32)
  try:
    return composite.detect_units(values, name=' + '.join(scene.paths))
  except ValueError as e:
    raise ValueError(f'{e} (here: --units dB or --units linear)') from e


def open_scene(paths: Sequence[str], band_names: Sequence[str] = schema.BAND_NAMES,
               units: str = 'auto') -> Scene:
  """Checks the input files (exist, one grid, band count and names) and decides the units.

  Raises:
    FileNotFoundError: An input does not exist.
    ValueError: Different grids (naming both files and what differs), a wrong total band
      count (naming every file's count), band descriptions that do not name the channels, or
      units that cannot be told.
  """
  if not paths:
    raise ValueError('no input files given')
  if units not in UNITS:
    raise ValueError(f'units {units!r} is not one of {UNITS}')
  paths = tuple(os.fspath(p) for p in paths)
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'input {path!r} does not exist')
  with contextlib.ExitStack() as stack:
    datasets = [stack.enter_context(rasterio.open(p)) for p in paths]
    first = datasets[0]
    for path, dataset in zip(paths[1:], datasets[1:]):
      differences = _grid_differences(first, dataset)
      if differences:
        raise ValueError(f'{paths[0]} and {path} are not on one grid: '
                         + '; '.join(differences) + '; put every input on one grid first')
    counts = [d.count for d in datasets]
    if sum(counts) != len(band_names):
      listing = ', '.join(f'{p}: {n}' for p, n in zip(paths, counts))
      raise ValueError(f'the inputs have {sum(counts)} bands in all ({listing}) but the model '
                       f'takes {len(band_names)} channels {tuple(band_names)}: give one '
                       f'{len(band_names)}-band file or several whose bands add up to that, '
                       'in that order')
    sources = _channel_sources(paths, [d.descriptions for d in datasets], band_names)
    nodata = tuple(tuple(None if v is None else float(v) for v in d.nodatavals)
                   for d in datasets)
    scene = Scene(paths=paths, height=first.height, width=first.width, crs=first.crs,
                  transform=first.transform, band_names=tuple(band_names), sources=sources,
                  nodata=nodata, units=units,
                  block_shapes=tuple(tuple(d.block_shapes[0]) for d in datasets),
                  bytes_per_pixel=tuple(sum(np.dtype(t).itemsize for t in d.dtypes)
                                        for d in datasets))
    if units == 'auto':
      scene = dataclasses.replace(scene, units=_detect_units(scene, datasets))
  return scene


class SceneReader:
  """Reads windows of a :class:`Scene` as model input; one per thread (file handles are not
  thread-safe)."""

  def __init__(self, scene: Scene, clip_range: tuple[float, float],
               storage_dtype: str = schema.STORAGE_DTYPE):
    self.scene = scene
    self.clip_range = clip_range
    self.storage_dtype = storage_dtype
    self._datasets = []
    try:
      for path in scene.paths:
        self._datasets.append(rasterio.open(path))
    except BaseException:
      self.close()
      raise
    # Per file: its bands to read, the channel each goes to and whether it is VV or VH.
    self._plan = []
    for f in range(len(scene.paths)):
      channels = [c for c, (g, _) in enumerate(scene.sources) if g == f]
      self._plan.append(([scene.sources[c][1] for c in channels], channels,
                         [_is_backscatter(scene.band_names[c]) for c in channels]))

  def read(self, row: int, col: int, size: int) -> np.ndarray:
    """The (size, size, channels) window at (row, col), quantised like the dataset tiles
    (clipped, float16, NaN = no-data); outside the scene is no-data."""
    scene = self.scene
    out = np.full((len(scene.sources), size, size), np.nan, np.float32)
    window = rasterio.windows.Window(col, row, size, size)
    try:
      inside = window.intersection(rasterio.windows.Window(0, 0, scene.width, scene.height))
    except rasterio.errors.WindowError:
      inside = None
    if inside is not None:
      # Read the part inside the raster and pad the rest ourselves: a plain windowed read
      # clips silently at the edge, and a boundless one goes through a VRT per call.
      r0, c0 = int(inside.row_off) - row, int(inside.col_off) - col
      r1, c1 = r0 + int(inside.height), c0 + int(inside.width)
      for f, (bands, channels, backscatter) in enumerate(self._plan):
        out[channels, r0:r1, c0:c1] = _read_masked(self._datasets[f], bands, scene.nodata[f],
                                                   backscatter, scene.units, window=inside)
    low, high = self.clip_range
    # As data_pipeline.writer.quantise_image: clip, then the storage dtype.
    return np.clip(out.transpose(1, 2, 0), low, high).astype(self.storage_dtype)

  def close(self) -> None:
    for dataset in self._datasets:
      dataset.close()
    self._datasets = []


def _read_windows(scene: Scene, windows: Iterable[scene_windows.Window], size: int,
                  clip_range, storage_dtype) -> Iterator[tuple[scene_windows.Window, np.ndarray]]:
  """(window, image) in grid order, read ahead by READ_WORKERS threads (a bounded look-ahead,
  so memory stays a few chunks whatever the scene)."""
  local = threading.local()
  readers, lock = [], threading.Lock()

  def read_chunk(chunk):
    reader = getattr(local, 'reader', None)
    if reader is None:
      reader = local.reader = SceneReader(scene, clip_range, storage_dtype)
      with lock:
        readers.append(reader)
    return [(w, reader.read(w.row, w.col, size)) for w in chunk]

  windows = iter(windows)
  chunks = iter(lambda: list(itertools.islice(windows, READ_CHUNK)), [])
  pool = _pool('read', READ_WORKERS)
  pending = collections.deque()
  try:
    for chunk in chunks:
      pending.append(pool.submit(read_chunk, chunk))
      if len(pending) > 2 * READ_WORKERS:
        yield from pending.popleft().result()
    while pending:
      yield from pending.popleft().result()
  finally:
    for future in pending:
      future.cancel()
    concurrent.futures.wait(pending)  # Then no thread uses a reader any more.
    for reader in readers:
      reader.close()


_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _pool(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """Threads shared by every scene of the process: new threads for every scene would each get
  a fresh malloc arena, and a process predicting many scenes would grow by tens of MB each."""
  if name not in _POOLS:
    _POOLS[name] = concurrent.futures.ThreadPoolExecutor(workers,
                                                         thread_name_prefix=f'predict-{name}')
  return _POOLS[name]


# --- Scratch sums ----------------------------------------------------------------------------


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


# --- Model -----------------------------------------------------------------------------------

_PREDICT_FNS: dict[Any, Callable] = {}


def predict_fn(loaded) -> Callable:
  """Jitted (variables, float16 windows (B, S, S, C), tapers (B, S, S)) -> (B, S, S, k + 1):
  the window's output times its weight, then the weight, where the weight is the taper at
  pixels with a valid band and 0 elsewhere. The output is the per-window percent tree cover
  (k = 1) or the softmax probabilities (k = classes). One per model, so repeated scenes reuse
  the compiled program."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mae_jax import preprocess  # pylint: disable=g-import-not-at-top
  mean = tuple(loaded.contract.mean)
  std = tuple(loaded.contract.std)
  key = (loaded.model, loaded.task, mean, std)
  if key not in _PREDICT_FNS:
    model, task = loaded.model, loaded.task
    mean_array, std_array = np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def predict(variables, images, tapers):
      normalised, valid = preprocess.normalise(images, mean_array, std_array)
      out = model.apply(variables, normalised)
      # A pixel without any valid band keeps weight 0 in every window: no-data in the map.
      weight = tapers * valid.any(axis=-1)
      if task == 'worldcover':
        # Probabilities, not logits, are what blends: a confident window should not outvote a
        # neighbour by the scale of its logits.
        weighted = jax.nn.softmax(out, axis=-1) * weight[..., None]
      else:
        weighted = (out[:, None, None] * weight)[..., None]
      return jnp.concatenate([weighted, weight[..., None]], axis=-1)

    _PREDICT_FNS[key] = jax.jit(predict)
  return _PREDICT_FNS[key]


# --- Output ----------------------------------------------------------------------------------


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


def block_size(height: int, width: int) -> int:
  """The COG's tile size: MAX_BLOCK, halved while it exceeds the map's longer side, down to
  128 (the COG driver's minimum), so a small map is not one mostly empty 512 px tile."""
  block = MAX_BLOCK
  while block > 128 and block > max(height, width):
    block //= 2
  return block


def _write_map(accumulator: Accumulator, task: str, path: str, cog_path: str, scene: Scene,
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


# --- Prediction ------------------------------------------------------------------------------


def read_cache_bytes(scene: Scene, size: int) -> int:
  """GDAL cache for reading ``size``-px windows: every block a window touches, in every file
  and band, for each reading thread, twice (so the next window along the row finds the blocks
  it shares with this one). Depends on the block layout and the window, not on the scene size,
  except for striped (untiled) files, whose blocks are whole rows; capped at MAX_GDAL_CACHE."""
  need = 0
  for (rows, cols), bytes_per_pixel in zip(scene.block_shapes, scene.bytes_per_pixel):
    blocks = (math.ceil(size / rows) + 1) * (math.ceil(size / cols) + 1)
    need += blocks * rows * cols * bytes_per_pixel
  return int(min(max(2 * READ_WORKERS * need, MIN_GDAL_CACHE), MAX_GDAL_CACHE))


def _gdal_env(cache_bytes: int) -> rasterio.Env:
  # An explicit GDAL_CACHEMAX in the environment wins (GDAL reads it itself, '64' meaning MB).
  options = {} if 'GDAL_CACHEMAX' in os.environ else {'GDAL_CACHEMAX': int(cache_bytes)}
  return rasterio.Env(**options)


def _predict_windows(loaded, scene: Scene, size: int, overlap: int, batch_size: int,
                     accumulator: Accumulator, progress: bool) -> int:
  """Predicts every window with data and adds its weighted output into ``accumulator``;
  returns the number of windows skipped for having no valid pixel.

  Three stages run at once: threads read windows ahead (``_read_windows``), this thread
  batches and dispatches them to the devices (asynchronously), and a writer thread waits for
  each batch's outputs and adds them to the scratch sums, in grid order (so the float sums, and
  the map, do not depend on thread timing). At most two batches are in flight.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh, contract = loaded.mesh, loaded.contract
  shape = scene_windows.grid_shape(scene.height, scene.width, size, overlap)
  batch_sharding = sharding.batch_sharding(mesh)
  fn = predict_fn(loaded)
  tapers: dict[tuple[bool, ...], np.ndarray] = {}
  skipped = 0

  def taper(window):
    key = (window.index_row > 0, window.index_row < shape[0] - 1,
           window.index_col > 0, window.index_col < shape[1] - 1)
    if key not in tapers:
      tapers[key] = scene_windows.taper(size, overlap, window, shape)
    return tapers[key]

  def dispatch(batch):
    padding = batch_size - len(batch)  # The last batch: no-data windows of weight 0.
    images = np.stack([image for _, image in batch]
                      + [np.full_like(batch[0][1], np.nan)] * padding)
    weights = np.stack([taper(w) for w, _ in batch]
                       + [np.zeros((size, size), np.float32)] * padding)
    with jax.set_mesh(mesh), nn.logical_axis_rules(loaded.rules):
      outputs = fn(loaded.variables, jax.device_put(images, batch_sharding),
                   jax.device_put(weights, batch_sharding))
    return [w for w, _ in batch], outputs

  def accumulate(windows, outputs):
    outputs = np.asarray(jax.device_get(outputs))  # Waits for the devices.
    for window, values in zip(windows, outputs):
      rows = min(size, scene.height - window.row)
      cols = min(size, scene.width - window.col)
      accumulator.add(window.row, window.col, values[:rows, :cols])
    return len(windows)

  reads = _read_windows(scene, scene_windows.grid(scene.height, scene.width, size, overlap),
                        size, contract.clip_range, contract.storage_dtype)
  writer = _pool('write', 1)
  pending = collections.deque()
  with tqdm.tqdm(total=math.prod(shape), unit='window', file=sys.stderr, disable=not progress,
                 dynamic_ncols=True) as bar, contextlib.closing(reads):
    try:
      batch = []
      for window, image in itertools.chain(reads, [(None, None)]):
        if window is not None:
          if not np.isfinite(image).any():
            skipped += 1
            bar.update(1)
            continue
          batch.append((window, image))
        if batch and (len(batch) == batch_size or window is None):
          pending.append(writer.submit(accumulate, *dispatch(batch)))
          batch = []
          while len(pending) > 1:
            bar.update(pending.popleft().result())
      while pending:
        bar.update(pending.popleft().result())
    finally:
      # On an error, let the writer finish before the caller closes and deletes the sums.
      for future in pending:
        future.cancel()
      concurrent.futures.wait(pending)
  return skipped


def predict_scene(loaded, scene: Scene | Sequence[str], output: str, *,
                  overlap: int | None = None, batch_size: int = 0, units: str = 'auto',
                  progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Predicts a map of ``scene`` with a model from ``inference.load_downstream``.

  Args:
    loaded: An ``inference.Downstream``.
    scene: A :class:`Scene` (``open_scene``) or the input paths.
    output: The map's path (GeoTIFF, COG layout); its folder must exist. Replaced atomically.
    overlap: Pixels shared by neighbouring windows; None = window size / 8. Must be below half
      the window size.
    batch_size: Windows per global batch, a multiple of the data-parallel size; 0 =
      WINDOWS_PER_DEVICE per data-parallel device.
    units: Used when ``scene`` is paths: 'auto', 'dB' or 'linear'.
    progress: Show a progress bar over windows (stderr).
    log: Where the summary lines go.

  Returns:
    Counts and timings: windows, skipped (no valid pixel), seconds, windows_per_s, ...
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mae_jax import sharding  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  if jax.process_count() > 1:
    raise RuntimeError(f'whole-scene prediction runs in one process; this is one of '
                       f'{jax.process_count()} (start it without a multi-process launcher)')
  check_output(output)
  contract = loaded.contract
  with _gdal_env(OPEN_GDAL_CACHE):
    if not isinstance(scene, Scene):
      scene = open_scene(scene, contract.band_names, units)
    if scene.band_names != tuple(contract.band_names):
      scene = open_scene(scene.paths, contract.band_names, scene.units)
  if scene.units == 'linear':
    log(f'{" + ".join(scene.paths)}: values are linear power; converted to dB')
  size = loaded.model.image_size
  if scene.striped and scene.width > 4 * size:
    log(f'{", ".join(scene.striped)}: stored in strips, not tiles: every window decodes '
        'whole-width rows (slow for wide scenes); a tiled GeoTIFF or COG reads faster')
  overlap = scene_windows.default_overlap(size) if overlap is None else int(overlap)
  scene_windows.check_overlap(size, overlap)
  with _gdal_env(read_cache_bytes(scene, size)):
    mesh = loaded.mesh
    parallel = sharding.data_parallel_size(mesh)
    batch_size = batch_size or WINDOWS_PER_DEVICE * parallel
    if batch_size <= 0 or batch_size % parallel:
      raise ValueError(f'batch size {batch_size} must be a positive multiple of the '
                       f'data-parallel size {parallel} (mesh {dict(mesh.shape)})')
    num_windows = math.prod(scene_windows.grid_shape(scene.height, scene.width, size, overlap))
    # Weighted outputs, then the weight.
    channels = (1 if loaded.task == 'vcf' else schema.NUM_CLASSES) + 1
    folder, name = os.path.split(os.path.abspath(output))
    prefix = os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}')
    accumulator = None
    try:
      accumulator = Accumulator(prefix + '.sums', scene.height, scene.width, channels)
      skipped = _predict_windows(loaded, scene, size, overlap, batch_size, accumulator, progress)
      predicted = time.perf_counter()
      counts = {'windows': num_windows - skipped, 'skipped': skipped}
      tags = {'MAE_JAX_TASK': loaded.task, 'MAE_JAX_CHECKPOINT': loaded.checkpoint,
              'MAE_JAX_WEIGHTS': loaded.weights, 'MAE_JAX_INPUTS': ' '.join(scene.paths),
              'MAE_JAX_WINDOW': f'{size} px, overlap {overlap} px'}
      _write_map(accumulator, loaded.task, prefix + '.tiled.tif', prefix + '.cog.tif', scene,
                 tags)
      os.replace(prefix + '.cog.tif', output)
    finally:
      if accumulator is not None:
        accumulator.close()
      # Scratch sums, the tiled map, the COG (unless renamed) and anything GDAL made beside
      # them (e.g. its temporary overview file).
      for leftover in glob.glob(glob.escape(prefix) + '*'):
        os.remove(leftover)
  end = time.perf_counter()
  seconds = end - start
  stats = dict(counts, seconds=seconds, predict_seconds=predicted - start,
               write_seconds=end - predicted, windows_per_s=counts['windows'] / seconds,
               pixels_per_s=scene.height * scene.width / seconds, height=scene.height,
               width=scene.width, window_size=size, overlap=overlap, batch_size=batch_size)
  log(f'{counts["windows"]} windows of {size} px (overlap {overlap} px; {counts["skipped"]} '
      f'without data skipped) over {scene.width} x {scene.height} px in {seconds:.1f} s: '
      f'{stats["windows_per_s"]:.2f} windows/s, {stats["pixels_per_s"] / 1e6:.2f} Mpx/s; '
      f'wrote {output}')
  return stats


def run(checkpoint: str, inputs: Sequence[str], output: str, *, overlap: int | None = None,
        batch_size: int = 0, use_best: bool = True, units: str = 'auto',
        progress: bool = True, mesh_config: Any = None) -> dict[str, Any]:
  """The command: checks the output folder and the inputs first (cheap), then loads the
  checkpoint (``inference.load_downstream``) and predicts."""
  from mae_jax.tools import inference  # pylint: disable=g-import-not-at-top
  check_output(output)
  with _gdal_env(OPEN_GDAL_CACHE):
    scene = open_scene(inputs, schema.BAND_NAMES, units)
  loaded = inference.load_downstream(checkpoint, mesh_config=mesh_config, use_best=use_best)
  print(f'{loaded.checkpoint} ({loaded.task}, {loaded.weights} weights): {len(scene.paths)} '
        f'input file(s), {scene.width} x {scene.height} px', flush=True)
  return predict_scene(loaded, scene, output, overlap=overlap, batch_size=batch_size,
                       progress=progress)


# --- Command line ----------------------------------------------------------------------------

def _define_flags():
  """The command's flags, defined only when it runs: other CLIs that tests import into the same
  process (data_pipeline.build_synthetic) define flags of the same names."""
  flags.DEFINE_string('checkpoint', None, 'Fine-tuning workdir or one of its checkpoints/<step> '
                      'folders.')
  flags.DEFINE_multi_string('input', None, 'Input GeoTIFF(s); more may follow as plain '
                            'arguments (--input a.tif b.tif c.tif).')
  flags.DEFINE_string('output', None, 'Output map (Cloud Optimized GeoTIFF).')
  flags.DEFINE_integer('overlap', None, 'Pixels shared by neighbouring windows (default: window '
                       'size / 8; below half the window size).')
  flags.DEFINE_integer('batch_size', 0, 'Windows per batch over all devices, a multiple of the '
                       f'device count; 0 = {WINDOWS_PER_DEVICE} per device.')
  flags.DEFINE_bool('use_best', True, 'Use the step selected on validation loss (--nouse_best: '
                    'the last step).')
  flags.DEFINE_enum('units', 'auto', UNITS, 'Units of the input values; auto detects dB or '
                    'linear power from the VV and VH bands.')
  flags.DEFINE_bool('progress', True, 'Progress bar over windows on stderr (--noprogress: off).')
  flags.mark_flags_as_required(['checkpoint', 'input', 'output'])


def input_paths(flagged: Sequence[str] | None, positional: Sequence[str]) -> list[str]:
  """--input values followed by the plain arguments (absl leaves those in argv)."""
  flagged = list(flagged or [])
  if positional and len(flagged) > 1:
    # absl returns the two lists separately, so their interleaving (the band order) is lost.
    raise app.UsageError('give the inputs either as repeated --input flags or as one --input '
                         f'followed by the file names, not both (got --input {flagged} and '
                         f'{list(positional)})')
  return flagged + list(positional)


def main(argv):
  f = flags.FLAGS
  if not f['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO.
  inputs = input_paths(f.input, argv[1:])
  try:
    run(f.checkpoint, inputs, f.output, overlap=f.overlap, batch_size=f.batch_size,
        use_best=f.use_best, units=f.units, progress=f.progress)
  except (ValueError, OSError) as e:  # Bad inputs, paths or checkpoints: the message says it.
    print(f'mae_jax.tools.predict: error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
