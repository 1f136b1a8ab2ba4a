"""Geographic train / validation / test splits of chips: the poster authors' banding scheme.

Neighbouring chips share land cover, so a random split leaks the test set into training. The
poster's authors (their geetiles ``PartitionSet.split``) cut each area of
interest into parallel stripes instead and label them cyclically: 3 train, 1 test, 1 validation.

The scheme, for the chips of ONE area:

1. Chip centres are min-max normalised to [0, 1] over the area, separately for x (longitude) and
   y (latitude).
2. A per-area angle ``a`` in [-pi/2, pi/2] (:data:`AREA_ANGLES`) sets a direction
   (:func:`banding_direction`); for ``a < 0`` x is replaced by ``1 - x``.
3. Each chip is projected on that direction, ``p = dx * x + dy * y``; the projection is min-max
   normalised over the area's chips and cut into ``num_stripes`` (60) equal-width stripes.
4. Stripe ``i`` gets ``STRIPE_PATTERN[i % 5]``, so 60 stripes are 36 train, 12 test and 12
   validation (60:20:20 by stripe count; by chip count only roughly).

When the authors' own split CSV exists for an area, it is used as given (:func:`read_split_csv`);
:func:`banding_split` is for areas (or synthetic data) without one. :func:`split_map_png` draws a
split so it can be checked by eye.
"""

from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

import numpy as np

from data_pipeline import atomic
from data_pipeline import schema

# Banding angle per area of interest, in radians, as in the authors' split files. 0 gives stripes
# of constant latitude, +-pi/2 stripes of constant longitude. The authors give no angle for
# Africa (schema.REGIONS), which is neither a pretraining nor a tuning area of the poster.
AREA_ANGLES = {'europe': 0.9, 'conus': 0.9, 'china': 1.5, 'south_america': 0.2}

# Labels of consecutive stripes, repeated cyclically. The authors' files say 'val'; the project
# calls that split 'validation' (schema.SPLITS), so the same pattern is spelled with it here.
STRIPE_PATTERN = ('train', 'train', 'train', 'test', 'validation')

NUM_STRIPES = 60
# A chip this close (in stripe widths) below a stripe edge counts as on the edge, i.e. in the upper
# stripe. The exact arithmetic often puts grid chips exactly on an edge (e.g. y = 0.75 of 60
# stripes is edge 45), and float rounding (0.75 * dy / dy = 0.7499999...) must not split such a
# row of chips between two stripes. 1e-9 is far above rounding error (~1e-14) and far below any
# real chip spacing (60 stripes over ~1000 chips).
EDGE_TOLERANCE = 1e-9

# Names the authors' CSVs may use for a split, mapped to the project's names.
_CSV_SPLIT_NAMES = {'train': 'train', 'val': 'validation', 'validation': 'validation',
                    'test': 'test'}

# Map colours per split (Paul Tol's colour-blind safe "bright" scheme).
SPLIT_COLORS = {'train': '#4477AA', 'validation': '#CCBB44', 'test': '#EE6677'}

assert set(STRIPE_PATTERN) == set(schema.SPLITS) == set(SPLIT_COLORS)


def banding_direction(angle: float) -> tuple[float, float]:
  """The (dx, dy) direction the normalised chip centres are projected on.

  Exactly the authors' formula: for ``|a| < pi/4`` it is ``(|a| / (pi/4), 1)``, otherwise
  ``(sign(a), (pi/2 - |a|) / (pi/4))``. Both branches give (1, 1) at ``|a| = pi/4``. This is not
  (cos a, sin a): the larger component is always 1 in magnitude, which does not matter since the
  projection is normalised afterwards.

  Args:
    angle: Banding angle in radians, in [-pi/2, pi/2].

  Returns:
    (dx, dy) as Python floats.

  Raises:
    ValueError: If the angle is not a finite number in [-pi/2, pi/2].
  """
  angle = _check_angle(angle)
  quarter = math.pi / 4
  if abs(angle) < quarter:
    return abs(angle) / quarter, 1.0
  return math.copysign(1.0, angle), (math.pi / 2 - abs(angle)) / quarter


