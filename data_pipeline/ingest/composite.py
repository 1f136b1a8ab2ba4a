"""Seasonal composites of Sentinel-1 VV / VH acquisitions into the project's 12-channel tiles.

Input kind (b) of issue 3: one GeoTIFF per acquisition and polarisation (sigma0 in dB or in
linear power, stated or detected from the values), with the acquisition date in the file name or
in a GeoTIFF tag. This module turns a set of such files on one common grid into one
``(H, W, 12)`` float32 tile in ``schema.BAND_NAMES`` order, in dB, NaN for no data:

1. :class:`Acquisition` describes one file (:meth:`Acquisition.from_file` reads date and
   polarisation from the name or tags: :func:`parse_acquisition_date`, :func:`parse_polarisation`).
2. :func:`read_acquisitions` reads them (optionally one window) into VV and VH stacks, checking
   that every file is on the same grid (CRS, transform, shape; putting rasters on a common grid is
   the tiling module's job, not this one's), masking no data (:func:`nodata_mask`) and converting
   linear power to dB (:func:`linear_to_db`, units from :func:`detect_units` when 'auto').
3. :func:`season_of` assigns each date to a season of the composite year: winter of year Y is
   1 December of Y-1 to the end of February of Y (``schema.SEASON_MONTHS``), so a December date
   belongs to the NEXT year's composite.
4. :func:`seasonal_composite` reduces each season over its valid acquisitions (:data:`METHODS`);
   :func:`compose_tile` assembles VV, VH and VV-VH = VV_dB - VH_dB per season.

A season without any valid value at a pixel is NaN there, never 0. Tiles with a constant channel
are dropped by the caller with :func:`constant_channels` (the one in ``m3leo``, re-exported here).
An all-NaN channel (an empty season) is no-data, not constant, so such tiles are kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import rasterio.errors
import rasterio.windows
from affine import Affine

from data_pipeline.ingest import labels
from data_pipeline import schema
# Reused, not redefined: one definition of "constant channel" for every ingestion path.
from data_pipeline.ingest.m3leo import constant_channels  # pylint: disable=unused-import

POLARISATIONS = ('VV', 'VH')
UNITS = ('dB', 'linear', 'auto')

# --- Composite methods -----------------------------------------------------------------------

# Method name -> the text recorded in the dataset metadata (InputContract.composite). The median
# of dB values is the default because the authors used it; it is also robust to the odd bright
# or dark outlier acquisition (wet snow, frozen ground, rain cells).
METHODS = {
    'median_db': 'per-season median of sigma0 in dB over valid acquisitions',
    'mean_db': 'per-season mean of sigma0 in dB over valid acquisitions',
    'mean_linear': 'per-season mean of sigma0 in linear power over valid acquisitions, then dB',
}
DEFAULT_METHOD = 'median_db'

# --- No data ---------------------------------------------------------------------------------

# Exact source values that mean "no data" in addition to NaN and the file's declared nodata.
# 0 is a legal dB value, but it is Earth Engine's default fill for masked pixels and a real
# continuous backscatter value is essentially never exactly 0.0, so masking it costs nothing
# on real data. Pass () to keep exact zeros.
DEFAULT_NODATA_VALUES = (0.0,)
# Values below this (dB) are masked: the Sentinel-1 IW noise-equivalent sigma0 is about -22 to
# -26 dB, so anything far below it is an artefact of thermal-noise subtraction, a fill value
# (-99) or log10(0) = -inf, not a measurement. Equal to the bottom of schema.CLIP_RANGE_DB so
# no valid pixel is changed by the later clipping at that end.
DEFAULT_NOISE_FLOOR_DB = schema.CLIP_RANGE_DB[0]


def nodata_mask(values_db, nodata_values: Sequence[float] = DEFAULT_NODATA_VALUES,
                noise_floor_db: float | None = DEFAULT_NOISE_FLOOR_DB) -> np.ndarray:
  """True where a dB value is no data: NaN / inf, an exact no-data value, or below the floor.

  Args:
    values_db: Array of sigma0 in dB (any shape).
    nodata_values: Exact values that mean no data (see :data:`DEFAULT_NODATA_VALUES`); NaN
      entries are allowed and redundant.
    noise_floor_db: Values strictly below it are no data; None disables the floor.

  Returns:
    Boolean array of the shape of ``values_db``.
  """
  values = np.asarray(values_db)
  mask = ~np.isfinite(values)
  for value in nodata_values:
    if not math.isnan(value):
      mask |= values == value
  if noise_floor_db is not None:
    with np.errstate(invalid='ignore'):
      mask |= values < noise_floor_db
  return mask


def mask_nodata(values_db, nodata_values: Sequence[float] = DEFAULT_NODATA_VALUES,
                noise_floor_db: float | None = DEFAULT_NOISE_FLOOR_DB) -> np.ndarray:
  """A float32 copy of ``values_db`` with every :func:`nodata_mask` pixel set to NaN."""
  out = np.array(values_db, dtype=np.float32)
  out[nodata_mask(out, nodata_values, noise_floor_db)] = np.nan
  return out


def linear_to_db(values) -> np.ndarray:
  """10 log10 of linear sigma0, float32; non-positive and non-finite values become NaN."""
  values = np.asarray(values, dtype=np.float64)
  out = np.full(values.shape, np.nan)
  positive = np.isfinite(values) & (values > 0)
  out[positive] = 10.0 * np.log10(values[positive])
  return out.astype(np.float32)


# --- Units -----------------------------------------------------------------------------------

# Rule of detect_units, on the finite, non-zero values:
#   dB:     at least DB_MIN_NEGATIVE_FRACTION of them negative, median within DB_MEDIAN_RANGE.
#           Land backscatter in dB is mostly negative (VV median about -11 dB, VH about -17 dB),
#           while linear power cannot be negative at all.
#   linear: at most LINEAR_MAX_NEGATIVE_FRACTION negative (thermal-noise subtraction can leave a
#           few slightly negative values) and a median in (0, LINEAR_MAX_MEDIAN]. Linear sigma0 is
#           mostly 0..1 (a median of 1 is 0 dB, brighter than nearly any land scene's median);
#           a dB image whose values are all >= 0 yet mostly below 1 is not physical.
#   anything else is ambiguous (e.g. an all-positive dB tile of a city, or a linear tile whose
#   median is above 0 dB): detect_units refuses and the caller must state the units.
DB_MIN_NEGATIVE_FRACTION = 0.5
DB_MEDIAN_RANGE = (-50.0, 5.0)
LINEAR_MAX_NEGATIVE_FRACTION = 0.01
LINEAR_MAX_MEDIAN = 1.0


def detect_units(values, name: str | None = None) -> str:
  """Says whether backscatter values are in dB or linear power, from their distribution.

  See the rule above :data:`DB_MIN_NEGATIVE_FRACTION`. NaN, inf and exact zeros (a fill value in
  both conventions) are ignored; mask other fill values (e.g. -99) first.

  Args:
    values: Array of backscatter values of one image (any shape).
    name: What the values are (e.g. the file path), for error messages.

  Returns:
    'dB' or 'linear'.

  Raises:
    ValueError: No usable values, or a distribution the rule cannot decide (naming ``name``).
  """
  where = f'{name}: ' if name else ''
  values = np.asarray(values, dtype=np.float64).ravel()
  values = values[np.isfinite(values) & (values != 0)]
  if not values.size:
    raise ValueError(f'{where}cannot detect units: no finite non-zero values')
  negative = float(np.mean(values < 0))
  median = float(np.median(values))
  if negative >= DB_MIN_NEGATIVE_FRACTION and DB_MEDIAN_RANGE[0] <= median <= DB_MEDIAN_RANGE[1]:
    return 'dB'
  if negative <= LINEAR_MAX_NEGATIVE_FRACTION and 0 < median <= LINEAR_MAX_MEDIAN:
    return 'linear'
  raise ValueError(
      f'{where}cannot tell dB from linear power: {negative:.1%} of {values.size} values are '
      f'negative and the median is {median:.4g} (dB needs >= {DB_MIN_NEGATIVE_FRACTION:.0%} '
      f'negative and a median in {DB_MEDIAN_RANGE}; linear needs <= '
      f'{LINEAR_MAX_NEGATIVE_FRACTION:.0%} negative and a median in (0, {LINEAR_MAX_MEDIAN}]); '
      "state units='dB' or units='linear'")


def decide_units(values, stated: str = 'auto', name: str | None = None,
                 flag: str = '--units') -> tuple[str, str]:
  """The units of backscatter values, detected or stated, and checked against each other.

  'auto' takes :func:`detect_units`. Stated units ('dB', 'linear') are checked against the same
  evidence: when the values clearly say the other units (linear power stated as dB: all
  positive, mostly below 1; dB stated as linear: mostly negative), they are refused, since
  reading them so would put every pixel tens of dB off; when the values cannot tell, the stated
  units are kept. One rule for every tool that reads backscatter (the scene preparation here, and
  one a predict tool can share).

  Args:
    values: Backscatter values of one image, fill values already NaN (see :func:`detect_units`).
    stated: 'auto', 'dB' or 'linear'.
    name: What the values are (a file), for messages.
    flag: How the caller's users state units, for messages (e.g. '--units').

  Returns:
    ``(units, how)``: 'dB' or 'linear', and 'detected', 'stated, detected too' or 'stated, the
    values do not tell'.

  Raises:
    ValueError: 'auto' and the values cannot tell, or stated units the values contradict; the
      message names ``name`` and ``flag``.
  """
  if stated not in UNITS:
    raise ValueError(f'units {stated!r} is not one of {UNITS}')
  try:
    detected = detect_units(values, name=name)
  except ValueError as e:
    if stated == 'auto':
      raise ValueError(f'{e} (here: {flag} dB or {flag} linear)') from None
    return stated, 'stated, the values do not tell'
  if stated == 'auto':
    return detected, 'detected'
  if stated != detected:
    where = f'{name}: ' if name else ''
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite) & (finite != 0)]
    raise ValueError(
        f'{where}{flag} {stated} contradicts the values: they look like {detected} '
        f'({np.mean(finite < 0):.0%} negative, median {np.median(finite):.4g}; '
        f'composite.detect_units); give {flag} {detected} or {flag} auto, or check the input')
  return stated, 'stated, detected too'


# --- Names and tags --------------------------------------------------------------------------

# GeoTIFF tags that may hold the acquisition date, in order of preference (matched ignoring
# case). TIFFTAG_DATETIME is deliberately absent: it is when the file was written, not acquired.
DATE_TAGS = ('ACQUISITION_DATE', 'ACQUISITION_TIME', 'ACQUISITION_START', 'SENSING_TIME',
             'SENSING_START', 'START_TIME', 'DATE_ACQUIRED', 'DATE', 'DATETIME_ACQUIRED')
POLARISATION_TAGS = ('POLARISATION', 'POLARIZATION', 'POLARISATIONS', 'POL', 'BAND', 'BAND_NAME',
                     'DESCRIPTION')

# Sentinel-1 product and pyroSAR names carry the start time as YYYYMMDDTHHMMSS; product names
# also carry the stop time after it, so the first match (the start) is taken.
_DATETIME_IN_NAME = re.compile(r'(?<!\d)(\d{4})(\d{2})(\d{2})T\d{6}(?!\d)')
# Earth Engine and hand-made exports: 2017-06-13 or a bare 20170613 between non-digits.
_ISO_DATE_IN_NAME = re.compile(r'(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)')
_BARE_DATE_IN_NAME = re.compile(r'(?<!\d)(\d{4})(\d{2})(\d{2})(?![\dT])')
# Tag values: 2017-06-13[T16:50:43[.123][Z]], 2017:06:13 16:50:43, 2017/06/13, 20170613[T...].
_DATE_IN_TAG = re.compile(r'^\s*(\d{4})[-:/]?(\d{2})[-:/]?(\d{2})(?:$|[T\s_])')
# Bare 8-digit numbers in names are only dates within this range (guards against ids).
_BARE_DATE_YEARS = (1990, 2099)
# VV / VH as a token of its own, so '1SDV' or 'VVVH' do not count. HH / HV are recognised only to
# refuse them clearly.
_POLARISATION_IN_NAME = re.compile(r'(?<![A-Za-z])(VV|VH|HH|HV)(?![A-Za-z])', re.IGNORECASE)


def _valid_date(year: str, month: str, day: str) -> datetime.date | None:
  try:
    return datetime.date(int(year), int(month), int(day))
  except ValueError:
    return None


def _date_from_name(name: str) -> datetime.date | None:
  """The acquisition date in one file or folder name, or None; raises if several differ."""
  for pattern in (_DATETIME_IN_NAME, _ISO_DATE_IN_NAME):
    for match in pattern.finditer(name):
      date = _valid_date(*match.groups())
      if date is not None:
        return date
  dates = {_valid_date(*match.groups()) for match in _BARE_DATE_IN_NAME.finditer(name)}
  low, high = _BARE_DATE_YEARS
  dates = {d for d in dates if d is not None and low <= d.year <= high}
  if len(dates) > 1:
    raise ValueError(f'{name}: several dates in the name ({sorted(map(str, dates))}); '
                     'pass the date explicitly')
  return dates.pop() if dates else None


def _upper_keys(tags: Mapping[str, Any] | None) -> dict[str, Any]:
  return {str(key).upper(): value for key, value in (tags or {}).items()}


def parse_acquisition_date(path, tags: Mapping[str, Any] | None = None) -> datetime.date:
  """The acquisition date of one file, from its GeoTIFF tags or its name.

  Tags (:data:`DATE_TAGS`, any case) are explicit metadata and win over the name; if both give a
  date and they differ, the file is refused rather than guessed. In names, a Sentinel-1 style
  ``YYYYMMDDTHHMMSS`` (product names such as ``S1A_IW_GRDH_1SDV_20170613T165043_...``, pyroSAR's
  ``S1A__IW___A_20150309T173017_VV_...``) is tried first, then ``YYYY-MM-DD``, then a bare
  ``YYYYMMDD``; the file name first, then its folder's name (BigEarthNet puts the scene in the
  folder name). Dates are the UTC dates Sentinel-1 names and tags use.

  Args:
    path: The file (only its name and its folder's name are used; nothing is read).
    tags: Its GeoTIFF tags, e.g. ``dataset.tags()``, or None.

  Returns:
    The acquisition date.

  Raises:
    ValueError: No date found, an unparsable date tag, or conflicting dates (naming the file).
  """
  path = os.fspath(path)
  tag_date = None
  upper = _upper_keys(tags)
  for key in DATE_TAGS:
    if key in upper:
      match = _DATE_IN_TAG.match(str(upper[key]))
      tag_date = _valid_date(*match.groups()) if match else None
      if tag_date is None:
        raise ValueError(f'{path}: cannot parse the date in tag {key}={upper[key]!r}')
      break
  name_date = None
  for name in (os.path.basename(path), os.path.basename(os.path.dirname(path))):
    name_date = _date_from_name(name) if name else None
    if name_date is not None:
      break
  if tag_date is not None and name_date is not None and tag_date != name_date:
    raise ValueError(f'{path}: the tags say {tag_date} but the name says {name_date}')
  date = tag_date or name_date
  if date is None:
    raise ValueError(f'{path}: no acquisition date in the file name, its folder name or its tags '
                     f'(looked for YYYYMMDDTHHMMSS, YYYY-MM-DD, YYYYMMDD and tags {DATE_TAGS})')
  return date


def parse_polarisation(path, tags: Mapping[str, Any] | None = None) -> str:
  """'VV' or 'VH' for one single-polarisation file, from its tags or its file name.

  Tags (:data:`POLARISATION_TAGS`, any case; the band description counts when passed as
  'DESCRIPTION') win over the name. In the name, VV or VH must stand as a token of its own
  (``..._VV.tif``, ``..._VV_grd_mli...``), so the 'SDV' of '1SDV' is not read as a polarisation.

  Raises:
    ValueError: None found, both found, or HH / HV (not used here), naming the file.
  """
  path = os.fspath(path)
  upper = _upper_keys(tags)
  sources = [(f'tag {key}', str(upper[key])) for key in POLARISATION_TAGS if key in upper]
  sources.append(('file name', os.path.basename(path)))
  for where, text in sources:
    found = {match.upper() for match in _POLARISATION_IN_NAME.findall(text)}
    if not found:
      continue
    if len(found) > 1:
      raise ValueError(f'{path}: {where} {text!r} names several polarisations {sorted(found)}; '
                       'expected one single-polarisation band per file')
    polarisation = found.pop()
    if polarisation not in POLARISATIONS:
      raise ValueError(f'{path}: polarisation {polarisation} ({where}) is not one of '
                       f'{POLARISATIONS}')
    return polarisation
  raise ValueError(f'{path}: no polarisation (VV or VH) in the file name or tags')


# --- Acquisitions ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Acquisition:
  """One single-band GeoTIFF of one polarisation acquired on one (UTC) date."""
  path: str
  polarisation: str
  date: datetime.date
  units: str = 'auto'

  def __post_init__(self):
    object.__setattr__(self, 'path', os.fspath(self.path))
    if self.polarisation not in POLARISATIONS:
      raise ValueError(f'{self.path}: polarisation must be one of {POLARISATIONS}, '
                       f'got {self.polarisation!r}')
    if self.units not in UNITS:
      raise ValueError(f'{self.path}: units must be one of {UNITS}, got {self.units!r}')
    if isinstance(self.date, datetime.datetime):
      object.__setattr__(self, 'date', self.date.date())
    if not isinstance(self.date, datetime.date):
      raise ValueError(f'{self.path}: date must be a datetime.date, got {self.date!r}')

  @classmethod
  def from_file(cls, path, units: str = 'auto', polarisation: str | None = None,
                date: datetime.date | None = None) -> 'Acquisition':
    """Reads the tags of ``path`` and parses whatever of date / polarisation is not given."""
    path = os.fspath(path)
    if polarisation is None or date is None:
      with labels.open_raster(path) as dataset:
        tags = dict(dataset.tags())
        tags.update(dataset.tags(1))
        if dataset.descriptions and dataset.descriptions[0]:
          tags.setdefault('DESCRIPTION', dataset.descriptions[0])
      polarisation = polarisation or parse_polarisation(path, tags)
      date = date or parse_acquisition_date(path, tags)
    return cls(path=path, polarisation=polarisation, date=date, units=units)


def season_of(date: datetime.date, year: int) -> str | None:
  """The season of composite year ``year`` that ``date`` falls in, or None if outside that year.

  Winter of year Y runs from 1 December of Y-1 to the end of February of Y (29 February included
  in leap years); spring, summer and fall are March-May, June-August and September-November of Y.
  So December of Y belongs to winter of Y+1, not to year Y.
  """
  composite_year = date.year + 1 if date.month == 12 else date.year
  if composite_year != year:
    return None
  for season in schema.SEASONS:
    if date.month in schema.SEASON_MONTHS[season]:
      return season
  raise AssertionError(f'month {date.month} is in no season of {schema.SEASON_MONTHS}')


def seasons_of(dates: Sequence[datetime.date], year: int) -> list[str | None]:
  """:func:`season_of` for each date."""
  return [season_of(date, year) for date in dates]


# --- Reading ---------------------------------------------------------------------------------


@dataclasses.dataclass
class AcquisitionStacks:
  """VV and VH acquisitions read onto one grid: (N, H, W) float32 dB, NaN for no data."""
  vv: np.ndarray
  vh: np.ndarray
  vv_acquisitions: tuple[Acquisition, ...]
  vh_acquisitions: tuple[Acquisition, ...]
  crs: Any
  transform: Any  # of the window read, not of the whole files
  units: dict[str, str]  # path -> the units the file was read in ('dB' or 'linear')

  @property
  def vv_dates(self) -> list[datetime.date]:
    return [a.date for a in self.vv_acquisitions]

  @property
  def vh_dates(self) -> list[datetime.date]:
    return [a.date for a in self.vh_acquisitions]


# Tolerance (in pixel sizes) when comparing geotransforms: float text in GeoTIFF headers.
_TRANSFORM_TOLERANCE = 1e-6


def _check_same_grid(reference: str, ref_dataset, path: str, dataset) -> None:
  """Raises ValueError naming both files unless the two are on the same pixel grid."""
  if (ref_dataset.width, ref_dataset.height) != (dataset.width, dataset.height):
    raise ValueError(f'grid mismatch: {reference} is {ref_dataset.width} x {ref_dataset.height} '
                     f'px but {path} is {dataset.width} x {dataset.height} px; put the files on '
                     'one grid first (tiling), compositing does not resample')
  pixel = max(abs(ref_dataset.transform.a), abs(ref_dataset.transform.e), 1e-12)
  if not ref_dataset.transform.almost_equals(dataset.transform,
                                             precision=_TRANSFORM_TOLERANCE * pixel):
    raise ValueError(f'grid mismatch: {reference} has transform '
                     f'{tuple(ref_dataset.transform)[:6]} but {path} has '
                     f'{tuple(dataset.transform)[:6]}; put the files on one grid first (tiling), '
                     'compositing does not resample')


def _read_band(dataset, path: str, window) -> np.ndarray:
  """Band 1 as float64 with the file's nodata / mask as NaN; outside the raster is NaN too."""
  if dataset.count != 1:
    raise ValueError(f'{path}: expected one band per acquisition file, found {dataset.count}')
  if window is None:
    data = dataset.read(1, masked=True)
    return np.ma.filled(data.astype(np.float64), np.nan)
  out = np.full((int(window.height), int(window.width)), np.nan)
  # rasterio silently clips windows at the raster edge: read the overlap, keep the rest NaN.
  full = rasterio.windows.Window(0, 0, dataset.width, dataset.height)
  try:
    inside = window.intersection(full)
  except rasterio.errors.WindowError:
    return out
  data = dataset.read(1, window=inside, masked=True)
  row = int(inside.row_off - window.row_off)
  col = int(inside.col_off - window.col_off)
  out[row:row + data.shape[0], col:col + data.shape[1]] = np.ma.filled(
      data.astype(np.float64), np.nan)
  return out


def read_acquisitions(acquisitions: Sequence[Acquisition], window=None, *,
                      nodata_values: Sequence[float] = DEFAULT_NODATA_VALUES,
                      noise_floor_db: float | None = DEFAULT_NOISE_FLOOR_DB) -> AcquisitionStacks:
  """Reads acquisitions that share one grid into VV and VH stacks in dB.

  Per file: the file's declared nodata and GDAL mask become NaN, then ``nodata_values`` (in the
  file's own units: 0 is a fill in both), then linear power is converted to dB (non-positive ->
  NaN; units from :func:`detect_units` when the acquisition says 'auto'), then values below
  ``noise_floor_db`` become NaN.

  Args:
    acquisitions: At least one; each a single-band file.
    window: None for whole files, or a ``rasterio.windows.Window`` / (col_off, row_off, width,
      height) in pixels; parts outside the rasters are NaN (not silently clipped).
    nodata_values: See :func:`nodata_mask`.
    noise_floor_db: See :func:`nodata_mask`.

  Returns:
    :class:`AcquisitionStacks`, stacks in the order of ``acquisitions`` within each polarisation.

  Raises:
    ValueError: Different CRS, transform or shape (naming both files), multi-band files, or
      undecidable units (naming the file).
    FileNotFoundError, labels.RasterReadError: Missing or unreadable files.
  """
  if not acquisitions:
    raise ValueError('read_acquisitions needs at least one acquisition')
  if window is not None:
    if not isinstance(window, rasterio.windows.Window):
      window = rasterio.windows.Window(*window)
    window = window.round_offsets().round_lengths()
  reference = acquisitions[0].path
  stacks = {polarisation: [] for polarisation in POLARISATIONS}
  chosen = {polarisation: [] for polarisation in POLARISATIONS}
  units_read = {}
  crs = transform = None
  with labels.open_raster(reference) as ref_dataset:
    for acquisition in acquisitions:
      if acquisition.path != reference:
        labels.check_same_crs(reference, acquisition.path)
      with labels.open_raster(acquisition.path) as dataset:
        _check_same_grid(reference, ref_dataset, acquisition.path, dataset)
        values = _read_band(dataset, acquisition.path, window)
        if crs is None:
          crs = dataset.crs
          transform = dataset.transform
          if window is not None:
            transform = transform @ Affine.translation(window.col_off, window.row_off)
      for value in nodata_values:
        if not math.isnan(value):
          values[values == value] = np.nan
      units = acquisition.units
      if units == 'auto':
        units = detect_units(values, name=acquisition.path)
      values_db = linear_to_db(values) if units == 'linear' else values.astype(np.float32)
      stacks[acquisition.polarisation].append(
          mask_nodata(values_db, nodata_values=(), noise_floor_db=noise_floor_db))
      chosen[acquisition.polarisation].append(acquisition)
      units_read[acquisition.path] = units
  shape = next(s[0].shape for s in stacks.values() if s)

  def stack(arrays):
    return np.stack(arrays) if arrays else np.zeros((0,) + shape, np.float32)

  return AcquisitionStacks(vv=stack(stacks['VV']), vh=stack(stacks['VH']),
                           vv_acquisitions=tuple(chosen['VV']),
                           vh_acquisitions=tuple(chosen['VH']), crs=crs, transform=transform,
                           units=units_read)


# --- Compositing -----------------------------------------------------------------------------


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f'unknown composite method {method!r}; expected one of {tuple(METHODS)}')


