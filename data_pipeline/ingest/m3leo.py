"""Reads the chips the poster's authors released (geetiles / M3LEO layout) into mae_jax units.

One folder per area of interest, as the authors' geetiles tooling writes it::

  <aoi>/<aoi>_partitions_aschips_<hash>.geojson        chip polygons (EPSG:4326), 13-hex ids
  <aoi>/<aoi>_partitions_aschips_<hash>_splits_60bands_angle<a>_60-20-20.csv   identifier, split
  <aoi>/<aoi>_partitions_aschips_<hash>/s1grd-2020/<identifier>.tif       16 x uint8 backscatter
  <aoi>/<aoi>_partitions_aschips_<hash>/modis44b006veg/<identifier>.tif   MOD44B VCF
  <aoi>/<aoi>_partitions_aschips_<hash>/esaworldcover-2020/<identifier>.tif  WorldCover codes

(geetiles puts the dataset folders in a folder named like the GeoJSON without its extension;
:class:`ChipSet` also accepts them directly under ``<aoi>/``.)

:class:`ChipSet` indexes one area: chip ids, bounds, centres and splits (the authors' CSV via
``splits.read_split_csv``, so 'val' reads as 'validation'), and the file of a chip in a dataset.
:func:`read_s1_chip` decodes one ``s1grd-2020`` GeoTIFF into the project's 12 channels
(``schema.BAND_NAMES``, dB); :func:`constant_channels` finds the channels that made the authors
skip a tile.

The ``s1grd-2020`` encoding. Earth Engine seasonal composites of ``COPERNICUS/S1_GRD`` (dB), 16
bands (:data:`S1GRD_BANDS`): per season (winter, spring, summer, fall) vv_asc, vv_des, vh_asc,
vh_des, stored as ``uint8 = 255 * (dB + 30) / 30`` without clipping first. So a uint8 step is 30 /
255 = 0.118 dB and only -30..0 dB is representable: darker and brighter values end up at 0 and
255 (assuming the integer cast saturates, which the authors do not document).
Decoding: ``dB = uint8 * 30 / 255 - 30``.

Units: the authors' loader (M3LEO ``fdlsar.io.load_s1grd``) works in the stored units and takes
VV-VH as the difference of the uint8 values (cast to int16), i.e. 255 / 30 = 8.5 times the dB
difference. mae_jax works in dB throughout (``schema.UNITS``), so its VV-VH channels are the dB
difference and differ from the authors' by that factor of 8.5 (and VV, VH by the affine decoding).
``read_s1_chip(..., authors_units=True)`` returns the authors' values exactly, for comparisons.

No-data. The encoding reserves no value for no data: 0 is -30 dB, and (with a saturating cast)
every darker pixel, which is common in VH over calm water, sand and tarmac. Treating 0 as no data
would delete real dark pixels, so by default 0 decodes to -30 dB like any other value. A season
without acquisitions arrives as a whole channel of one value (Earth Engine fills masked pixels
with 0), which :func:`constant_channels` detects; tiles with a constant channel are dropped, as
the authors did (``skip_constant_channels``). ``zero_as_nodata=True`` turns 0 into NaN instead,
for data known to carry partial masks.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Iterator, Sequence

import numpy as np
import rasterio.transform

from data_pipeline.ingest import labels
from data_pipeline import schema
from data_pipeline.ingest import splits

# --- Layout ----------------------------------------------------------------------------------

S1_DATASET = 's1grd-2020'
VCF_DATASET = 'modis44b006veg'
WORLDCOVER_DATASET = 'esaworldcover-2020'
DATASETS = (S1_DATASET, VCF_DATASET, WORLDCOVER_DATASET)
CHIP_SIZE = 448  # pixels per chip side in the authors' exports
CHIP_CRS = 'EPSG:4326'
# geetiles names the chip id column 'identifier' (PartitionSet, the split CSVs use it too).
ID_PROPERTY = 'identifier'
GEOJSON_PATTERN = '*_partitions_aschips_*.geojson'
SPLIT_CSV_PATTERN = '*_splits_*.csv'
# GeoJSON 'crs' members that mean lon/lat WGS84 (RFC 7946 drops the member; GDAL writes CRS84).
_LONLAT_CRS_NAMES = frozenset({'urn:ogc:def:crs:OGC:1.3:CRS84', 'urn:ogc:def:crs:OGC::CRS84',
                               'urn:ogc:def:crs:EPSG::4326', 'EPSG:4326', 'OGC:CRS84'})

# --- Sentinel-1 encoding ---------------------------------------------------------------------

S1_PASSES = ('asc', 'des')
_S1_POL_PASS = (('vv', 'asc'), ('vv', 'des'), ('vh', 'asc'), ('vh', 'des'))
# Band order of an s1grd GeoTIFF (M3LEO's S1GRD_BANDS): per season vv_asc, vv_des, vh_asc, vh_des.
S1GRD_BANDS = tuple(f'{season}_{pol}{direction}' for season in schema.SEASONS
                    for pol, direction in _S1_POL_PASS)
S1GRD_NUM_BANDS = len(S1GRD_BANDS)  # 16
S1_UINT8_RANGE_DB = (-30.0, 0.0)  # dB at uint8 0 and 255
S1_UINT8_STEPS_PER_DB = 255.0 / 30.0  # 8.5: the authors' VV-VH is this times the dB difference


def decode_s1_uint8(values) -> np.ndarray:
  """uint8 values of an s1grd GeoTIFF to dB (float64): ``uint8 * 30 / 255 - 30``."""
  low, high = S1_UINT8_RANGE_DB
  return np.asarray(values, dtype=np.float64) * (high - low) / 255.0 + low


def read_s1_chip(path, passes: str = 'asc', *, authors_units: bool = False,
                 zero_as_nodata: bool = False) -> np.ndarray:
  """Reads one ``s1grd-2020`` chip as the project's 12 channels.

  Channels follow ``schema.BAND_NAMES``: VV-VH for winter, spring, summer, fall, then VV, then
  VH, all from the passes chosen (ascending by default, as the authors' MAE).

  Band lookup: when the file's band descriptions are exactly the names of :data:`S1GRD_BANDS`
  (in any order) bands are taken by name; without descriptions (or with unrelated ones) by
  position in that order. A nodata value declared by the file is ignored: the encoding has none
  (see ``zero_as_nodata``).

  Args:
    path: The GeoTIFF (``<...>/s1grd-2020/<identifier>.tif``).
    passes: 'asc' (ascending) or 'des' (descending).
    authors_units: False (default): dB; VV and VH decoded, VV-VH = VV_dB - VH_dB. True: the
      authors' loader's values before normalisation, exactly: VV and VH the stored uint8 values,
      VV-VH their int16 difference (8.5 x the dB difference). Both come as float32.
    zero_as_nodata: Make pixels stored as 0 NaN (in VV-VH where either input is 0). Off by
      default: 0 is the legal (saturated) -30 dB; see the module docstring.

  Returns:
    float32 array (H, W, 12).

  Raises:
    FileNotFoundError: The file does not exist (message names it).
    labels.RasterReadError: GDAL cannot read it, e.g. a truncated GeoTIFF (names the file).
    ValueError: Not 16 bands, not uint8, inconsistent band descriptions or a bad argument (all
      naming the file).
  """
  if passes not in S1_PASSES:
    raise ValueError(f'passes must be one of {S1_PASSES}, got {passes!r}')
  path = os.fspath(path)
  wanted = [f'{season}_{pol}{passes}' for pol in ('vv', 'vh') for season in schema.SEASONS]
  with labels.open_raster(path) as dataset:
    if dataset.count != S1GRD_NUM_BANDS:
      raise ValueError(f'{path}: expected {S1GRD_NUM_BANDS} bands (per season vv_asc, vv_des, '
                       f'vh_asc, vh_des), found {dataset.count}')
    dtypes = sorted(set(dataset.dtypes))
    if dtypes != ['uint8']:
      raise ValueError(f'{path}: expected uint8 bands (255 * (dB + 30) / 30), found {dtypes}')
    positions = _s1_band_positions(dataset.descriptions, path)
    # Only the 8 bands of the chosen passes are decoded.
    raw = dataset.read([positions[name] + 1 for name in wanted])
  bands = dict(zip(wanted, raw.astype(np.int16)))

  height, width = raw.shape[1:]
  image = np.empty((height, width, schema.NUM_CHANNELS), np.float32)
  for season in schema.SEASONS:
    vv = bands[f'{season}_vv{passes}']
    vh = bands[f'{season}_vh{passes}']
    if authors_units:
      vv_out, vh_out, diff = vv.astype(np.float64), vh.astype(np.float64), (vv - vh)
    else:
      vv_out, vh_out = decode_s1_uint8(vv), decode_s1_uint8(vh)
      diff = vv_out - vh_out
    diff = np.asarray(diff, np.float64)
    if zero_as_nodata:
      vv_out = np.where(vv == 0, np.nan, vv_out)
      vh_out = np.where(vh == 0, np.nan, vh_out)
      diff = np.where((vv == 0) | (vh == 0), np.nan, diff)
    image[..., schema.band_index('vv_minus_vh', season)] = diff
    image[..., schema.band_index('vv', season)] = vv_out
    image[..., schema.band_index('vh', season)] = vh_out
  return image


def _s1_band_positions(descriptions: Sequence[str | None], path: str) -> dict[str, int]:
  """0-based file position of each S1GRD band name."""
  names = [d or '' for d in descriptions]
  if sorted(names) == sorted(S1GRD_BANDS):
    return {name: names.index(name) for name in S1GRD_BANDS}
  known = [name for name in names if name in S1GRD_BANDS]
  if known:
    # Some but not all authors' names: a different or damaged layout, where position would lie.
    raise ValueError(f'{path}: band descriptions {names} name some s1grd bands but not exactly '
                     f'{list(S1GRD_BANDS)}')
  return {name: i for i, name in enumerate(S1GRD_BANDS)}


def constant_channels(image) -> np.ndarray:
  """Indices of the channels of an (H, W, C) image that hold a single value.

  The authors skip a tile when any channel is constant (per-channel std < 1e-7 after their
  normalisation); for uint8-derived data that is exact constancy, which is tested here: a season
  Earth Engine filled with 0 is such a channel. NaNs are ignored, and an all-NaN channel (a
  season without acquisitions in mae_jax's own composites) is no-data, not constant: the model
  leaves no-data out of its loss, so such tiles are kept.

  Args:
    image: Array (H, W, C), e.g. from :func:`read_s1_chip`.

  Returns:
    int64 array of channel indices (empty when the tile is usable).
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f'image must be (H, W, C), got shape {image.shape}')
  flat = image.reshape(-1, image.shape[-1]).astype(np.float64)
  finite = np.isfinite(flat)
  if not flat.shape[0]:
    return np.arange(image.shape[-1], dtype=np.int64)
  high = np.where(finite, flat, -np.inf).max(axis=0)
  low = np.where(finite, flat, np.inf).min(axis=0)
  return np.flatnonzero(finite.any(axis=0) & ~(high > low)).astype(np.int64)


# --- Chips -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip: id, bounds (west, south, east, north) in degrees, split or None if not listed."""
  identifier: str
  bounds: tuple[float, float, float, float]
  split: str | None

  @property
  def lon(self) -> float:
    """Centre longitude: middle of the bounds."""
    return 0.5 * (self.bounds[0] + self.bounds[2])

  @property
  def lat(self) -> float:
    """Centre latitude: middle of the bounds."""
    return 0.5 * (self.bounds[1] + self.bounds[3])

  def transform(self, size: int = CHIP_SIZE) -> rasterio.transform.Affine:
    """Affine transform of a size x size EPSG:4326 grid over the chip bounds."""
    return rasterio.transform.from_bounds(*self.bounds, size, size)


class ChipSet:
  """The chips of one area of interest in the authors' layout.

  Chip centres are the middle of each geometry's bounds. (geetiles' own banding used the mean of
  the five vertices of the closed envelope ring, which counts one corner twice; that only
  matters when re-deriving splits, for which the CSV is the reference.)

  Chips listed in the GeoJSON but not in the split CSV get split None and are left out of
  :meth:`identifiers` for a named split; ids in the CSV but not in the GeoJSON are an error (the
  two files do not belong together).
  """

  def __init__(self, aoi_dir, *, id_property: str = ID_PROPERTY, geojson_path=None,
               split_csv=None):
    """Indexes one area.

    Args:
      aoi_dir: The area's folder (``<aoi>/``).
      id_property: GeoJSON feature property holding the chip id.
      geojson_path: The chip GeoJSON; default: the one ``*_partitions_aschips_*.geojson`` in
        ``aoi_dir`` (geetiles' ``*_expanded.geojson`` copies are ignored).
      split_csv: The split CSV; default (None): the one ``*_splits_*.csv`` in ``aoi_dir`` (if
        several, the ones named after the GeoJSON; still several is an error). False: no split
        file, every chip's split is None.

    Raises:
      FileNotFoundError: Missing folder, GeoJSON or split CSV.
      ValueError: Ambiguous files, malformed GeoJSON (naming file and feature), duplicate or
        missing ids, or CSV ids that are not in the GeoJSON.
    """
    self.aoi_dir = os.fspath(aoi_dir)
    if not os.path.isdir(self.aoi_dir):
      raise FileNotFoundError(f'{self.aoi_dir}: no such area folder')
    self.name = os.path.basename(os.path.normpath(self.aoi_dir))
    self.id_property = id_property
    if geojson_path is None:
      candidates = [p for p in glob.glob(os.path.join(self.aoi_dir, GEOJSON_PATTERN))
                    if not p.endswith('_expanded.geojson')]
      geojson_path = _exactly_one(candidates, f'{self.aoi_dir}/{GEOJSON_PATTERN}',
                                  'geojson_path')
    self.geojson_path = os.fspath(geojson_path)
    features = _read_chip_geojson(self.geojson_path, id_property)

    stem = os.path.splitext(os.path.basename(self.geojson_path))[0]
    if split_csv is None:
      candidates = sorted(glob.glob(os.path.join(self.aoi_dir, SPLIT_CSV_PATTERN)))
      named = [p for p in candidates if os.path.basename(p).startswith(stem + '_splits_')]
      split_csv = _exactly_one(named or candidates, f'{self.aoi_dir}/{SPLIT_CSV_PATTERN}',
                               'split_csv')
    if split_csv is False:
      self.split_csv_path = None
      split_of = {}
    else:
      self.split_csv_path = os.fspath(split_csv)
      split_of = splits.read_split_csv(self.split_csv_path)
      unknown = [i for i in split_of if i not in features]
      if unknown:
        raise ValueError(f'{self.split_csv_path}: {len(unknown)} identifier(s) not in '
                         f'{self.geojson_path}, e.g. {unknown[:3]}')

    self._chips = {identifier: Chip(identifier, bounds, split_of.get(identifier))
                   for identifier, bounds in features.items()}
    # geetiles' folder for per-chip files is named like the GeoJSON; fall back to the area folder.
    nested = os.path.join(os.path.dirname(self.geojson_path), stem)
    self.data_dir = nested if os.path.isdir(nested) else self.aoi_dir

  def __repr__(self) -> str:
    return f'ChipSet({self.aoi_dir!r}, {len(self)} chips)'

  def __len__(self) -> int:
    return len(self._chips)

  def __iter__(self) -> Iterator[Chip]:
    return iter(self._chips.values())

  def __contains__(self, identifier) -> bool:
    return identifier in self._chips

  def __getitem__(self, identifier: str) -> Chip:
    try:
      return self._chips[identifier]
    except KeyError:
      raise KeyError(f'chip {identifier!r} is not in {self.geojson_path}') from None

  @property
  def chips(self) -> tuple[Chip, ...]:
    """All chips, in GeoJSON order."""
    return tuple(self._chips.values())

  def identifiers(self, split: str | None = None) -> list[str]:
    """Chip ids in GeoJSON order; only those of one split ('train', 'validation', 'test')."""
    if split is None:
      return list(self._chips)
    if split not in schema.SPLITS:
      raise ValueError(f'split must be one of {schema.SPLITS}, got {split!r}')
    return [i for i, chip in self._chips.items() if chip.split == split]

  def centres(self, identifiers: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) float64 arrays of chip centres, for all chips or the ones given."""
    chips = self.chips if identifiers is None else [self[i] for i in identifiers]
    return (np.array([c.lon for c in chips], np.float64),
            np.array([c.lat for c in chips], np.float64))

  def chip_path(self, identifier: str, dataset: str, must_exist: bool = True) -> str:
    """Path of ``<dataset>/<identifier>.tif``; FileNotFoundError naming it when missing."""
    _ = self[identifier]  # Unknown ids raise KeyError naming the GeoJSON.
    path = os.path.join(self.data_dir, dataset, f'{identifier}.tif')
    if must_exist and not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no {dataset} file for chip {identifier!r}')
    return path

  def available(self, dataset: str, identifiers: Sequence[str] | None = None) -> list[str]:
    """The ids (default: all, GeoJSON order) that have a file in ``dataset``."""
    identifiers = self.identifiers() if identifiers is None else identifiers
    return [i for i in identifiers
            if os.path.isfile(self.chip_path(i, dataset, must_exist=False))]

  def read_s1(self, identifier: str, passes: str = 'asc', **kwargs) -> np.ndarray:
    """:func:`read_s1_chip` of one chip's ``s1grd-2020`` file."""
    return read_s1_chip(self.chip_path(identifier, S1_DATASET), passes, **kwargs)

  def vcf_target(self, identifier: str, **kwargs) -> float:
    """``labels.vcf_tile_mean`` of the chip's ``modis44b006veg`` file over the chip bounds."""
    return labels.vcf_tile_mean(self.chip_path(identifier, VCF_DATASET),
                                self[identifier].bounds, CHIP_CRS, **kwargs)

  def worldcover(self, identifier: str, size: int = CHIP_SIZE) -> np.ndarray:
    """``labels.worldcover_tile`` of the chip's WorldCover file on a size x size chip grid."""
    chip = self[identifier]
    return labels.worldcover_tile(self.chip_path(identifier, WORLDCOVER_DATASET),
                                  chip.transform(size), CHIP_CRS, (size, size))


# --- Helpers ---------------------------------------------------------------------------------


def _exactly_one(candidates: Sequence[str], pattern: str, argument: str) -> str:
  """The single candidate file, or an error saying what was (not) found."""
  if not candidates:
    raise FileNotFoundError(f'no file matches {pattern}')
  if len(candidates) > 1:
    raise ValueError(f'several files match {pattern}: {sorted(candidates)}; pass {argument}=')
  return candidates[0]


def _read_chip_geojson(path: str, id_property: str) -> dict[str, tuple[float, ...]]:
  """{identifier: (west, south, east, north)} of the features of a chip GeoJSON, in file order."""
  try:
    with open(path, encoding='utf-8') as f:
      collection = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f'{path}: not valid JSON ({error})') from None
  if not isinstance(collection, dict) or collection.get('type') != 'FeatureCollection':
    raise ValueError(f'{path}: expected a GeoJSON FeatureCollection')
  crs = collection.get('crs')
  if crs is not None:
    name = (crs.get('properties') or {}).get('name') if isinstance(crs, dict) else None
    if name not in _LONLAT_CRS_NAMES:
      raise ValueError(f'{path}: chip geometries must be lon/lat (EPSG:4326), crs is {crs!r}')
  out = {}
  for number, feature in enumerate(collection.get('features') or []):
    where = f'{path}, feature {number}'
    if not isinstance(feature, dict):
      raise ValueError(f'{where}: not a GeoJSON Feature object')
    properties = feature.get('properties') or {}
    if id_property not in properties or properties[id_property] in (None, ''):
      raise ValueError(f'{where}: no {id_property!r} property (has {sorted(properties)})')
    identifier = str(properties[id_property]).strip()
    if identifier in out:
      raise ValueError(f'{where}: identifier {identifier!r} appears twice')
    out[identifier] = _geometry_bounds(feature.get('geometry'), where)
  if not out:
    raise ValueError(f'{path}: no features')
  return out


def _geometry_bounds(geometry, where: str) -> tuple[float, float, float, float]:
  """(west, south, east, north) over all positions of a GeoJSON geometry."""
  if not isinstance(geometry, dict):
    raise ValueError(f'{where}: missing geometry')
  xs, ys = [], []

  def visit(node):
    if node.get('type') == 'GeometryCollection':
      for child in node.get('geometries') or []:
        visit(child)
      return
    stack = [node.get('coordinates')]
    while stack:
      item = stack.pop()
      if (isinstance(item, (list, tuple)) and len(item) >= 2
          and all(isinstance(v, (int, float)) for v in item)):
        xs.append(float(item[0]))
        ys.append(float(item[1]))
      elif isinstance(item, (list, tuple)):
        stack.extend(item)

  visit(geometry)
  if not xs or not all(math.isfinite(v) for v in xs + ys):
    raise ValueError(f'{where}: geometry has no finite coordinates')
  return min(xs), min(ys), max(xs), max(ys)
