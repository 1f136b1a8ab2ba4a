r"""What a tile costs to store and to read: float16 vs uint8 codes, and lossless codecs on top.

  python bench/bench_storage.py [--samples /work/shared/samples] \
      [--float16_dir data/synthetic_tiny] [--uint8_dir /tmp/emb_uint8] [--tiles 64] \
      [--json out.json]

Three measurements, each printed as a table (``--json`` writes them all):

* **bytes per tile**: a 448 px x 12 channel image in each storage form (``data_pipeline.quantise``),
  and a whole record as the dataset writer writes it (image, WorldCover labels, the other
  features, protobuf and TFRecord framing), measured on a shard of 448 px synthetic tiles written
  here by ``data_pipeline.writer`` in each form;
* **quantisation error** in dB of each form, per product, on the real samples (BigEarthNet-S1
  VV / VH / VV-VH, pyroSAR VV; ``/work/shared/samples``) and on synthetic tiles: the largest and
  RMS |stored - original| over all valid pixels, the largest within the stored range (the
  rounding alone), and the fraction of pixels clipped;
* **lossless codecs** (zlib levels 1 and 6; zstd when the ``zstandard`` module is importable) on
  each form: compressed bytes relative to raw on the embedded dataset's tiles as stored (HWC,
  both forms: ``--float16_dir`` and ``--uint8_dir``, the same tiles built both ways; generated
  in memory when missing) and on each real product as a plane, the order-0 entropy of the
  stored bytes as a bound, and single-thread decode speed. From those, per 448 px tile:
  compressed bytes, decode tiles/s/core, and the tiles/s a host gets at a storage bandwidth of
  X GB/s with the cores the decoding then needs.

The real samples are single dates, 120 px (BigEarthNet) and 268 x 217 px (pyroSAR): too small
for a 448 px tile and with one acquisition only, so their codec figures are per product plane
(no cross-season redundancy: a lower bound for composites, which are smoother).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import os
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top

from data_pipeline import quantise  # pylint: disable=g-import-not-at-top
from data_pipeline import schema  # pylint: disable=g-import-not-at-top

TILE = 448
FORMS = {'float16': schema.InputContract(), 'uint8': schema.InputContract().with_storage('uint8')}
BANDWIDTHS_GBPS = (0.5, 1.0, 2.0, 5.0)
# The local reader's page-cached parse rate of raw float16 448 px records (bench/README.md):
# what "no codec" costs per core, for comparison with a decompressor's rate.
RAW_READER_TILES_PER_S_PER_CORE = 900.0


def raw_tile_bytes(form: str) -> int:
  return TILE * TILE * schema.NUM_CHANNELS * np.dtype(form).itemsize


# --- Samples ---------------------------------------------------------------------------------


def real_products(samples: str) -> dict[str, np.ndarray]:
  """{'<source> <product>': float64 dB values (2-D plane, NaN = no-data)} of the real samples."""
  import rasterio  # pylint: disable=g-import-not-at-top
  out = {}
  patches = sorted(glob.glob(os.path.join(samples, 'bigearthnet_s1_tiny', 'S1*')))
  if not patches:
    raise FileNotFoundError(f'no BigEarthNet-S1 patches under {samples}/bigearthnet_s1_tiny')
  planes = {'vv': [], 'vh': []}
  for patch in patches:
    for pol in planes:
      with rasterio.open(glob.glob(os.path.join(patch, f'*_{pol.upper()}.tif'))[0]) as f:
        planes[pol].append(f.read(1).astype(np.float64))
  # The six 120 px patches side by side: one plane per product.
  vv, vh = (np.concatenate(planes[p], axis=1) for p in ('vv', 'vh'))
  out.update({'bigearthnet vv': vv, 'bigearthnet vh': vh, 'bigearthnet vv_minus_vh': vv - vh})
  for path in sorted(glob.glob(os.path.join(samples, 'pyrosar_s1_db', '*.tif'))):
    with rasterio.open(path) as f:
      values = f.read(1).astype(np.float64)
      if f.nodata is not None:
        values[values == f.nodata] = np.nan
    out['pyrosar vv'] = values
  return out


def synthetic_products(count: int, tile_size: int = 128) -> dict[str, np.ndarray]:
  """{'synthetic <product>': dB values} of ``count`` generated tiles (the embedded dataset's
  generator, before any quantisation)."""
  from data_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  images = np.stack([synthetic.generate_tile(0, i, tile_size).image for i in range(count)])
  return {f'synthetic {p}': images[..., schema.product_indices(p)].astype(np.float64)
          for p in schema.PRODUCTS}


def product_form(form: quantise.StorageForm, product: str) -> quantise.StorageForm:
  """The one-channel form of ``product`` (its code range)."""
  return form.channel(schema.band_index(product, 'summer'))


# --- Quantisation error ----------------------------------------------------------------------


def quantisation_error(products: dict[str, np.ndarray]) -> list[dict]:
  rows = []
  for name, values in products.items():
    product = name.split()[-1]
    for form_name, contract in FORMS.items():
      form = product_form(quantise.form_of(contract), product)
      flat = values.reshape(-1, 1)
      valid = ~np.isnan(flat[:, 0])
      stored = form.round_trip(flat)[:, 0].astype(np.float64)[valid]
      original = flat[valid, 0]
      if form.is_codes:
        low, high = form.code_min[0], form.code_max[0]
      else:
        low, high = form.clip_range
      inside = (original >= low) & (original <= high)
      error = np.abs(stored - original)
      rows.append({'source': name, 'form': form_name, 'pixels': int(valid.sum()),
                   'range_db': [low, high], 'max_error_db': float(error.max()),
                   'rms_error_db': float(np.sqrt(np.mean(error ** 2))),
                   'max_rounding_error_db': float(error[inside].max()) if inside.any() else 0.0,
                   'clipped_fraction': float(1.0 - inside.mean()),
                   'clipped_below': float((original < low).mean()),
                   'clipped_above': float((original > high).mean())})
  return rows


# --- Bytes per record ------------------------------------------------------------------------


def record_bytes(count: int) -> list[dict]:
  """Per-record bytes of a shard of ``count`` 448 px synthetic tiles written in each form."""
  from data_pipeline import build_synthetic  # pylint: disable=g-import-not-at-top
  from data_pipeline import writer  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  rows = []
  for form_name, contract in FORMS.items():
    contract = contract.__class__(**{**contract.to_dict(), 'tile_size': TILE})
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, form_name)
      writer.build_dataset(out, {'train': list(range(count))},
                           functools.partial(build_synthetic.synthetic_examples, seed=0,
                                             tile_size=TILE), contract, num_shards=1)
      shard = glob.glob(os.path.join(out, '*train.tfrecord*'))[0]
      size = os.path.getsize(shard)
    per_record = size / count
    image = raw_tile_bytes(form_name)
    labels = TILE * TILE
    rows.append({'form': form_name, 'tiles': count, 'shard_bytes': size,
                 'record_bytes': per_record, 'image_bytes': image, 'worldcover_bytes': labels,
                 'other_bytes': per_record - image - labels})
  return rows


# --- Codecs ----------------------------------------------------------------------------------


def codecs() -> dict[str, tuple]:
  """{name: (compress, decompress)} of the codecs importable here without a new dependency."""
  out = {f'zlib-{level}': (lambda b, level=level: zlib.compress(b, level), zlib.decompress)
         for level in (1, 6)}
  try:
    zstandard = importlib.import_module('zstandard')
  except ImportError:
    return out
  for level in (1, 3):
    out[f'zstd-{level}'] = (zstandard.ZstdCompressor(level=level).compress,
                            zstandard.ZstdDecompressor().decompress)
  return out


def entropy_bits(data: bytes) -> float:
  """Order-0 entropy of ``data`` in bits per byte: what a coder of single bytes can reach."""
  counts = np.bincount(np.frombuffer(data, np.uint8), minlength=256).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log2(p)).sum())


def best_seconds(fn, repeat: int, min_seconds: float = 0.2) -> float:
  """The fastest of ``repeat`` timings of ``fn()``, each looped to at least ``min_seconds``."""
  best = math.inf
  for _ in range(repeat):
    loops, start = 0, time.perf_counter()
    while True:
      fn()
      loops += 1
      elapsed = time.perf_counter() - start
      if elapsed >= min_seconds:
        break
    best = min(best, elapsed / loops)
  return best


def codec_rows(buffers: dict[tuple[str, str], list[bytes]], repeat: int) -> list[dict]:
  """One row per (source, form, codec) over the raw byte buffers of each (source, form)."""
  rows = []
  for (source, form_name), chunks in buffers.items():
    raw = sum(len(c) for c in chunks)
    joined = b''.join(chunks)
    copy_s = best_seconds(lambda: [bytearray(c) for c in chunks], repeat)
    rows.append({'source': source, 'form': form_name, 'codec': 'none', 'raw_bytes': raw,
                 'compressed_bytes': raw, 'ratio': 1.0, 'entropy_bits_per_byte':
                 entropy_bits(joined), 'decode_mb_per_s': raw / copy_s / 1e6})
    for name, (compress, decompress) in codecs().items():
      packed = [compress(c) for c in chunks]
      size = sum(len(p) for p in packed)
      assert b''.join(decompress(p) for p in packed) == joined
      seconds = best_seconds(lambda: [decompress(p) for p in packed], repeat)
      rows.append({'source': source, 'form': form_name, 'codec': name, 'raw_bytes': raw,
                   'compressed_bytes': size, 'ratio': size / raw,
                   'entropy_bits_per_byte': rows[-1]['entropy_bits_per_byte'],
                   'decode_mb_per_s': raw / seconds / 1e6})
  for row in rows:
    tile = raw_tile_bytes(row['form'])
    row['tile_bytes'] = row['ratio'] * tile
    row['decode_tiles_per_s_per_core'] = row['decode_mb_per_s'] * 1e6 / tile
  return rows


def tradeoff(rows: list[dict]) -> list[dict]:
  """Tiles/s at each storage bandwidth and the decode cores that takes, per (source, form,
  codec); 'none' decodes at the local reader's parse rate (a copy into the batch)."""
  out = []
  for row in rows:
    for gbps in BANDWIDTHS_GBPS:
      tiles = gbps * 1e9 / row['tile_bytes']
      per_core = (RAW_READER_TILES_PER_S_PER_CORE * raw_tile_bytes('float16') /
                  raw_tile_bytes(row['form'])) if row['codec'] == 'none' else \
          row['decode_tiles_per_s_per_core']
      out.append({'source': row['source'], 'form': row['form'], 'codec': row['codec'],
                  'bandwidth_gbps': gbps, 'tiles_per_s': tiles,
                  'decode_cores': tiles / per_core})
  return out


