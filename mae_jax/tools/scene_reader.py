r"""A scene's input GeoTIFFs for whole-scene prediction: opened, checked, read in windows.

Inputs: one or more GeoTIFFs on one pixel grid (same CRS, transform and size) whose bands,
concatenated in the order given, are the model's 12 channels in ``schema.BAND_NAMES`` order:
e.g. one 12-band file or three 4-band files (VV-VH, VV, VH, each winter..fall). When every band
has a description and they name the channels (any case or separators), the bands are put in
order by name instead. Values are sigma0 in dB (linear power is detected from the VV and VH
bands, or stated with ``--units``, and converted; VV-VH then is the ratio); stated units that
the values clearly contradict are refused. No-data as the GeoTIFF ingestion has it: the files'
nodata values and masks, NaN and infinities, and in VV and VH exact 0 and values below the
noise floor. Each window is then clipped and quantised as the dataset tiles were, into the
storage form of the model's contract (``data_pipeline.quantise``: float16 dB, or uint8 codes
that the model decodes on the device), so a window seen here equals the same pixels seen as a
dataset tile.

A scene whose pixel size or CRS is not the model's (``InputContract.pixel_size_m`` in a
projected CRS) is read resampled onto the model's grid, which the map is then written on
(:func:`on_grid`; the grid, the resampling and why: ``mae_jax.tools.scene_grid``). Each decision
(units, grid) is one line of ``Scene.decisions``.

Windows are read by a few threads ahead of the model; GDAL's block cache is sized from the
inputs' block layout and the window, not from the scene (``read_cache_bytes``;
``GDAL_CACHEMAX`` in the environment overrides it).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import re
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import rasterio
import rasterio.errors
import rasterio.windows

from data_pipeline.ingest import composite
from data_pipeline import quantise
from data_pipeline import schema
from mae_jax.tools import scene_grid
from mae_jax.tools import scene_windows

# GDAL's block cache (decoded input blocks, output blocks waiting to be written) is set from the
# inputs' block layout, never from the scene's size (read_cache_bytes), within these bounds, in
# bytes (rasterio hands an integer to GDAL as bytes). Too small a cache thrashes: a window whose
# blocks do not all fit decodes a tile again for every band.
MIN_GDAL_CACHE = 32 << 20
MAX_GDAL_CACHE = 2 << 30
# Cache for opening the inputs (the patches that decide the units).
OPEN_GDAL_CACHE = 64 << 20
# Threads reading windows (GDAL decodes with the GIL released); each has its own file handles.
READ_WORKERS = max(1, min(4, os.cpu_count() or 1))
# Windows read per task of a reading thread.
READ_CHUNK = 4
# The units are decided on UNITS_PATCHES x UNITS_PATCHES patches of UNITS_PATCH px spread over
# the scene.
UNITS_PATCHES = 5
UNITS_PATCH = 64
UNITS = ('auto', 'dB', 'linear')
_UNIT_WORDS = {'dB': 'dB', 'linear': 'linear power'}
# Relative tolerance (in pixel sizes) when comparing geotransforms: float text in headers.
TRANSFORM_TOLERANCE = 1e-6



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
  # The files' own grid when it is not the model's (on_grid): (crs, transform, height, width)
  # above are then the model's grid, which the files are read resampled onto. None: the files
  # are read as stored.
  files_grid: scene_grid.Grid | None = None
  # How the units and the grid were decided, one line each ('' = not decided here).
  units_note: str = ''
  grid_note: str = ''

  @property
  def files(self) -> scene_grid.Grid:
    """The grid the files are on."""
    return self.files_grid or scene_grid.Grid(self.crs, self.transform, self.width, self.height)

  @property
  def decisions(self) -> tuple[str, ...]:
    return tuple(line for line in (self.units_note, self.grid_note) if line)

  @property
  def scale(self) -> float:
    """Files' pixels per model pixel along a side (about; 1 when read as stored)."""
    files = self.files
    return math.sqrt(files.width * files.height / (self.width * self.height))

  @property
  def striped(self) -> list[str]:
    """The files stored in strips (blocks of whole rows) rather than tiles."""
    files = self.files
    return [p for p, (rows, cols) in zip(self.paths, self.block_shapes)
            if cols >= files.width and rows < files.height]


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


