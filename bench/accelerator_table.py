r"""The README's accelerator table from ``bench_step.py --json`` records.

  python bench/accelerator_table.py RESULTS.jsonl [--header 'H200, 2026-12-04, ...']

One row per model and input; a PyTorch-only record (``--skip_jax``, e.g. torch.compile) joins
the row of the same preset, batch and input.
"""

from __future__ import annotations

import argparse
import json


def fmt(value, spec: str, missing: str = '') -> str:
  return missing if value is None else format(value, spec)


def merge(records: list[dict]) -> list[dict]:
  rows: dict[tuple, dict] = {}
  for record in records:
    key = (record['preset'], record['batch'], record['image_size'], record['channels'])
    row = rows.setdefault(key, {'torch': {}})
    torch = {**row['torch'], **record.get('torch', {})}
    row.update({k: v for k, v in record.items() if k != 'torch'})
    row['torch'] = torch
  return list(rows.values())


def table(records: list[dict]) -> str:
  lines = [
      '| preset, input | batch | remat | attention (enc / dec) | mae_jax img/s | MFU of spec '
      '/ of measured matmul peak | PyTorch eager img/s | mae_jax / eager | torch.compile img/s '
      '| mae_jax / compile | peak memory mae_jax / eager GB | host-fed / resident |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for row in merge(records):
    jx = row.get('jax', {})
    eager = next((v for k, v in row['torch'].items() if k.startswith('eager')), {})
    compiled = next((v for k, v in row['torch'].items() if k.startswith('torch.compile')), {})
    jax_img_s = jx.get('img_s')
    ratio = lambda other: (fmt(jax_img_s / other['img_s'], '.2f') if jax_img_s and other
                           else '')
    memory = (fmt(jx.get('peak_memory_gb'), '.1f', 'n/a') + ' / '
              + fmt(eager.get('peak_memory_gb'), '.1f', 'n/a'))
    lines.append(
        f'| `{row["preset"]}`, {row["image_size"]} x {row["image_size"]} x {row["channels"]} '
        f'| {row["batch"]} | {row.get("remat_policy", "")}{", scan" if row["scan_layers"] else ""}'
        f' | {" / ".join(row["attention"])} | {fmt(jax_img_s, ".0f")} '
        f'| {fmt(jx.get("mfu_spec"), ".1%")} / {fmt(jx.get("mfu_measured_peak"), ".1%")} '
        f'| {fmt(eager.get("img_s"), ".0f")} | {ratio(eager)} '
        f'| {fmt(compiled.get("img_s"), ".0f")} | {ratio(compiled)} | {memory} '
        f'| {fmt(row.get("host_fed_over_resident"), ".3f")} |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('results', help='bench_step.py --json output')
  args = parser.parse_args()
  with open(args.results) as f:
    records = [json.loads(line) for line in f if line.strip()]
  print(table(records))


if __name__ == '__main__':
  main()
