"""The one place that defines what a mae_jax tile is.

Band order, units, clipping, on-disk quantisation, WorldCover class codes, region names and the
TFDS feature spec live here and are imported everywhere else. The band order follows the poster's
authors' released code: VV-VH for winter, spring, summer, fall, then VV for the four
seasons, then VH. All backscatter is sigma0 in dB; VV-VH is the dB difference (= the log ratio).

The :class:`InputContract` travels with every dataset (TFDS metadata) and every checkpoint, so a
model always says how its inputs were made and normalised.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

# --- Bands -----------------------------------------------------------------------------------

SEASONS = ('winter', 'spring', 'summer', 'fall')
# Winter starts on 1 December of the year before; the others are the calendar quarters after it.
SEASON_MONTHS = {'winter': (12, 1, 2), 'spring': (3, 4, 5), 'summer': (6, 7, 8), 'fall': (9, 10, 11)}
PRODUCTS = ('vv_minus_vh', 'vv', 'vh')
BAND_NAMES = tuple(f'{product}_{season}' for product in PRODUCTS for season in SEASONS)
NUM_CHANNELS = len(BAND_NAMES)  # 12


def band_index(product: str, season: str) -> int:
  """Channel index of one (product, season) pair in the project's band order."""
  return BAND_NAMES.index(f'{product}_{season}')


def product_indices(product: str) -> list[int]:
  """Channel indices of the four seasons of one product, in season order."""
  return [band_index(product, season) for season in SEASONS]


UNITS = 'dB'
# Values are clipped to this range before quantisation. It keeps urban corner reflectors
# (+25 dB) and the noise floor (below -45 dB) while bounding float16 error to < 0.02 dB.
CLIP_RANGE_DB = (-50.0, 30.0)

# --- Storage forms ---------------------------------------------------------------------------
# How a dataset stores its images, chosen per dataset by its builder (``data_pipeline.quantise``
# encodes and decodes; the device decodes, ``mae_jax.preprocess``):
#   * 'float16': dB values clipped to CLIP_RANGE_DB, NaN = no-data (4.8 MB per 448 px tile);
#   * 'uint8': per-channel linear codes (2.4 MB per tile): 0 = no-data, 1..255 evenly over the
#     channel's [code_min, code_max] dB (UINT8_RANGE_DB), values outside it clipped to its ends.
FLOAT16 = 'float16'
UINT8 = 'uint8'
STORAGE_DTYPES = (FLOAT16, UINT8)
STORAGE_DTYPE = FLOAT16  # The default.
QUANTISATION = 'float16 of dB values clipped to CLIP_RANGE_DB; NaN marks no-data pixels'
QUANTISATION_UINT8 = ('uint8 codes of dB values clipped to CLIP_RANGE_DB, then to each channel\'s '
                      '[code_min, code_max]: code 0 = no-data, codes 1..255 evenly spaced from '
                      'code_min to code_max (round to nearest)')
UINT8_NODATA_CODE = 0
# Per-product dB range of codes 1..255, fixed (not fitted to a dataset's percentiles) so that a
# code means the same dB in every dataset and a build needs no pass before writing. Each spans
# what sigma0 physically takes in a 10 m IW GRD pixel, speckle included: VV from below the noise
# floor (NESZ about -22 to -26 dB, single-look speckle tails ~10 dB lower) up to bright urban
# double bounce; VH the same shifted down by the usual 10 dB cross-pol loss; VV-VH from the
# slightly negative ratios speckle gives over dark surfaces to the +25 dB of corner reflectors.
# Steps are 50 / 254 = 0.197 dB (VV, VH) and 35 / 254 = 0.138 dB (VV-VH): rounding errs by at
# most half a step, 0.10 / 0.07 dB, against a speckle spread of ~2.2 dB per pixel at 4.4 looks.
# Clipped (bench/bench_storage.py): of the real samples 0.005 % of BigEarthNet VV (below -35 dB),
# 0.009 % of VV-VH (below -10), no VH nor pyroSAR VV; of synthetic tiles 0.03 % of VV (corner
# reflectors above +15 dB), 0.002 % of VH and of VV-VH.
UINT8_RANGE_DB = {'vv_minus_vh': (-10.0, 25.0), 'vv': (-35.0, 15.0), 'vh': (-45.0, 5.0)}
UINT8_CODES = 254  # Steps between code 1 and code 255.
COMPOSITE_METHOD_SYNTHETIC = 'synthetic (per-season draw, speckle in linear power, then dB)'
# Side of a tile pixel, in metres: tiles are on a north-up grid of square pixels in a projected
# CRS with metre units (the UTM zone of the area, ``data_pipeline.ingest.tiling``).
PIXEL_SIZE_M = 10.0

