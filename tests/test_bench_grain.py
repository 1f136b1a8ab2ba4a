"""bench/bench_grain.py's check mode runs and reports what it should.

grain is not a dependency of the project (the benchmark compares it with the local reader), so
this test is skipped where it is not installed, as in CI.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip('grain')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
def test_check_mode_reports_properties_and_figures(tmp_path):
  # A process of its own: grain's absl flags and worker processes stay out of this one.
  results = tmp_path / 'grain.json'
  run = subprocess.run(
      [sys.executable, 'bench/bench_grain.py', '--check', '--tiles', '32', '--tile_size', '16',
       '--json', str(results)], cwd=ROOT, env=dict(os.environ, BENCH_TMPDIR=str(tmp_path)),
      capture_output=True, text=True, check=False, timeout=120)
  assert run.returncode == 0, run.stdout + run.stderr
  result = json.loads(results.read_text())
  checks = result['checks']
  bad_records = checks.pop('bad_records')
  assert checks and all(isinstance(value, bool) for value in checks.values()), checks
  # The copies and the parser are right; the project's own order ignores the host count.
  assert checks['same_tiles_as_local']
  assert checks['host_count_free_rows_project_sharded_stream']
  assert isinstance(bad_records.pop('pipeline_stops_at_bad_record'), bool)
  for kind in bad_records.values():
    assert kind['detected'] and isinstance(kind['names_file'], bool), kind
  cores = len(os.sched_getaffinity(0))
  assert set(result['figures']['warm']) == {'local', 'grain_map', 'grain_read', 'grain_loader0',
                                            f'grain_loader{cores}'}
  for entry in result['figures']['warm'].values():
    assert entry['tiles_s'] > 0 and entry['tiles_s_core'] > 0 and entry['of_local'] > 0