def stripe_index(lon, lat, angle: float, num_stripes: int = NUM_STRIPES) -> np.ndarray:
  """The stripe (0 .. num_stripes - 1) of every chip of one area.

  Normalisation of the projection: the authors' text says the projection is "cut into 60
  equal-width stripes" without saying over which range. We cut the range the chips actually span,
  ``[min p, max p]``, rather than the formula's bound ``[0, dx + dy]``: it is "normalised over the
  area" applied to the projection, it works for ``dx < 0`` (where ``p`` can be negative), and it is
  what the authors' released code effectively does: geetiles widens the stripes until exactly 60
  of them hold chips and renumbers them from the lowest occupied one, so all 60 stripes span the
  occupied range. With the fixed bound, an area whose chips miss the (0, 0) or (1, 1) corner (most
  real coastlines) would leave its first or last stripes empty. Remaining differences to geetiles,
  which only move chips within a hair of a stripe edge or matter for areas with empty stripes:
  geetiles anchors stripe edges at multiples of its width (from p = 0, not from min p), its width
  comes from a grid search and is slightly larger than range / 60, and it labels stripes by their
  rank among occupied stripes, not by their index. Use the authors' CSV where it exists.

  Degenerate areas: when all chips share one x (or one y), that coordinate is set to 0 rather than
  divided by a zero range. Any constant would do, since the projection is min-max normalised
  next; 0 keeps it out of the sum. When all projections are equal (one chip, or all chips on one
  line across the bands) every chip is in stripe 0, hence 'train'.

  Stripe edges: a chip exactly on an edge belongs to the upper stripe, also when float rounding
  puts it a hair below (see :data:`EDGE_TOLERANCE`).

  Negative angles follow the authors' text literally: x becomes 1 - x and the direction's dx is
  sign(a) = -1 when ``|a| >= pi/4``. For ``-pi/4 < a < 0`` the stripes are the mirror image (in x)
  of those for ``|a|``; for ``a <= -pi/4`` the two flips cancel and the stripes equal those for
  ``|a|``. (geetiles flips both x and y for a < 0, which mirrors in the other regime instead.) No
  area uses a negative angle.

  Longitudes are used as given: an area crossing the antimeridian must be unwrapped first.

  Args:
    lon: 1-D array-like of chip-centre longitudes (x), one per chip, all from ONE area.
    lat: 1-D array-like of chip-centre latitudes (y), same length.
    angle: Banding angle in radians, in [-pi/2, pi/2] (see :data:`AREA_ANGLES`).
    num_stripes: Number of equal-width stripes.

  Returns:
    int64 array of stripe indices, one per chip, in input order. Each chip's value depends only
    on its own centre and the area's min / max, so permuting the chips permutes the result.

  Raises:
    ValueError: On empty input, lon / lat of different lengths or not 1-D, non-finite
      coordinates, an angle outside [-pi/2, pi/2] or a non-positive number of stripes.
  """
  x, y = _check_coordinates(lon, lat)
  angle = _check_angle(angle)
  if isinstance(num_stripes, bool) or not isinstance(num_stripes, (int, np.integer)):
    raise ValueError(f'num_stripes must be an integer, got {num_stripes!r}')
  if num_stripes < 1:
    raise ValueError(f'num_stripes must be >= 1, got {num_stripes}')

  dx, dy = banding_direction(angle)
  x = _min_max(x)
  y = _min_max(y)
  if angle < 0:
    x = 1.0 - x
  p = _min_max(dx * x + dy * y)
  stripes = np.floor(p * num_stripes + EDGE_TOLERANCE).astype(np.int64)
  # p == 1 (the chip(s) furthest along the direction) belongs to the last stripe, not a 61st.
  return np.minimum(stripes, num_stripes - 1)


def banding_split(lon, lat, angle: float, num_stripes: int = NUM_STRIPES) -> np.ndarray:
  """The split ('train', 'validation' or 'test') of every chip of one area.

  Stripe ``i`` of :func:`stripe_index` gets ``STRIPE_PATTERN[i % 5]``. With 60 stripes that is
  36 / 12 / 12 stripes; other counts that are not multiples of 5 tilt the ratio towards train.

  Args:
    lon: 1-D array-like of chip-centre longitudes of ONE area.
    lat: 1-D array-like of chip-centre latitudes, same length.
    angle: Banding angle in radians (see :data:`AREA_ANGLES`).
    num_stripes: Number of stripes.

  Returns:
    Array of split names (numpy unicode strings), one per chip, in input order.

  Raises:
    ValueError: As :func:`stripe_index`.
  """
  stripes = stripe_index(lon, lat, angle, num_stripes)
  return np.asarray(STRIPE_PATTERN)[stripes % len(STRIPE_PATTERN)]


def read_split_csv(path: str) -> dict[str, str]:
  """Reads an authors' split CSV (``..._splits_60bands_angle<a>_60-20-20.csv``).

  The file needs the columns ``identifier`` and ``split``; other columns (geetiles also writes
  ``split_<partitions>`` columns) are ignored. 'val' is renamed 'validation'; 'train', 'test' and
  'validation' are kept. Surrounding whitespace is stripped.

  Args:
    path: The CSV file.

  Returns:
    {chip identifier: split}, in file order.

  Raises:
    ValueError: Naming the file and line, for a missing header or column, an empty identifier, an
      unknown split value or an identifier listed twice.
  """
  path = os.fspath(path)
  out = {}
  first_line = {}
  # utf-8-sig: a spreadsheet-saved file starts with a BOM that would otherwise glue itself to
  # the first column name.
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames
    if header is None:
      raise ValueError(f'{path}: empty file, expected a header with columns identifier, split')
    header = [name.strip() for name in header]
    missing = [name for name in ('identifier', 'split') if name not in header]
    if missing:
      raise ValueError(f'{path}, line 1: missing column(s) {missing} in header {header}')
    reader.fieldnames = header
    for row in reader:
      # line_num is the physical line just read, so it stays right with quoted newlines.
      where = f'{path}, line {reader.line_num}'
      identifier = (row['identifier'] or '').strip()
      value = (row['split'] or '').strip()
      if not identifier:
        raise ValueError(f'{where}: empty identifier')
      if value not in _CSV_SPLIT_NAMES:
        raise ValueError(f'{where}: unknown split {value!r} for {identifier!r}, expected one of '
                         f'{sorted(_CSV_SPLIT_NAMES)}')
      if identifier in out:
        raise ValueError(f'{where}: identifier {identifier!r} already listed on line '
                         f'{first_line[identifier]}')
      out[identifier] = _CSV_SPLIT_NAMES[value]
      first_line[identifier] = reader.line_num
  return out