# --- Labels ----------------------------------------------------------------------------------

# ESA WorldCover map codes, in class-index order 0..10.
WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
WORLDCOVER_NAMES = ('tree_cover', 'shrubland', 'grassland', 'cropland', 'built_up',
                    'bare_sparse_vegetation', 'snow_and_ice', 'permanent_water',
                    'herbaceous_wetland', 'mangroves', 'moss_and_lichen')
# ESA's own legend colours (from the product's palette), RGB.
WORLDCOVER_COLORS = ((0, 100, 0), (255, 187, 34), (255, 255, 76), (240, 150, 255),
                     (250, 0, 0), (180, 180, 180), (240, 240, 240), (0, 100, 200),
                     (0, 150, 160), (0, 207, 117), (250, 230, 160))
NUM_CLASSES = len(WORLDCOVER_CODES)  # 11
WORLDCOVER_NODATA_CODE = 0
IGNORE_INDEX = 255  # class index stored for no-data label pixels


def worldcover_codes_to_indices(codes: np.ndarray) -> np.ndarray:
  """Maps ESA WorldCover codes (10..100, 0 = no data) to class indices 0..10 (255 = ignore)."""
  lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
  for index, code in enumerate(WORLDCOVER_CODES):
    lookup[code] = index
  codes = np.asarray(codes)
  if codes.dtype != np.uint8:
    if codes.size and (codes.min() < 0 or codes.max() > 255):
      raise ValueError(f'WorldCover codes must lie in 0..255, got {codes.min()}..{codes.max()}')
    codes = codes.astype(np.uint8)
  return lookup[codes]


VCF_MISSING = float('nan')  # per-tile percent tree cover when too few valid MODIS cells

# --- Regions ---------------------------------------------------------------------------------

REGIONS = ('europe', 'south_america', 'conus', 'china', 'africa')
PRETRAIN_REGIONS = ('conus', 'europe', 'china')
SPLITS = ('train', 'validation', 'test')

# --- Feature spec ----------------------------------------------------------------------------

# Names of the features of one serialised tile.
IMAGE = 'image'
WORLDCOVER = 'worldcover'
VCF = 'vcf'
LAT = 'lat'
LON = 'lon'
REGION = 'region'
TILE_ID = 'tile_id'
# Where the tile lies and what it was made from, so any tile can be traced back and put on a map.
CRS = 'crs'  # e.g. 'EPSG:32633'; '' for tiles that are not georeferenced (the embedded dataset)
TRANSFORM = 'transform'  # affine (a, b, c, d, e, f) of the tile's grid, pixel -> CRS; NaN if none
SOURCES = 'sources'  # the files the tile was read from, one path per line
NOT_GEOREFERENCED = {CRS: '', TRANSFORM: (float('nan'),) * 6}


def join_sources(paths) -> str:
  """The value of the SOURCES feature for a list of file paths."""
  paths = [str(p) for p in paths]
  bad = [p for p in paths if '\n' in p]
  if bad:
    raise ValueError(f'source paths cannot contain newlines: {bad}')
  return '\n'.join(paths)


