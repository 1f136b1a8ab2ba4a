"""STAC item (Machine Learning Model extension, MLM v1.4.0) describing an exported ONNX model.

The item says what a user of ``model.onnx`` needs without mae_jax: the bands in order with their
units (dB) and training statistics, the no-data rule, the tile size and input shape, each output
(shape, type, meaning, WorldCover classes with ESA's codes, names and colours), the ONNX asset with
its checksum and size (file extension), and where the weights came from (checkpoint, step).

The bands are the model asset's ``raster:bands`` (raster extension), as MLM's examples do: STAC
1.1's own ``bands`` cannot be used, since pystac's core item schema (v1.1.0) refuses ``bands``
in the properties unless some asset has them, while MLM checks them in the properties only.

Validation runs offline: the JSON schemas of MLM v1.4.0 and of what it references
(classification, processing, raster), and of the file extension, are vendored in
``mae_jax/tools/schemas/`` (source and licence in its README) and registered with pystac's
validator, so ``item.validate()`` never fetches a schema (pystac ships only the core ones).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.resources
import json
import os
from typing import Any, Sequence

import pystac
import pystac.validation

from data_pipeline import schema

MLM_SCHEMA = 'https://stac-extensions.github.io/mlm/v1.4.0/schema.json'
FILE_SCHEMA = 'https://stac-extensions.github.io/file/v2.1.0/schema.json'
RASTER_SCHEMA = 'https://stac-extensions.github.io/raster/v1.1.0/schema.json'
# URL -> file in mae_jax/tools/schemas/ (byte-for-byte copies of the published schemas).
VENDORED_SCHEMAS = {
    MLM_SCHEMA: 'mlm-v1.4.0.json',
    FILE_SCHEMA: 'file-v2.1.0.json',
    RASTER_SCHEMA: 'raster-v1.1.0.json',
    'https://stac-extensions.github.io/classification/v1.1.0/schema.json':
        'classification-v1.1.0.json',
    'https://stac-extensions.github.io/processing/v1.1.0/schema.json': 'processing-v1.1.0.json',
}
# Not IANA-registered; the MLM README's convention for framework artifacts.
ONNX_MEDIA_TYPE = 'application/octet-stream; framework=onnx'
ARTIFACT_TYPE = 'onnx.save_model'
TASKS = {'vcf': ['regression'], 'worldcover': ['semantic-segmentation']}
ARCHITECTURES = {
    ('finetune', 'vcf'): 'Vision Transformer (MAE encoder) + token-conv/MLP regression head',
    ('finetune', 'worldcover'): 'Vision Transformer (MAE encoder) + SETR-PUP segmentation head',
    ('linear_probe', 'vcf'): 'Vision Transformer (MAE encoder, frozen) + linear probe',
    ('linear_probe', 'worldcover'): 'Vision Transformer (MAE encoder, frozen) + linear probe',
}


def vendored_schemas() -> dict[str, dict[str, Any]]:
  """{schema URL: parsed schema} of the copies in ``mae_jax/tools/schemas/``."""
  folder = importlib.resources.files('mae_jax.tools').joinpath('schemas')
  return {url: json.loads(folder.joinpath(name).read_text(encoding='utf-8'))
          for url, name in VENDORED_SCHEMAS.items()}


def register_schemas() -> pystac.validation.JsonSchemaSTACValidator:
  """Adds the vendored schemas to pystac's registered validator (its cache of schemas by URL,
  which it consults before any download) and returns that validator.

  Only URLs it does not hold yet are added, so nothing else of the validator changes.

  Raises:
    TypeError: Another kind of validator was registered with ``pystac.validation.set_validator``.
  """
  validator = pystac.validation.RegisteredValidator.get_validator()
  if not isinstance(validator, pystac.validation.JsonSchemaSTACValidator):
    raise TypeError(f'pystac has a {type(validator).__name__} registered, not a '
                    'JsonSchemaSTACValidator: cannot add the vendored MLM schemas to it')
  for url, contents in vendored_schemas().items():
    validator.schema_cache.setdefault(url, contents)
  return validator


def validate(item: pystac.Item) -> list[str]:
  """Validates ``item`` (core and extension schemas) offline; returns the schema URLs used.

  Raises:
    pystac.errors.STACValidationError: The item breaks a schema (the message names the rule).
  """
  register_schemas()
  return item.validate()


def file_fields(path: str) -> dict[str, Any]:
  """The file extension's ``file:checksum`` (sha2-256 multihash, hex) and ``file:size``."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  # Multihash: 0x12 = sha2-256, 0x20 = 32 bytes of digest.
  return {'file:checksum': '1220' + digest.hexdigest(), 'file:size': os.path.getsize(path)}


def _raster_bands(contract: schema.InputContract) -> list[dict[str, Any]]:
  """``raster:bands`` of the model input: name, unit, no-data, pixel size and the training
  split's statistics (what the graph normalises with) per band."""
  return [{'name': name, 'description': f'Sentinel-1 {name.replace("_", " ")} backscatter',
           'unit': contract.units, 'nodata': 'nan', 'data_type': 'float32',
           'spatial_resolution': contract.pixel_size_m,
           'statistics': {'mean': mean, 'stddev': std}}
          for name, mean, std in zip(contract.band_names, contract.mean, contract.std)]