def dataset_buffers(float16_dir: str, uint8_dir: str, count: int) -> dict:
  """{('embedded', form): per-tile raw image bytes} of the first ``count`` training tiles of the
  embedded dataset in each form; generated in memory (the same generator and encoders) when a
  folder is missing."""
  out = {}
  for form_name, path in (('float16', float16_dir), ('uint8', uint8_dir)):
    if path and os.path.exists(os.path.join(path, 'dataset_info.json')):
      from data_pipeline import input as data_input  # pylint: disable=g-import-not-at-top
      dataset = data_input.HostDataset(path, 'train')
      if dataset.contract.storage_dtype != form_name:
        raise ValueError(f'{path} stores {dataset.contract.storage_dtype}, not {form_name}')
      images = next(dataset.eval_batches(count))[schema.IMAGE][:count]
      source = f'embedded {dataset.tile_size} px'
    else:
      from data_pipeline import synthetic  # pylint: disable=g-import-not-at-top
      form = quantise.form_of(FORMS[form_name])
      images = np.stack([form.encode(synthetic.generate_tile(0, i, 128).image)
                         for i in range(count)])
      source = 'embedded 128 px (generated)'
    out[(source, form_name)] = [np.ascontiguousarray(t).tobytes() for t in images]
  return out


def plane_buffers(products: dict[str, np.ndarray]) -> dict:
  """{(real product, form): [plane bytes]}, each plane stored in the form (one channel)."""
  out = {}
  for name, values in products.items():
    for form_name, contract in FORMS.items():
      form = product_form(quantise.form_of(contract), name.split()[-1])
      out[(name, form_name)] = [form.encode(values[..., None]).tobytes()]
  return out


