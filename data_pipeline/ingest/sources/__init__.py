"""Ingestion sources: each turns one kind of real Sentinel-1 input into work units for the writer.

* ``m3leo``: the poster authors' chips (GeoJSON + split CSV + one GeoTIFF per chip).
* ``geotiff``: GeoTIFFs of VV / VH per acquisition, or ready seasonal composites, gridded and
  composited here.
* ``earth_engine``: Earth Engine TFRecord patch exports with their mixer files.

Every source module has ``plan(config) -> common.Plan``; ``data_pipeline.ingest.build`` runs the plan
through ``data_pipeline.writer``.
"""
