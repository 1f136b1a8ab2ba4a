r"""Dataset from Sentinel-1 GeoTIFFs: per-acquisition VV / VH files, or ready seasonal composites.

  python -m data_pipeline.ingest.build --config configs/data/geotiff.py --output /data/s1_europe \
      --config.areas[0].scenes='/data/s1/europe/**/*.tif' --config.year=2020 \
      --config.worldcover='/data/worldcover/*_Map.tif' --config.vcf='/data/mod44b/*.tif' \
      [--config.workers=8 --config.num_shards=256]

Acquisition files need their date and polarisation in the name (``..._20200613T165043_VV.tif``)
or in GeoTIFF tags. Scenes are resampled onto a 10 m grid in the UTM zone of each area's centre
and cut into tiles; split areas that span several UTM zones into one area per zone.
"""

import ml_collections


def area(scenes: str = '', region: str = 'europe', name: str = '') -> ml_collections.ConfigDict:
  """One area of interest: its scene files and how its tiles are split."""
  return ml_collections.ConfigDict(dict(
      name=name,  # For reports; defaults to '<region>_<index>'.
      region=region,  # One of schema.REGIONS.
      scenes=scenes,  # Glob of the area's GeoTIFFs ('**' recurses).
      bounds=(),  # (west, south, east, north) in degrees; () = union of the scenes.
      crs='',  # Grid CRS; '' = UTM zone of the area's centre.
      # Banding angle in radians (splits.AREA_ANGLES[region] when None); ignored with a CSV.
      split_angle=ml_collections.config_dict.placeholder(float),
      split_csv='',  # (tile id, split) CSV to use as given instead of the banding.
  ))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = 'geotiff'
  c.kind = 'acquisitions'  # or 'composites' (see data_pipeline/ingest/sources/geotiff.py).
  c.areas = [area()]
  c.year = 2020  # Composite year: winter is 1 December of the year before to February.
  c.composite_method = 'median_db'  # As the authors; or 'mean_db', 'mean_linear'.
  c.units = 'auto'  # 'dB', 'linear', or 'auto' = decided per file from its values.
  # Source values that mean no data besides NaN and the file's nodata (0: Earth Engine's fill).
  c.nodata_values = (0.0,)
  c.noise_floor_db = -50.0  # Values below are no data (thermal-noise artefacts, -99 fills).
  c.resampling = 'bilinear'
  c.resample_in_linear_power = True  # Average power, not dB, when resampling dB inputs.
  c.pixel_size = 10.0
  c.tile_size = 448
  c.min_valid_fraction = 0.5  # Of pixels valid in at least one channel.
  c.worldcover = ''  # Glob of ESA WorldCover GeoTIFFs ('' = no segmentation labels).
  c.vcf = ''  # Glob of MOD44B GeoTIFFs ('' = no regression target).
  c.vcf_band = 'Percent_Tree_Cover'
  c.vcf_min_valid_fraction = 0.5
  c.num_shards = 64  # Per split; a multiple of host_count.
  c.host_count = 1
  c.workers = 1
  c.statistics_by_region = False  # Also record per-region training statistics.
  # How images are stored: 'float16' dB or 'uint8' codes (half the bytes; data_pipeline.quantise).
  c.storage = 'float16'
  return c
