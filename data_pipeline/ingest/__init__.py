"""Offline ingestion: Sentinel-1 acquisitions, composites and exports -> tiles with labels.

Sources (GeoTIFF acquisitions or composites, Earth Engine TFRecord exports, the poster authors'
chips), seasonal compositing, the 10 m UTM tile grid, MODIS VCF and WorldCover labels, the
geographic banding split, and ``python -m data_pipeline.ingest.build`` that writes a dataset.
Nothing in training imports this package.
"""