def split_map_png(path: str, lon, lat, splits: Sequence[str], title: str = '',
                  dpi: int = 100) -> None:
  """Writes a scatter map of chip centres coloured by split, as PNG, atomically.

  The PNG goes to a temporary file next to ``path`` which then replaces ``path`` in one step, so
  a reader (or a crash) never sees a half-written file. The directory must already exist.

  Args:
    path: Destination file.
    lon: 1-D array-like of chip-centre longitudes.
    lat: 1-D array-like of chip-centre latitudes, same length.
    splits: Split name per chip, each in ``schema.SPLITS``.
    title: Figure title; the chip counts per split are added to the legend.
    dpi: Resolution of the 8 x 6 inch figure.

  Raises:
    ValueError: On bad coordinates (as :func:`stripe_index`), a splits list of another length or
      an unknown split name.
  """
  # Lazy: matplotlib is only needed for this one picture, not by every data worker.
  import matplotlib.figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top

  x, y = _check_coordinates(lon, lat)
  splits = np.asarray(splits, dtype=str)
  if splits.shape != x.shape:
    raise ValueError(f'splits has shape {splits.shape} but there are {x.size} chips')
  unknown = sorted({str(name) for name in np.unique(splits)} - set(schema.SPLITS))
  if unknown:
    raise ValueError(f'unknown split name(s) {unknown}, expected {schema.SPLITS}')

  # A bare Figure with its own Agg canvas: no pyplot, so no global backend switch and no figure
  # registry that could leak figures when called in a loop over areas.
  figure = matplotlib.figure.Figure(figsize=(8, 6), dpi=dpi, facecolor='white')
  canvas = backend_agg.FigureCanvasAgg(figure)
  ax = figure.subplots()
  # Small markers for big areas (~150 K chips) so stripes stay visible, bigger ones for a few.
  size = float(np.clip(2e4 / x.size, 0.5, 30.0))
  for name in schema.SPLITS:
    chosen = splits == name
    ax.scatter(x[chosen], y[chosen], s=size, c=SPLIT_COLORS[name], marker='s', linewidths=0,
               label=f'{name} ({int(chosen.sum())})', rasterized=True)
  # A degree of longitude is cos(latitude) as long as one of latitude: without this the map is
  # stretched east-west away from the equator.
  mid_lat = 0.5 * (y.min() + y.max())
  ax.set_aspect(1.0 / max(math.cos(math.radians(mid_lat)), 0.05))
  ax.set_xlabel('longitude')
  ax.set_ylabel('latitude')
  if title:
    ax.set_title(title)
  ax.legend(loc='best', markerscale=max(1.0, 30.0 / size) ** 0.5, fontsize=9)
  figure.tight_layout()

  try:
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    atomic.write_bytes(path, buffer.getvalue())
  finally:
    figure.clear()


# --- Helpers ---------------------------------------------------------------------------------


def _check_angle(angle) -> float:
  """The angle as a float, or a ValueError saying why it is not usable."""
  try:
    value = float(angle)
  except (TypeError, ValueError):
    raise ValueError(f'angle must be a number in radians, got {angle!r}') from None
  if not math.isfinite(value) or abs(value) > math.pi / 2:
    raise ValueError(f'angle must be a finite number in [-pi/2, pi/2] radians, got {angle!r}')
  return value


def _check_coordinates(lon, lat) -> tuple[np.ndarray, np.ndarray]:
  """Chip centres as two float64 1-D arrays of one length, or a ValueError naming the problem."""
  arrays = []
  for name, values in (('lon', lon), ('lat', lat)):
    try:
      array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
      raise ValueError(f'{name} must be numeric chip-centre coordinates') from None
    if array.ndim != 1:
      raise ValueError(f'{name} must be 1-D (one value per chip), got shape {array.shape}')
    arrays.append(array)
  x, y = arrays
  if x.size != y.size:
    raise ValueError(f'lon and lat must have one value per chip, got {x.size} lon and '
                     f'{y.size} lat values')
  if x.size == 0:
    raise ValueError('no chips: lon and lat are empty')
  for name, array in (('lon', x), ('lat', y)):
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
      raise ValueError(f'{name} has {bad.size} non-finite value(s) (NaN or inf), first at chip '
                       f'{bad[0]}: {array[bad[0]]}')
  return x, y


def _min_max(values: np.ndarray) -> np.ndarray:
  """Maps values linearly to [0, 1]; all zeros when they are all equal (no zero division)."""
  low = values.min()
  span = values.max() - low
  if span > 0:
    return (values - low) / span
  return np.zeros_like(values)
