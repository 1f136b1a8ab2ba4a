"""docs/scaling.md's derived tables are what bench/scaling_table.py prints (no hand-edited figure)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
  spec = importlib.util.spec_from_file_location(
      'scaling_table', os.path.join(REPO, 'bench', 'scaling_table.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_rates_are_mfu_times_peak_over_flops():
  table = _script()
  # 40 % of a TPU v4's 275 TFLOP/s over mae_b's 272 GFLOP per training example.
  assert table.rate('TPU v4', 'mae_b', 0.4) == pytest.approx(0.4 * 275e12 / 272e9)
  assert table.rate('NVIDIA H100', 'poster', 0.5) == pytest.approx(0.5 * 989e12 / 142e9)


def test_docs_scaling_holds_the_scripts_tables(capsys):
  _script().main(['--mfu', '0.4', '--tiles', '450000'])
  printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith('|')]
  with open(os.path.join(REPO, 'docs', 'scaling.md')) as f:
    document = f.read().splitlines()
  missing = [line for line in printed if line not in document]
  assert not missing, ('docs/scaling.md differs from `python bench/scaling_table.py --mfu 0.4 '
                       f'--tiles 450000`: {missing[:3]}')