def is_backscatter(band_name: str) -> bool:
  """VV or VH (not the VV-VH ratio, which may be 0 or very negative): the bands that decide the
  units and have a noise floor."""
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
    values[i] = band_to_db(values[i], backscatter[i], units, nodata[band - 1])
  return values


def band_to_db(values: np.ndarray, backscatter: bool, units: str,
               declared: float | None = None) -> np.ndarray:
  """One band's values as stored -> float32 dB with no-data NaN, by the rules of
  :func:`_read_masked`: NaN and infinities, the ``declared`` nodata value, and in a VV or VH band
  (``backscatter``) exact 0 and, after conversion to dB, values below the noise floor. Also for
  arrays handed to the Python API (``mae_jax.tools.api``), whose no-data is NaN alone."""
  fills = (() if declared is None else (declared,)) + (
      composite.DEFAULT_NODATA_VALUES if backscatter else ())
  # Fill values are stored values: compare before any conversion.
  values = composite.mask_nodata(values, nodata_values=fills, noise_floor_db=None)
  if units == 'linear':
    values = composite.linear_to_db(values)
  if backscatter:
    values = composite.mask_nodata(values, nodata_values=(),
                                   noise_floor_db=composite.DEFAULT_NOISE_FLOOR_DB)
  return values


def _read_resampled(dataset, indexes: Sequence[int], nodata: Sequence[float | None],
                    backscatter: Sequence[bool], units: str, scene: Scene,
                    window: rasterio.windows.Window) -> np.ndarray:
  """As :func:`_read_masked`, for ``window`` of the model's grid of a resampled scene: the files'
  pixels under it (and the kernel's margin) masked, then resampled (``scene_grid.warp_db``)."""
  files = scene.files
  transform = rasterio.windows.transform(window, scene.transform)
  shape = (int(window.height), int(window.width))
  source = scene_grid.source_window(files, scene.crs, transform, shape)
  if source is None:
    return np.full((len(indexes),) + shape, np.nan, np.float32)
  values = _read_masked(dataset, indexes, nodata, backscatter, units, window=source)
  return scene_grid.warp_db(values, files.crs, rasterio.windows.transform(source, files.transform),
                            scene.crs, transform, shape)


def _decide_units(scene: Scene, datasets, units: str) -> tuple[str, str]:
  """(units, the line saying how they were decided) of a scene's files (:func:`decide_units`
  on :func:`_units_sample`)."""
  return decide_units(_units_sample(scene, datasets), units, ' + '.join(scene.paths))


def decide_units(values: np.ndarray, units: str, name: str, option: str = '--units',
                 state: Callable[[str], str] | None = None,
                 default: str = 'auto') -> tuple[str, str]:
  """(units, the line saying how they were decided) from VV and VH values as stored (NaN =
  no-data). 'auto': detected (composite.detect_units); stated units are checked against the same
  evidence and refused when it clearly says otherwise (kept when it cannot tell).

  Args:
    values: VV and VH values (VV-VH is positive in dB and would confuse the rule).
    units: 'auto', 'dB' or 'linear'.
    name: What the values are, for messages (the file names).
    option: How units are given, for messages: '--units' on the command line.
    state: Units -> how to give them, for messages; default ``f'{option} {units}'``.
    default: The units when none are given (the advice for contradicted units differs).

  Raises:
    ValueError: 'auto' and the values do not tell, or stated units that they contradict.
  """
  state = state or (lambda value: f'{option} {value}')
  try:
    detected = composite.detect_units(values, name=name)
  except ValueError as e:
    if units == 'auto':
      raise ValueError(f'{e} (here: {state("dB")} or {state("linear")})') from e
    return units, f'units: {_UNIT_WORDS[units]} (stated with {option}; the values do not tell)'
  if units == 'auto':
    converted = ' -> converted to dB' if detected == 'linear' else ''
    return detected, f'units: {_UNIT_WORDS[detected]} detected{converted}'
  if units != detected:
    auto = f'drop {option} (auto)' if default == 'auto' else f'give {state("auto")}'
    raise ValueError(
        f'{name}: {state(units)} contradicts the values: {detected} detected from the VV and '
        f'VH bands (median {np.nanmedian(values):.4g}; composite.detect_units); {auto} or give '
        f'{state(detected)}, or check the inputs')
  return units, f'units: {_UNIT_WORDS[units]} (stated with {option}; detected too)'


