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
STORAGE_DTYPE = 'float16'
QUANTISATION = 'float16 of dB values clipped to CLIP_RANGE_DB; NaN marks no-data pixels'
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


def tfds_features(tile_size: int, num_channels: int = NUM_CHANNELS):
  """The TFDS FeaturesDict of one tile. Imported lazily: tensorflow is heavy."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tensor = tfds.features.Tensor
  return tfds.features.FeaturesDict({
      # Raw little-endian float16 bytes: the cheapest format to decode on the host.
      IMAGE: tensor(shape=(tile_size, tile_size, num_channels), dtype=tf.float16,
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
  # Per-channel statistics of the training split, in dB, over valid pixels.
  mean: tuple[float, ...] = ()
  std: tuple[float, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, 'band_names', tuple(self.band_names))
    object.__setattr__(self, 'clip_range', tuple(float(v) for v in self.clip_range))
    object.__setattr__(self, 'mean', tuple(float(v) for v in self.mean))
    object.__setattr__(self, 'std', tuple(float(v) for v in self.std))
    for name in ('mean', 'std'):
      values = getattr(self, name)
      if values and len(values) != len(self.band_names):
        raise ValueError(f'InputContract.{name} has {len(values)} values for '
                         f'{len(self.band_names)} bands')
    if self.std and min(self.std) <= 0:
      raise ValueError(f'InputContract.std must be positive, got {self.std}')

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
                  ignore: Sequence[str] = ('mean', 'std', 'tile_size')) -> list[str]:
    """Human-readable differences between two contracts (empty when compatible)."""
    out = []
    for field in dataclasses.fields(self):
      if field.name in ignore:
        continue
      mine, theirs = getattr(self, field.name), getattr(other, field.name)
      if mine != theirs:
        out.append(f'{field.name}: {mine!r} != {theirs!r}')
    return out