def composite_description(method: str = DEFAULT_METHOD,
                          nodata_values: Sequence[float] = DEFAULT_NODATA_VALUES,
                          noise_floor_db: float | None = DEFAULT_NOISE_FLOOR_DB) -> str:
  """The text for ``schema.InputContract.composite`` of a dataset made with these settings."""
  _check_method(method)
  floor = 'none' if noise_floor_db is None else f'{noise_floor_db:g} dB'
  return (f'{method}: {METHODS[method]}; seasons {schema.SEASON_MONTHS} (winter from 1 December '
          f'of the year before); no data: NaN, file nodata, values {tuple(nodata_values)}, '
          f'below noise floor {floor}; VV-VH = VV_dB - VH_dB of the composites; empty season = NaN')


def nanmedian_first_axis(values: np.ndarray) -> np.ndarray:
  """``np.nanmedian(values, axis=0)`` without its masked-array path (3x faster for few dates).

  NaNs sort last, so the median of the ``n`` valid values of a pixel is the mean of sorted
  positions ``(n - 1) // 2`` and ``n // 2``; pixels without a valid value are NaN.
  """
  ordered = np.sort(values, axis=0)
  count = np.isfinite(values).sum(axis=0)
  low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
  high = np.take_along_axis(ordered, (count // 2)[None].clip(max=max(len(values) - 1, 0)),
                            axis=0)[0]
  return np.where(count > 0, (low + high) / 2, np.nan)


def seasonal_composite(stack_db, seasons: Sequence[str | None], method: str = DEFAULT_METHOD, *,
                       nodata_values: Sequence[float] = DEFAULT_NODATA_VALUES,
                       noise_floor_db: float | None = DEFAULT_NOISE_FLOOR_DB) -> np.ndarray:
  """Per-season composites of one polarisation.

  Args:
    stack_db: (N, H, W) sigma0 in dB, one slice per acquisition.
    seasons: N entries, each a name of ``schema.SEASONS`` or None (acquisition outside the
      composite year: ignored), e.g. from :func:`seasons_of`.
    method: A key of :data:`METHODS`: 'median_db' (np.nanmedian of dB), 'mean_db' (np.nanmean of
      dB) or 'mean_linear' (np.nanmean of 10 ** (dB / 10), then back to dB).
    nodata_values: Masked first, see :func:`nodata_mask` (already-masked stacks are unchanged).
    noise_floor_db: See :func:`nodata_mask`.

  Returns:
    (4, H, W) float32 in ``schema.SEASONS`` order, NaN where a season has no valid value.
  """
  _check_method(method)
  stack_db = np.asarray(stack_db)
  if stack_db.ndim != 3:
    raise ValueError(f'stack_db must be (N, H, W), got shape {stack_db.shape}')
  if len(seasons) != stack_db.shape[0]:
    raise ValueError(f'{len(seasons)} seasons for {stack_db.shape[0]} acquisitions')
  unknown = sorted({str(s) for s in seasons if s is not None and s not in schema.SEASONS})
  if unknown:
    raise ValueError(f'unknown seasons {unknown}; expected {schema.SEASONS} or None')
  # float64 so that the means of many acquisitions do not lose precision in float32.
  values = np.asarray(mask_nodata(stack_db, nodata_values, noise_floor_db), dtype=np.float64)
  out = np.full((len(schema.SEASONS),) + stack_db.shape[1:], np.nan, dtype=np.float32)
  seasons = np.asarray([s if s is not None else '' for s in seasons], dtype=object)
  for index, season in enumerate(schema.SEASONS):
    selected = values[seasons == season]
    if not selected.shape[0]:
      continue
    # All-NaN pixels are expected (no valid acquisition): they give NaN, which is what we want.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)
      if method == 'median_db':
        out[index] = nanmedian_first_axis(selected)
      elif method == 'mean_db':
        out[index] = np.nanmean(selected, axis=0)
      else:
        out[index] = 10.0 * np.log10(np.nanmean(10.0 ** (selected / 10.0), axis=0))
  return out


def compose_tile(vv_stack, vh_stack, seasons: Sequence[str | None],
                 method: str = DEFAULT_METHOD, *, vh_seasons: Sequence[str | None] | None = None,
                 nodata_values: Sequence[float] = DEFAULT_NODATA_VALUES,
                 noise_floor_db: float | None = DEFAULT_NOISE_FLOOR_DB) -> np.ndarray:
  """One (H, W, 12) float32 tile in ``schema.BAND_NAMES`` order from VV and VH stacks in dB.

  VV-VH is the difference of the VV and VH composites (not a composite of per-date differences),
  so the stored VV-VH always equals the stored VV minus the stored VH; NaN in either gives NaN.

  Args:
    vv_stack: (N, H, W) VV sigma0 in dB.
    vh_stack: (M, H, W) VH sigma0 in dB.
    seasons: Season (or None) of each VV acquisition; also of each VH one unless ``vh_seasons``.
    method: See :func:`seasonal_composite`.
    vh_seasons: Seasons of the VH acquisitions when they differ from the VV ones.
    nodata_values: See :func:`nodata_mask`.
    noise_floor_db: See :func:`nodata_mask`.

  Returns:
    (H, W, 12) float32, NaN for no data.
  """
  kwargs = dict(method=method, nodata_values=nodata_values, noise_floor_db=noise_floor_db)
  vv = seasonal_composite(vv_stack, seasons, **kwargs)
  vh = seasonal_composite(vh_stack, seasons if vh_seasons is None else vh_seasons, **kwargs)
  if vv.shape[1:] != vh.shape[1:]:
    raise ValueError(f'VV stack is {vv.shape[1:]} px but VH stack is {vh.shape[1:]} px')
  tile = np.full(vv.shape[1:] + (schema.NUM_CHANNELS,), np.nan, dtype=np.float32)
  tile[..., schema.product_indices('vv')] = np.moveaxis(vv, 0, -1)
  tile[..., schema.product_indices('vh')] = np.moveaxis(vh, 0, -1)
  tile[..., schema.product_indices('vv_minus_vh')] = np.moveaxis(vv - vh, 0, -1)
  return tile


def compose_year(stacks: AcquisitionStacks, year: int, method: str = DEFAULT_METHOD,
                 **kwargs) -> np.ndarray:
  """:func:`compose_tile` of the acquisitions of composite year ``year`` (others ignored)."""
  return compose_tile(stacks.vv, stacks.vh, seasons_of(stacks.vv_dates, year), method,
                      vh_seasons=seasons_of(stacks.vh_dates, year), **kwargs)