def tfds_features(tile_size: int, num_channels: int = NUM_CHANNELS,
                  storage_dtype: str = STORAGE_DTYPE):
  """The TFDS FeaturesDict of one tile, its image in ``storage_dtype`` (``STORAGE_DTYPES``).
  Imported lazily: tensorflow is heavy."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  _check_storage_dtype(storage_dtype)
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      # Raw little-endian bytes (float16 or uint8 codes): the cheapest format to decode on the
      # host, which copies them into the batch as they are (the device decodes them).
      IMAGE: tensor(shape=(tile_size, tile_size, num_channels), dtype=tf.as_dtype(storage_dtype),
                    encoding=tfds.features.Encoding.BYTES),
      WORLDCOVER: tensor(shape=(tile_size, tile_size), dtype=tf.uint8,
                         encoding=tfds.features.Encoding.BYTES),
      VCF: tensor(shape=(), dtype=tf.float32),
      LAT: tensor(shape=(), dtype=tf.float32),
      LON: tensor(shape=(), dtype=tf.float32),
      REGION: tfds.features.ClassLabel(names=REGIONS),
      TILE_ID: tfds.features.Text(),
      CRS: tfds.features.Text(),
      TRANSFORM: tensor(shape=(6,), dtype=tf.float64),
      SOURCES: tfds.features.Text(),
  })


def _check_storage_dtype(storage_dtype: str) -> None:
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f'storage dtype {storage_dtype!r} is not one of {STORAGE_DTYPES}')


def uint8_code_ranges(band_names: Sequence[str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(code_min, code_max) per channel from UINT8_RANGE_DB, by each band's product (the name
  before its season suffix)."""
  lows, highs = [], []
  for name in band_names:
    product, _, season = name.rpartition('_')
    if season not in SEASONS or product not in UINT8_RANGE_DB:
      raise ValueError(f'band {name!r} is not <product>_<season> of a product with a uint8 '
                       f'range ({sorted(UINT8_RANGE_DB)}): no 8-bit storage for it')
    low, high = UINT8_RANGE_DB[product]
    lows.append(low)
    highs.append(high)
  return tuple(lows), tuple(highs)


