r"""Dataset from Earth Engine TFRecord patch exports of Sentinel-1 seasonal composites.

  python -m data_pipeline.ingest.build --config configs/data/earth_engine.py --output /data/s1_ee \
      --config.areas[0].prefix=/data/exports/europe/s1 \
      --config.worldcover='/data/worldcover/*_Map.tif' [--config.workers=8]

Export from Earth Engine with ``Export.image.toDrive/toCloudStorage(fileFormat='TFRecord',
formatOptions={'patchDimensions': [448, 448], 'defaultValue': -9999, ...})`` in the UTM zone
of the area at 10 m, then copy the shards and the mixer file to local disk. Patches are tiles.
"""

import ml_collections

from data_pipeline import schema


def area(prefix: str = '', region: str = 'europe', name: str = '') -> ml_collections.ConfigDict:
  """One area of interest: one export and how its tiles are split."""
  return ml_collections.ConfigDict(dict(
      name=name,  # For reports; defaults to '<region>_<index>'.
      region=region,  # One of schema.REGIONS.
      prefix=prefix,  # <prefix>-NNNNN.tfrecord[.gz] and <prefix>-mixer.json.
      split_angle=ml_collections.config_dict.placeholder(float),  # None: splits.AREA_ANGLES.
      split_csv='',  # (tile id, split) CSV to use as given instead of the banding.
  ))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = 'earth_engine'
  c.areas = [area()]
  # Project band (vv_<season>, vh_<season>) -> the export's feature name for it.
  c.bands = ml_collections.ConfigDict(
      {f'{p}_{s}': f'{p.upper()}_{s}' for p in ('vv', 'vh') for s in schema.SEASONS})
  c.composite = 'seasonal medians of COPERNICUS/S1_GRD dB'  # How the export was made (metadata).
  c.units = 'dB'  # 'dB' (COPERNICUS/S1_GRD) or 'linear' (S1_GRD_FLOAT).
  c.fill_value = -9999.0  # The export's defaultValue (NaN: none). Earth Engine's default is 0.
  c.kernel_size = 1  # The export's kernelSize; its margin is cut off.
  c.compression = 'auto'  # 'GZIP', '' or 'auto' (by file name).
  c.noise_floor_db = -50.0
  c.pixel_size = 10.0
  c.tile_size = 448  # Must equal the export's patchDimensions.
  c.min_valid_fraction = 0.5
  c.worldcover = ''  # Glob of ESA WorldCover GeoTIFFs.
  c.vcf = ''  # Glob of MOD44B GeoTIFFs.
  c.vcf_band = 'Percent_Tree_Cover'
  c.vcf_min_valid_fraction = 0.5
  c.num_shards = 64
  c.host_count = 1
  c.workers = 1
  c.statistics_by_region = False
  # How images are stored: 'float16' dB or 'uint8' codes (half the bytes; data_pipeline.quantise).
  c.storage = 'float16'
  return c
