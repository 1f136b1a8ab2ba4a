"""A deterministic, physically plausible synthetic Sentinel-1 dataset with WorldCover labels.

Each tile imitates a 10 m Sentinel-1 IW GRD season composite (the 12 bands of ``schema.BAND_NAMES``)
over a WorldCover label map and a MODIS-like percent tree cover, built in numpy from
``(seed, index, tile_size, region)`` alone. It lets the whole pipeline, pretraining and fine-tuning
run without network access, and it is learnable: the labels drive the backscatter, so a model that
learns SAR texture and seasonality can later predict the labels.

The physics imitated, in generation order:

* **Terrain and land cover.** A smooth random "elevation" field and one smooth random field per
  class; each pixel takes the class with the highest field plus the log of a per-tile class
  weight, drawn around the region's class mix. Fields of water, wetland and mangroves are tied to
  low elevation and snow and moss to high, so mangroves fringe water and snow caps hills. Cropland
  is snapped to rectangular parcels (120-480 m), as fields are.
* **Mean backscatter per class and season** (sigma0, dB, VV and VH). Water is a specular mirror
  (VV about -22, VH near the noise floor -28); forest is volume scattering (VV -7.5, VH -13, a
  small leaf-on change); built-up is double bounce (VV about +1, VH -9, plus a few corner
  reflectors 8-18 dB brighter); grass, shrub and bare soil are rough surfaces (VV -12..-15, VH
  -20..-24); herbaceous wetland and mangroves add double bounce off the water under the stems;
  wet snow in spring is very dark. Each crop parcel follows one phenology (summer crop, winter
  cereal, rice, fallow): bare soil in winter, a VH rise of 5-8 dB at peak biomass, flooded rice
  paddies dark in spring. The seasonal changes of natural classes fade towards the tropics (crops
  keep their full cycle), and all seasons flip in the southern hemisphere (the band names are
  boreal seasons).
* **Nuisance variation** that a model must see through: the tile's incidence angle (backscatter
  drops with angle, steeply on water), wind on water per season, smooth soil-moisture fields per
  season (rain brightens soils, barely forests), terrain slopes facing or away from the radar
  (foreshortening brightens, the same in all seasons), persistent within-patch texture and a
  random offset per crop parcel.
* **Speckle.** Coherent imaging multiplies the power by a Gamma(L, 1/L) variable (unit mean);
  L = ``LOOKS`` = 4.4 is the equivalent number of looks of an IW GRD high-resolution product.
  It is drawn in linear power, independently per season and polarisation (a composite of a
  single scene: real composites of several scenes are smoother), then converted to dB. VV-VH is
  the dB difference of the speckled VV and VH, as in real data, not an independent draw.
* **No data.** About 30 % of tiles lose a border strip or a swath-edge wedge (NaN in all 12
  channels, WorldCover ``schema.IGNORE_INDEX`` there). About 3 % of tiles lose one whole
  season (NaN in that season's 3 channels only, labels kept), as where Sentinel-1B's failure on
  2021-12-23 left no acquisition in a season.
* Values are clipped to ``schema.CLIP_RANGE_DB``; the VCF target is the mean over valid pixels of
  a per-class tree fraction, plus a little noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple

import numpy as np

from data_pipeline import schema

LOOKS = 4.4  # equivalent number of looks of Sentinel-1 IW GRD high resolution
NODATA_TILE_FRACTION = 0.3  # tiles with a no-data border or swath-edge wedge
MISSING_SEASON_FRACTION = 0.03  # tiles with one season entirely missing (post Sentinel-1B)


class _ClassSar(NamedTuple):
  """Backscatter model and tree fraction of one WorldCover class."""
  vv: float  # annual mean sigma0 VV, dB
  vh: float  # annual mean sigma0 VH, dB
  vv_season: tuple[float, float, float, float]  # boreal winter..fall change, dB (sums to 0)
  vh_season: tuple[float, float, float, float]
  moisture: float  # response to the soil-moisture fields, 0 (none) .. 1 (bare soil)
  texture: float  # std of persistent within-patch variation, dB
  tree: float  # fraction of tree cover, for the VCF target


_NO_SEASON = (0.0, 0.0, 0.0, 0.0)
# In schema.WORLDCOVER_NAMES order.
_CLASS_SAR = (
    _ClassSar(-7.5, -13.0, (-0.6, 0.0, 0.4, 0.2), (-0.9, 0.0, 0.6, 0.3), 0.3, 0.8, 0.85),
    _ClassSar(-12.5, -20.0, (-0.3, 0.3, 0.3, -0.3), (-0.5, 0.5, 0.5, -0.5), 0.7, 1.0, 0.15),
    _ClassSar(-13.5, -21.5, (-0.8, 0.4, 0.8, -0.4), (-1.2, 0.6, 1.2, -0.6), 0.8, 0.8, 0.03),
    # Cropland: parcels follow _CROP_PROFILES instead; this row only sets moisture/texture/tree.
    _ClassSar(-12.5, -19.5, _NO_SEASON, _NO_SEASON, 1.0, 0.4, 0.03),
    _ClassSar(1.0, -9.0, _NO_SEASON, _NO_SEASON, 0.1, 2.0, 0.05),
    _ClassSar(-15.0, -23.5, _NO_SEASON, _NO_SEASON, 1.0, 1.2, 0.0),
    # Snow: dry snow is transparent (ground below), wet spring snow absorbs.
    _ClassSar(-13.5, -21.0, (2.5, -4.5, -0.5, 2.5), (2.0, -4.5, -0.5, 3.0), 0.0, 1.0, 0.0),
    _ClassSar(-22.0, -28.5, _NO_SEASON, _NO_SEASON, 0.0, 0.5, 0.0),
    # Herbaceous wetland: spring flooding under the stems brightens VV by double bounce.
    _ClassSar(-10.0, -18.0, (-0.5, 1.5, 0.0, -1.0), (-0.5, 0.5, 0.5, -0.5), 0.5, 1.2, 0.10),
    _ClassSar(-7.0, -13.0, _NO_SEASON, _NO_SEASON, 0.2, 0.6, 0.70),
    _ClassSar(-14.5, -22.0, (1.0, -1.5, 0.0, 0.5), (1.0, -1.5, 0.0, 0.5), 0.6, 0.8, 0.0),
)
_CROP = schema.WORLDCOVER_NAMES.index('cropland')
_BUILT = schema.WORLDCOVER_NAMES.index('built_up')
_WATER = schema.WORLDCOVER_NAMES.index('permanent_water')

# Absolute boreal-season (VV, VH) profiles in dB of the crop types, winter..fall.
_CROP_PROFILES = {
    'summer_crop': ((-14.5, -13.0, -8.5, -11.5), (-23.0, -21.5, -14.5, -18.5)),  # maize, soy
    'winter_cereal': ((-12.5, -11.5, -13.0, -14.0), (-20.5, -16.5, -19.5, -22.5)),  # wheat
    'rice': ((-14.0, -18.0, -8.5, -12.0), (-22.0, -25.0, -15.0, -19.0)),  # flooded in spring
    'fallow': ((-13.0, -12.5, -12.0, -12.5), (-20.5, -19.5, -19.0, -19.5)),
}

# Correlation of each class's field with elevation: water, wetland and mangroves lie low, farms
# and towns in the valleys, snow and moss high.
_ELEVATION_CORRELATION = np.array([0.2, 0.2, 0.0, -0.3, -0.3, 0.3, 0.9, -0.9, -0.7, -0.8, 0.6])


class _Region(NamedTuple):
  lat: tuple[float, float]
  lon: tuple[float, float]
  classes: tuple[float, ...]  # prior class mix, schema.WORLDCOVER_NAMES order
  crops: tuple[float, ...]  # crop type mix, _CROP_PROFILES order


# classes: tree, shrub, grass, crop, built, bare, snow, water, wetland, mangroves, moss.
# crops: summer crop, winter cereal, rice, fallow.
_REGIONS = {
    'europe': _Region(
        (40.0, 60.0), (-10.0, 30.0),
        classes=(.30, .04, .20, .30, .07, .01, .005, .05, .015, 0, .005),
        crops=(.4, .4, 0, .2)),
    'south_america': _Region(
        (-30.0, 5.0), (-75.0, -40.0),
        classes=(.55, .06, .14, .08, .02, .02, .002, .06, .05, .02, 0),
        crops=(.6, .1, .2, .1)),
    'conus': _Region(
        (25.0, 49.0), (-124.0, -67.0),
        classes=(.28, .17, .20, .20, .05, .04, .005, .04, .02, .002, .003),
        crops=(.5, .3, .05, .15)),
    'china': _Region(
        (20.0, 45.0), (98.0, 122.0),
        classes=(.27, .05, .22, .25, .07, .07, .02, .04, .005, .001, .005),
        crops=(.3, .3, .3, .1)),
    'africa': _Region(
        (-30.0, 15.0), (-15.0, 40.0),
        classes=(.15, .25, .25, .08, .02, .20, 0, .03, .015, .005, 0),
        crops=(.5, .2, .1, .2)),
}
assert tuple(_REGIONS) == schema.REGIONS
_CONCENTRATION = 3.0  # of the per-tile class weights around the region mix: low = sparse tiles


@dataclasses.dataclass(frozen=True)
class SyntheticTile:
  """One synthetic tile with the same fields as a real one (see schema's feature spec)."""
  image: np.ndarray  # (H, W, 12) float32 dB, schema.BAND_NAMES order; NaN = no data
  worldcover: np.ndarray  # (H, W) uint8 class index, schema.IGNORE_INDEX where no data
  vcf: float  # percent tree cover of the tile
  lat: float
  lon: float
  region: str
  tile_id: str


def speckle(rng: np.random.Generator, power: np.ndarray, looks: float) -> np.ndarray:
  """Multiplies linear power by unit-mean Gamma(looks, 1/looks) speckle (float32)."""
  noise = rng.standard_gamma(looks, size=power.shape, dtype=np.float32)
  return power * (noise / np.float32(looks))


def region_for_index(seed: int, index: int) -> str:
  """The region of tile ``index``: uniform over schema.REGIONS, from its own random stream."""
  rng = np.random.default_rng([seed, index, 1])  # third word: not the tile's own stream
  return schema.REGIONS[rng.integers(len(schema.REGIONS))]


def generate_tiles(seed: int, count: int, tile_size: int = 448,
                   start: int = 0) -> Iterator[SyntheticTile]:
  """Tiles ``start .. start + count - 1``, each in its region_for_index region."""
  for index in range(start, start + count):
    yield generate_tile(seed, index, tile_size)


def generate_tile(seed: int, index: int, tile_size: int = 448,
                  region: str | None = None) -> SyntheticTile:
  """Generates one tile; it depends only on the arguments.

  Args:
    seed: dataset seed.
    index: tile number within the dataset.
    tile_size: height and width in 10 m pixels.
    region: one of schema.REGIONS; None takes region_for_index(seed, index).

  Returns:
    The tile, its image float32 (tile_size, tile_size, 12) in schema.BAND_NAMES order.
  """
  region = region_for_index(seed, index) if region is None else region
  if region not in _REGIONS:
    raise ValueError(f'Unknown region {region!r}, expected one of {schema.REGIONS}')
  config = _REGIONS[region]
  rng = np.random.default_rng([seed, index])
  shape = (tile_size, tile_size)
  lat, lon = rng.uniform(*config.lat), rng.uniform(*config.lon)

  elevation = _smooth_fields(rng, 1, shape, sigma=50.0)[0]
  labels, parcels = _land_cover(rng, config, elevation)
  power = 10.0 ** (_mean_backscatter_db(rng, config, labels, parcels, elevation, lat) / 10.0)
  db = 10.0 * np.log10(speckle(rng, power, LOOKS))  # (2 pols, 4 seasons, H, W)
  vv, vh = np.clip(db, *schema.CLIP_RANGE_DB)
  ratio = np.clip(vv - vh, *schema.CLIP_RANGE_DB)
  image = np.ascontiguousarray(np.concatenate([ratio, vv, vh]).transpose(1, 2, 0))

  nodata = _nodata_mask(rng, shape)
  image[nodata] = np.nan
  worldcover = np.where(nodata, schema.IGNORE_INDEX, labels).astype(np.uint8)
  if rng.random() < MISSING_SEASON_FRACTION:
    season = schema.SEASONS[rng.integers(len(schema.SEASONS))]
    image[..., [schema.band_index(product, season) for product in schema.PRODUCTS]] = np.nan

  counts = np.bincount(labels[~nodata], minlength=schema.NUM_CLASSES)
  tree = np.array([c.tree for c in _CLASS_SAR]) @ counts / max(counts.sum(), 1)
  vcf = float(np.clip(100.0 * tree + rng.normal(0.0, 2.0), 0.0, 100.0))
  return SyntheticTile(image=image, worldcover=worldcover, vcf=vcf, lat=float(lat),
                       lon=float(lon), region=region, tile_id=f'syn-{seed}-{index:07d}')


def _smooth_fields(rng: np.random.Generator, count: int, shape: tuple[int, int],
                   sigma: float) -> np.ndarray:
  """``count`` Gaussian random fields of unit variance, correlation length ~sigma pixels.

  Each field is a sum of Gaussian bumps with random amplitudes on a lattice of spacing sigma / 2.
  The kernel is separable, so a field is two small matrix products: much cheaper than filtering
  a full-resolution noise image. Rows are normalised so that every pixel has variance exactly 1.
  """
  rows, cols = _bump_kernel(shape[0], sigma), _bump_kernel(shape[1], sigma)
  noise = rng.standard_normal((count, rows.shape[1], cols.shape[1]), dtype=np.float32)
  return rows @ noise @ cols.T


@functools.lru_cache(maxsize=32)
def _bump_kernel(size: int, sigma: float) -> np.ndarray:
  """(size, centres) Gaussian bumps, centres beyond the edges too, rows of unit norm."""
  centres = np.arange(-2.0 * sigma, size + 2.0 * sigma, sigma / 2.0)
  k = np.exp(-0.5 * ((np.arange(size)[:, None] - centres[None, :]) / sigma) ** 2)
  k = (k / np.sqrt((k ** 2).sum(axis=1, keepdims=True))).astype(np.float32)
  k.flags.writeable = False  # shared between calls
  return k


def _land_cover(rng: np.random.Generator, config: _Region,
                elevation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Class-index map (H, W) and crop-parcel ids (H, W) of one tile."""
  prior = np.array(config.classes)
  weights = np.zeros(schema.NUM_CLASSES)
  weights[prior > 0] = rng.gamma(_CONCENTRATION * prior[prior > 0] / prior.sum())
  weights /= weights.sum()
  # Classes too rare to win anywhere cost no fields (speed); weights are always > 0 somewhere.
  present = np.flatnonzero(weights > 1e-4)
  correlation = _ELEVATION_CORRELATION[present][:, None, None]
  patches = _smooth_fields(rng, len(present), elevation.shape, sigma=30.0)
  edges = _smooth_fields(rng, len(present), elevation.shape, sigma=6.0)  # ragged boundaries
  scores = 1.3 * (correlation * elevation + np.sqrt(1 - correlation ** 2) * patches
                  + 0.3 * edges) + np.log(weights[present])[:, None, None]
  labels = present[scores.argmax(axis=0)]

  parcels = _parcel_ids(rng, elevation.shape)
  if _CROP in present:
    # Fields are rectangles: a parcel is all cropland when most of it would be, else none is.
    scores[present == _CROP] = -np.inf
    other = present[scores.argmax(axis=0)]
    is_crop = labels == _CROP
    crop_fraction = np.bincount(parcels.ravel(), is_crop.ravel()) / np.bincount(parcels.ravel())
    labels = np.where((crop_fraction[parcels] > 0.5) & (other != _WATER), _CROP, other)
  return labels.astype(np.uint8), parcels


def _parcel_ids(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """Ids of an irregular grid of rectangular parcels, 12-47 pixels on a side."""
  def bins(size):
    edges = np.cumsum(rng.integers(12, 48, size=size // 12 + 1))
    return np.searchsorted(edges, np.arange(size), side='right')

  rows, cols = bins(shape[0]), bins(shape[1])
  return rows[:, None] * (cols.max() + 1) + cols[None, :]


def _mean_backscatter_db(rng: np.random.Generator, config: _Region, labels: np.ndarray,
                         parcels: np.ndarray, elevation: np.ndarray, lat: float) -> np.ndarray:
  """Speckle-free sigma0 in dB, shape (2 pols VV/VH, 4 seasons, H, W)."""
  shape = labels.shape
  # Seasons fade towards the equator and are six months apart across it.
  gain = np.clip((abs(lat) - 10.0) / 25.0, 0.15, 1.0)
  shift = 2 if lat < 0 else 0
  sar = _CLASS_SAR
  base = np.array([[c.vv for c in sar], [c.vh for c in sar]])  # (2, classes)
  seasonal = np.array([[c.vv_season for c in sar], [c.vh_season for c in sar]])  # (2, cl, 4)
  table = (base[:, :, None] + gain * np.roll(seasonal, shift, axis=2)).astype(np.float32)
  mean = table.transpose(0, 2, 1)[:, :, labels]  # (2, 4, H, W) float32

  # Crop parcels: one phenology and one brightness offset (tillage, row direction) per parcel.
  crop = labels == _CROP
  if crop.any():
    profiles = np.roll(np.array(list(_CROP_PROFILES.values())), shift, axis=2)  # (types, 2, 4)
    count = parcels.max() + 1
    kinds = rng.choice(len(profiles), size=count, p=config.crops)
    offsets = rng.normal(0.0, 1.0, size=(count, 1, 1)) + rng.normal(0.0, 0.5, size=(count, 2, 1))
    per_parcel = (profiles[kinds] + offsets).transpose(1, 2, 0)  # (2, 4, parcels)
    mean[:, :, crop] = per_parcel[:, :, parcels[crop]]

  # Incidence angle: backscatter falls with angle, specular water much faster.
  incidence_offset = rng.uniform(30.0, 45.0) - 37.5
  water = labels == _WATER
  mean += np.where(water, -0.3, -0.1).astype(np.float32) * np.float32(incidence_offset)
  # Wind roughens water differently in each season's acquisitions.
  wind = rng.normal(0.0, [[1.2], [0.6]], size=(2, 4))
  mean[:, :, water] += wind[:, :, None]

  # Soil moisture: a smooth field and a tile-wide wetness per season, VH responding less.
  moisture = np.array([c.moisture for c in sar], dtype=np.float32)[labels]
  wet = _smooth_fields(rng, 4, shape, sigma=60.0) + rng.normal(
      0.0, 0.7, size=(4, 1, 1)).astype(np.float32)
  wet *= moisture
  mean[0] += wet
  mean[1] += 0.8 * wet

  # Persistent effects, the same in every season: slopes facing the radar (looking along +x)
  # are brighter; texture within patches; corner reflectors in built-up areas.
  relief = np.float32(3.0 * rng.uniform() ** 2)
  slope = np.gradient(elevation, axis=1) * np.float32(50.0 * np.sqrt(2.0))  # ~unit std
  texture = np.array([c.texture for c in sar], dtype=np.float32)[labels]
  persistent = np.where(water, 0.0, relief * slope) + texture * _smooth_fields(
      rng, 1, shape, sigma=3.0)[0]
  mean += persistent
  reflectors = (labels == _BUILT) & (rng.random(shape) < 0.02)
  mean[:, :, reflectors] += rng.uniform([[8.0], [4.0]], [[18.0], [10.0]],
                                        size=(2, reflectors.sum()))[:, None, :]
  return mean


def _nodata_mask(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """True where the tile has no data: a border strip, a swath-edge wedge, or nothing."""
  mask = np.zeros(shape, dtype=bool)
  if rng.random() >= NODATA_TILE_FRACTION:
    return mask
  height, width = shape
  rows, cols = np.arange(height)[:, None] / height, np.arange(width)[None, :] / width
  if rng.random() < 0.5:  # a strip along one side, 5-40 % of the tile wide
    depth = rng.uniform(0.05, 0.4)
    mask[...] = [rows < depth, rows > 1 - depth, cols < depth, cols > 1 - depth][rng.integers(4)]
  else:  # a swath edge cutting one corner off
    across, down = rng.uniform(0.2, 1.0, size=2)
    if rng.random() < 0.5:
      rows = 1 - rows
    if rng.random() < 0.5:
      cols = 1 - cols
    mask[...] = cols / across + rows / down < 1
  return mask
