r"""Dataset from the poster authors' released chips (M3LEO / geetiles layout).

  python -m data_pipeline.ingest.build --config configs/data/m3leo.py --output /data/s1_m3leo \
      --config.areas[0].dir=/data/m3leo/europe [--config.workers=8 --config.num_shards=256]

Each area folder holds the chip GeoJSON, the split CSV and ``s1grd-2020/``,
``modis44b006veg/`` and ``esaworldcover-2020/`` with one GeoTIFF per chip. Expect about 150 K
chips per area; ingestion speed is reported by the build.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.source = 'm3leo'
  # One entry per area of interest: its folder and the schema region it belongs to.
  c.areas = [ml_collections.ConfigDict(dict(dir='', region='europe'))]
  c.passes = 'asc'  # 'asc' (the authors' choice) or 'des'.
  c.tile_size = 448
  c.num_shards = 64  # Per split; a multiple of host_count.
  c.host_count = 1
  c.workers = 1
  c.vcf_band = 'Percent_Tree_Cover'
  c.vcf_min_valid_fraction = 0.5
  c.statistics_by_region = False  # Also record per-region training statistics.
  # How images are stored: 'float16' dB or 'uint8' codes (half the bytes; data_pipeline.quantise).
  c.storage = 'float16'
  return c