def _classes(kind: str) -> list[dict[str, Any]]:
  """Classification classes of an output: by class index ('index') or by code ('code')."""
  rows = zip(range(schema.NUM_CLASSES), schema.WORLDCOVER_CODES, schema.WORLDCOVER_NAMES,
             schema.WORLDCOVER_COLORS)
  classes = [{'value': index if kind == 'index' else code, 'name': name,
              'description': f'ESA WorldCover {code}: {name.replace("_", " ")}',
              'color_hint': '{:02X}{:02X}{:02X}'.format(*colour)}
             for index, code, name, colour in rows]
  if kind == 'code':
    classes.append({'value': schema.WORLDCOVER_NODATA_CODE, 'name': 'no_data',
                    'description': 'No prediction: the pixel has no valid band'})
  return classes


def _model_input(spec, contract: schema.InputContract) -> dict[str, Any]:
  return {'name': spec.name, 'bands': list(contract.band_names),
          'input': {'shape': list(spec.shape), 'dim_order': list(spec.dim_order),
                    'data_type': spec.dtype},
          'description': spec.description,
          # The graph normalises its input itself: a runner must not scale it again.
          'value_scaling': None, 'resize_type': None, 'pre_processing_function': None}


def _model_output(spec, task: str) -> dict[str, Any]:
  out = {'name': spec.name, 'tasks': TASKS[task], 'description': spec.description,
         'result': {'shape': list(spec.shape), 'dim_order': list(spec.dim_order),
                    'data_type': spec.dtype}}
  if spec.classes:
    out['classification:classes'] = _classes(spec.classes)
  return out


def build_item(*, folder: str, model_file: str, input_spec, output_specs: Sequence,
               task: str, head_kind: str, contract: schema.InputContract,
               hyperparameters: dict[str, Any], total_parameters: int,
               framework_version: str, provenance: dict[str, Any],
               weights_file: str | None = None,
               created: datetime.datetime | None = None) -> pystac.Item:
  """The MLM item of the model in ``folder`` (asset hrefs relative to it).

  Args:
    folder: Where the model files are (checksums are computed from them).
    model_file: The ONNX file's name in ``folder``.
    input_spec, output_specs: ``onnx_export.TensorSpec``s of the graph's input and outputs.
    task, head_kind: 'vcf' or 'worldcover'; 'finetune' or 'linear_probe'.
    contract: The checkpoint's input contract (bands, units, statistics, tile size).
    hyperparameters: Sizes of the model (``onnx_export.hyperparameters``).
    total_parameters: Number of weights (encoder + head).
    framework_version: The onnx package version that wrote the file.
    provenance: checkpoint, step, weights ('best' or 'last'), and optionally init_checkpoint
      (the pretraining run fine-tuned from; '' or None = from scratch), label_fraction.
    weights_file: The external-data file of a large model, if any.
    created: Time of the export (default now, UTC).
  """
  created = created or datetime.datetime.now(datetime.timezone.utc)
  source = provenance.get('init_checkpoint') or None
  low, high = contract.clip_range
  # A model of uint8 data sees its inputs as its tiles decoded: the graph quantises them too.
  codes = (' (then to the uint8 code range of each band, rounded to its step)'
           if contract.storage_dtype == schema.UINT8 else '')
  properties = {
      'description': (
          f'mae_jax {head_kind} model for {task} on Sentinel-1 {contract.tile_size} px tiles '
          f'({contract.pixel_size_m:g} m pixels), exported to ONNX from {provenance["checkpoint"]} '
          f'({provenance["weights"]} weights). Input: {contract.num_channels} bands in '
          f'{contract.units}, NaN = no-data; the graph clips to [{low:g}, {high:g}] '
          f'{contract.units}{codes}, z-scores each band with the band statistics and sets '
          'no-data to 0.'),
      'created': pystac.utils.datetime_to_str(created),
      'mlm:name': f'mae_jax-{task}-{head_kind}',
      'mlm:architecture': ARCHITECTURES[(head_kind, task)],
      'mlm:tasks': TASKS[task],
      'mlm:framework': 'ONNX',
      'mlm:framework_version': framework_version,
      'mlm:total_parameters': int(total_parameters),
      'mlm:pretrained': bool(source),
      'mlm:pretrained_source': source,
      'mlm:input': [_model_input(input_spec, contract)],
      'mlm:output': [_model_output(spec, task) for spec in output_specs],
      'mlm:hyperparameters': hyperparameters,
      'mae_jax:checkpoint': provenance['checkpoint'],
      'mae_jax:step': int(provenance['step']),
      'mae_jax:weights': provenance['weights'],
      'mae_jax:label_fraction': provenance.get('label_fraction'),
      'mae_jax:input_contract': contract.to_dict(),
  }
  item = pystac.Item(id=f'mae_jax-{task}-{head_kind}-step-{provenance["step"]}', geometry=None,
                     bbox=None, datetime=created, properties=properties,
                     stac_extensions=[MLM_SCHEMA, RASTER_SCHEMA, FILE_SCHEMA])
  model_path = os.path.join(folder, model_file)
  item.add_asset('model', pystac.Asset(
      href=model_file, media_type=ONNX_MEDIA_TYPE, title='ONNX model (encoder + head)',
      roles=['mlm:model', 'mlm:weights', 'data'],
      extra_fields={'mlm:artifact_type': ARTIFACT_TYPE, 'raster:bands': _raster_bands(contract),
                    **file_fields(model_path)}))
  if weights_file:
    item.add_asset('weights', pystac.Asset(
        href=weights_file, media_type='application/octet-stream',
        title=f'ONNX external data of {model_file}', roles=['mlm:weights', 'data'],
        extra_fields=file_fields(os.path.join(folder, weights_file))))
  return item


def write_item(item: pystac.Item, path: str) -> None:
  """Writes ``item`` as JSON with its asset hrefs left relative (no self link)."""
  with open(path, 'w') as f:
    json.dump(item.to_dict(include_self_link=False, transform_hrefs=False), f, indent=2)
    f.write('\n')