def _units_sample(scene: Scene, datasets) -> np.ndarray:
  """The VV and VH values (VV-VH is positive in dB and would confuse the units rule) of a grid
  of small full-resolution patches, as stored (NaN = no-data). Not a decimated read: that goes
  band by band over the whole scene, and when the decoded tiles do not fit GDAL's cache it
  decodes every tile again for every band."""
  side = min(UNITS_PATCH, scene.height, scene.width)
  rows = np.linspace(0, scene.height - side, UNITS_PATCHES).astype(int)
  cols = np.linspace(0, scene.width - side, UNITS_PATCHES).astype(int)
  samples = []
  for f, dataset in enumerate(datasets):
    bands = [b for (g, b), name in zip(scene.sources, scene.band_names)
             if g == f and is_backscatter(name)]
    if not bands:
      continue
    for row in sorted(set(rows)):
      for col in sorted(set(cols)):
        window = rasterio.windows.Window(int(col), int(row), side, side)
        samples.append(_read_masked(dataset, bands, scene.nodata[f], [True] * len(bands), 'dB',
                                    window=window).ravel())
  return np.concatenate(samples) if samples else np.zeros(0, np.float32)


def open_scene(paths: Sequence[str], band_names: Sequence[str] = schema.BAND_NAMES,
               units: str = 'auto') -> Scene:
  """Checks the input files (exist, one grid, band count and names) and decides the units
  (:func:`_decide_units`). The scene is read as stored until placed :func:`on_grid`.

  Raises:
    FileNotFoundError: An input does not exist.
    ValueError: Different grids (naming both files and what differs), a wrong total band
      count (naming every file's count), band descriptions that do not name the channels,
      units that cannot be told, or stated units that the values contradict.
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
    decided, note = _decide_units(scene, datasets, units)
  return dataclasses.replace(scene, units=decided, units_note=note)


def on_grid(scene: Scene, pixel_size: float = schema.PIXEL_SIZE_M, resample: bool = True) -> Scene:
  """The scene on the model's grid (``scene_grid.model_grid``): read as stored when its files
  are on it, else resampled onto it. Decided from the files' grid, so applying it again (with
  another contract's pixel size) starts from the files, not from an earlier decision.

  Raises:
    ValueError: The files are not on the model's grid and ``resample`` is False.
  """
  files = scene.files
  target, note = scene_grid.model_grid(files, pixel_size, resample, ' + '.join(scene.paths))
  grid = target or files
  return dataclasses.replace(scene, crs=grid.crs, transform=grid.transform, width=grid.width,
                             height=grid.height, files_grid=None if target is None else files,
                             grid_note=note)


def for_model(contract: schema.InputContract, scene: Scene | Sequence[str], units: str = 'auto',
              resample: bool = True) -> Scene:
  """A scene (opened, or the input paths) opened for a model with ``contract``: its channels
  (reopened when the contract's band names are not the scene's; the units decided before are
  kept) and its grid (:func:`on_grid`)."""
  if not isinstance(scene, Scene):
    scene = open_scene(scene, contract.band_names, units)
  if scene.band_names != tuple(contract.band_names):
    reopened = open_scene(scene.paths, contract.band_names, scene.units)
    scene = dataclasses.replace(reopened, units_note=scene.units_note)
  return on_grid(scene, contract.pixel_size_m, resample)


class SceneReader:
  """Reads windows of a :class:`Scene` as model input; one per thread (file handles are not
  thread-safe)."""

  def __init__(self, scene: Scene, storage: quantise.StorageForm = quantise.FLOAT16):
    self.scene = scene
    self.storage = storage
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
                         [is_backscatter(scene.band_names[c]) for c in channels]))

  def read(self, row: int, col: int, size: int) -> np.ndarray:
    """The (size, size, channels) window at (row, col), stored like the dataset tiles
    (``self.storage``: clipped float16 with NaN = no-data, or uint8 codes with 0 = no-data);
    outside the scene is no-data."""
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
      read = _read_masked if scene.files_grid is None else functools.partial(
          _read_resampled, scene=scene)
      for f, (bands, channels, backscatter) in enumerate(self._plan):
        out[channels, r0:r1, c0:c1] = read(self._datasets[f], bands, scene.nodata[f],
                                           backscatter, scene.units, window=inside)
    # As data_pipeline.writer.quantise_image: the one encoder of the storage form.
    return self.storage.encode(out.transpose(1, 2, 0))

  def close(self) -> None:
    for dataset in self._datasets:
      dataset.close()
    self._datasets = []


def read_windows(scene: Scene, windows: Iterable[scene_windows.Window], size: int,
                 storage: quantise.StorageForm
                 ) -> Iterator[tuple[scene_windows.Window, np.ndarray]]:
  """(window, image) in grid order, read ahead by READ_WORKERS threads (a bounded look-ahead,
  so memory stays a few chunks whatever the scene)."""
  local = threading.local()
  readers, lock = [], threading.Lock()

  def read_chunk(chunk):
    reader = getattr(local, 'reader', None)
    if reader is None:
      reader = local.reader = SceneReader(scene, storage)
      with lock:
        readers.append(reader)
    return [(w, reader.read(w.row, w.col, size)) for w in chunk]

  windows = iter(windows)
  chunks = iter(lambda: list(itertools.islice(windows, READ_CHUNK)), [])
  pool = thread_pool('read', READ_WORKERS)
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


def thread_pool(name: str, workers: int) -> concurrent.futures.ThreadPoolExecutor:
  """Threads shared by every scene of the process: new threads for every scene would each get
  a fresh malloc arena, and a process predicting many scenes would grow by tens of MB each."""
  if name not in _POOLS:
    _POOLS[name] = concurrent.futures.ThreadPoolExecutor(workers,
                                                         thread_name_prefix=f'predict-{name}')
  return _POOLS[name]


def read_cache_bytes(scene: Scene, size: int) -> int:
  """GDAL cache for reading ``size``-px windows: every block a window touches, in every file
  and band, for each reading thread, twice (so the next window along the row finds the blocks
  it shares with this one). Depends on the block layout and the window, not on the scene size,
  except for striped (untiled) files, whose blocks are whole rows; capped at MAX_GDAL_CACHE. A
  resampled scene's window covers ``size`` times its scale of the files' pixels, and a margin."""
  need = 0
  if scene.files_grid is not None:
    size = math.ceil(size * scene.scale) + 2 * scene_grid.kernel_margin(scene.scale)
  for (rows, cols), bytes_per_pixel in zip(scene.block_shapes, scene.bytes_per_pixel):
    blocks = (math.ceil(size / rows) + 1) * (math.ceil(size / cols) + 1)
    need += blocks * rows * cols * bytes_per_pixel
  return int(min(max(2 * READ_WORKERS * need, MIN_GDAL_CACHE), MAX_GDAL_CACHE))


def gdal_env(cache_bytes: int) -> rasterio.Env:
  # An explicit GDAL_CACHEMAX in the environment wins (GDAL reads it itself, '64' meaning MB).
  options = {} if 'GDAL_CACHEMAX' in os.environ else {'GDAL_CACHEMAX': int(cache_bytes)}
  return rasterio.Env(**options)