# --- Report ----------------------------------------------------------------------------------


def print_tables(result: dict) -> None:
  print('\nBytes per 448 px x 12 channel tile:')
  for form_name in FORMS:
    print(f'  {form_name:8s} image {raw_tile_bytes(form_name):>10,d} B')
  for row in result['records']:
    print(f"  {row['form']:8s} record {row['record_bytes']:>10,.0f} B on a written shard "
          f"(image {row['image_bytes']:,d} + WorldCover {row['worldcover_bytes']:,d} + other "
          f"{row['other_bytes']:,.0f})")
  print('\nQuantisation error (dB) per product:')
  print(f"  {'source':<26}{'form':<9}{'range':>14}{'max':>8}{'rms':>8}{'max in':>8}"
        f"{'clipped':>10}{'below':>9}{'above':>9}")
  for r in result['quantisation']:
    low, high = r['range_db']
    print(f"  {r['source']:<26}{r['form']:<9}{f'{low:g}..{high:g}':>14}{r['max_error_db']:8.3f}"
          f"{r['rms_error_db']:8.4f}{r['max_rounding_error_db']:8.4f}"
          f"{r['clipped_fraction']:10.4%}{r['clipped_below']:9.4%}{r['clipped_above']:9.4%}")
  print('\nLossless codecs (ratio = compressed / raw; per 448 px tile):')
  print(f"  {'source':<30}{'form':<9}{'codec':<8}{'ratio':>7}{'H0 b/B':>8}{'tile MB':>9}"
        f"{'dec MB/s':>10}{'tiles/s/core':>13}")
  for r in result['codecs']:
    print(f"  {r['source']:<30}{r['form']:<9}{r['codec']:<8}{r['ratio']:7.3f}"
          f"{r['entropy_bits_per_byte']:8.2f}{r['tile_bytes'] / 1e6:9.3f}"
          f"{r['decode_mb_per_s']:10.0f}{r['decode_tiles_per_s_per_core']:13.0f}")
  print('\nTiles/s at a storage bandwidth, and the cores decoding them takes (embedded tiles;'
        " 'none' at the local reader's parse rate):")
  embedded = [r for r in result['tradeoff'] if r['source'].startswith('embedded')]
  for gbps in BANDWIDTHS_GBPS:
    cells = [f"{r['form']} {r['codec']}: {r['tiles_per_s']:.0f} tiles/s, "
             f"{r['decode_cores']:.1f} cores" for r in embedded if r['bandwidth_gbps'] == gbps]
    print(f'  {gbps:g} GB/s: ' + '; '.join(cells))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--samples', default='/work/shared/samples')
  parser.add_argument('--float16_dir', default='data/synthetic_tiny',
                      help='the embedded dataset stored as float16')
  parser.add_argument('--uint8_dir', default='', help='the same built with --storage uint8')
  parser.add_argument('--tiles', type=int, default=64, help='embedded tiles for the codecs')
  parser.add_argument('--synthetic_tiles', type=int, default=64,
                      help='generated 128 px tiles for the quantisation error')
  parser.add_argument('--record_tiles', type=int, default=4,
                      help='448 px tiles in the shard whose records are measured')
  parser.add_argument('--repeat', type=int, default=3, help='timings per codec (best kept)')
  parser.add_argument('--json', default='', help='write the results here')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  real = real_products(args.samples)
  result = {
      'tile': {form: raw_tile_bytes(form) for form in FORMS},
      'ranges_db': schema.UINT8_RANGE_DB,
      'records': record_bytes(args.record_tiles),
      'quantisation': quantisation_error({**real,
                                          **synthetic_products(args.synthetic_tiles)}),
      'codecs_available': sorted(codecs()),
  }
  buffers = {**dataset_buffers(args.float16_dir, args.uint8_dir, args.tiles),
             **plane_buffers(real)}
  result['codecs'] = codec_rows(buffers, args.repeat)
  result['tradeoff'] = tradeoff(result['codecs'])
  result['seconds'] = time.perf_counter() - start
  result['command'] = ' '.join(['python', 'bench/bench_storage.py'] + (argv or sys.argv[1:]))
  print_tables(result)
  print(f"\n{result['seconds']:.0f} s; codecs: {', '.join(result['codecs_available'])}"
        + ('' if any(c.startswith('zstd') for c in result['codecs_available'])
           else ' (zstandard is not installed)'))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
