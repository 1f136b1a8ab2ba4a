"""Small real-shaped inputs for the ingestion tests: GeoTIFF scenes, labels, EE exports."""

from __future__ import annotations

import numpy as np
import rasterio
import tensorflow_datasets as tfds
from affine import Affine

from data_pipeline import schema

UTM33 = 'EPSG:32633'
# The BigEarthNet Austria strip's top-left corner (a real 10 m UTM lattice point).
ORIGIN = (373200.0, 5353200.0)


def write_tif(path, bands, transform, crs=UTM33, nodata=None, descriptions=None, dtype=None):
  """Writes (bands, H, W) (or (H, W)) to a GeoTIFF and returns its path as a string."""
  bands = np.asarray(bands)
  if bands.ndim == 2:
    bands = bands[None]
  path.parent.mkdir(parents=True, exist_ok=True)
  with rasterio.open(path, 'w', driver='GTiff', width=bands.shape[2], height=bands.shape[1],
                     count=bands.shape[0], dtype=dtype or bands.dtype, crs=crs,
                     transform=transform, nodata=nodata) as f:
    f.write(bands.astype(dtype or bands.dtype))
    for index, text in enumerate(descriptions or (), start=1):
      f.set_band_description(index, text)
  return str(path)


def utm_transform(origin=ORIGIN, pixel=10.0) -> Affine:
  return Affine(pixel, 0.0, origin[0], 0.0, -pixel, origin[1])


def worldcover_over(path, bounds_lonlat, codes=(10, 40), cells=64):
  """A WorldCover-like EPSG:4326 raster over ``bounds_lonlat``: left half codes[0], right half
  codes[1], a no-data (0) row at the top."""
  west, south, east, north = bounds_lonlat
  values = np.full((cells, cells), codes[0], np.uint8)
  values[:, cells // 2:] = codes[1]
  values[0] = 0
  transform = rasterio.transform.from_bounds(west, south, east, north, cells, cells)
  return write_tif(path, values, transform, crs='EPSG:4326', nodata=0)


def vcf_over(path, bounds_lonlat, value=40.0, cells=8):
  """A MOD44B-like EPSG:4326 raster: ``value`` everywhere except one fill (253) and one water
  (200) cell, with a band description as Earth Engine exports it."""
  west, south, east, north = bounds_lonlat
  values = np.full((cells, cells), value, np.float32)
  values[0, 0] = 253
  values[-1, -1] = 200
  transform = rasterio.transform.from_bounds(west, south, east, north, cells, cells)
  return write_tif(path, values, transform, crs='EPSG:4326',
                   descriptions=['Percent_Tree_Cover'])


def read_dataset(data_dir) -> dict[str, dict[str, dict]]:
  """Split -> tile id -> example (numpy) of a built dataset."""
  builder = tfds.builder_from_directory(str(data_dir))
  return {split: {ex[schema.TILE_ID].decode(): ex
                  for ex in tfds.as_numpy(builder.as_dataset(split))}
          for split in builder.info.splits}