# --- Input contract --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InputContract:
  """How a dataset's pixels were made: recorded with the data and with every checkpoint."""
  band_names: tuple[str, ...] = BAND_NAMES
  units: str = UNITS
  clip_range: tuple[float, float] = CLIP_RANGE_DB
  storage_dtype: str = STORAGE_DTYPE
  quantisation: str = QUANTISATION
  nodata: str = 'NaN'
  composite: str = COMPOSITE_METHOD_SYNTHETIC
  tile_size: int = 448
  pixel_size_m: float = PIXEL_SIZE_M
  # Per-channel statistics of the training split, in dB, over valid pixels (of the stored
  # values as decoded).
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()
  # uint8 storage only (empty for float16): the dB of code 1 and of code 255, per channel.
  code_min: tuple[float, ...] = ()
  code_max: tuple[float, ...] = ()

  # How the pixels are stored, not what they mean: a model accepts data stored otherwise
  # (``differences`` leaves these out by default), since every reader decodes its data with the
  # data's own contract into dB before the model's normalisation (``mae_jax.preprocess``).
  STORAGE_FIELDS = ('storage_dtype', 'quantisation', 'nodata', 'code_min', 'code_max')

  def __post_init__(self):
    object.__setattr__(self, 'band_names', tuple(self.band_names))
    object.__setattr__(self, 'clip_range', tuple(float(v) for v in self.clip_range))
    for name in ('mean', 'std', 'code_min', 'code_max'):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
      values = getattr(self, name)
      if values and len(values) != len(self.band_names):
        raise ValueError(f'InputContract.{name} has {len(values)} values for '
                         f'{len(self.band_names)} bands')
    if self.std and min(self.std) <= 0:
      raise ValueError(f'InputContract.std must be positive, got {self.std}')
    _check_storage_dtype(self.storage_dtype)
    if self.storage_dtype == UINT8:
      if not self.code_min or not self.code_max:
        raise ValueError('a uint8 InputContract needs code_min and code_max per channel (the dB '
                         'of codes 1 and 255): make it with InputContract.with_storage')
      bad = [name for name, low, high in zip(self.band_names, self.code_min, self.code_max)
             if not low < high]
      if bad:
        raise ValueError(f'InputContract code_min must be below code_max, not in {bad}')
      if min(self.code_min) < self.clip_range[0] or max(self.code_max) > self.clip_range[1]:
        raise ValueError(f'InputContract code ranges must lie within clip_range {self.clip_range}'
                         f' (values are clipped to it first), got {min(self.code_min)}..'
                         f'{max(self.code_max)}')
    elif self.code_min or self.code_max:
      raise ValueError(f'InputContract code_min / code_max are for uint8 storage, not '
                       f'{self.storage_dtype!r}')

  def with_storage(self, storage_dtype: str) -> 'InputContract':
    """This contract with its images stored as ``storage_dtype`` (``STORAGE_DTYPES``): the
    storage fields set from the schema (uint8: the ranges of UINT8_RANGE_DB)."""
    _check_storage_dtype(storage_dtype)
    if storage_dtype == FLOAT16:
      return dataclasses.replace(self, storage_dtype=FLOAT16, quantisation=QUANTISATION,
                                 nodata='NaN', code_min=(), code_max=())
    code_min, code_max = uint8_code_ranges(self.band_names)
    return dataclasses.replace(self, storage_dtype=UINT8, quantisation=QUANTISATION_UINT8,
                               nodata=f'code {UINT8_NODATA_CODE}', code_min=code_min,
                               code_max=code_max)

  def storage_of(self, other: 'InputContract') -> 'InputContract':
    """This contract (bands, statistics...) with ``other``'s storage fields."""
    return dataclasses.replace(self, **{f: getattr(other, f) for f in self.STORAGE_FIELDS})

  @property
  def num_channels(self) -> int:
    return len(self.band_names)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2)

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> 'InputContract':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
      raise ValueError(f'Unknown InputContract fields: {sorted(unknown)}')
    return cls(**values)

  def differences(self, other: 'InputContract',
                  ignore: Sequence[str] = ('mean', 'std', 'tile_size') + STORAGE_FIELDS
                  ) -> list[str]:
    """Human-readable differences between two contracts (empty when compatible).

    By default the storage form (``STORAGE_FIELDS``) is left out: each side decodes its own
    pixels to dB, so a model trained on float16 tiles takes uint8 ones and the other way round;
    what remains is the rounding (at most half a uint8 step, <= 0.1 dB) and the clipping of the
    tails outside the uint8 ranges (``storage_differences`` names them, for a log line).
    """
    out = []
    for field in dataclasses.fields(self):
      if field.name in ignore:
        continue
      mine, theirs = getattr(self, field.name), getattr(other, field.name)
      if mine != theirs:
        out.append(f'{field.name}: {mine!r} != {theirs!r}')
    return out

  def storage_summary(self) -> str:
    """The storage form in a few words, e.g. 'uint8 codes over (-45, 5), ... dB'."""
    if self.storage_dtype == UINT8:
      ranges = ', '.join(f'({low:g}, {high:g})' for low, high in
                         sorted(set(zip(self.code_min, self.code_max))))
      return f'uint8 codes over {ranges} {self.units} (0 = no-data)'
    return f'{self.storage_dtype} {self.units} (NaN = no-data)'

  def storage_differences(self, other: 'InputContract') -> str:
    """'' when both store their pixels alike (``STORAGE_FIELDS``), else a sentence saying how
    each does, for a log line."""
    if all(getattr(self, f) == getattr(other, f) for f in self.STORAGE_FIELDS):
      return ''
    return f'stored as {self.storage_summary()} vs {other.storage_summary()}'
