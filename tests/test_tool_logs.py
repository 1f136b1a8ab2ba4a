"""The tools' command lines are quiet: a result line, or one error line, unless --verbosity asks."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tool(module, *args):
  """(exit code, non-empty lines of stdout and stderr) of ``python -m module args``, with none of
  the test session's quieting variables (TensorFlow, XLA's fake devices)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  done = subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
  return done.returncode, lines


def test_export_prints_one_line_and_verbosity_brings_the_logs_back(pretrained, tmp_path):
  workdir, _ = pretrained
  code, lines = run_tool('mae_jax.tools.export', '--checkpoint', workdir, '--output',
                         str(tmp_path / 'quiet'), '--part', 'encoder')
  assert code == 0, lines
  assert lines == [f'Wrote {tmp_path}/quiet/model.safetensors and config.json '
                   '(transformers.ViTMAEModel.from_pretrained)']
  code, lines = run_tool('mae_jax.tools.export', '--checkpoint', workdir, '--output',
                         str(tmp_path / 'verbose'), '--part', 'encoder', '--verbosity=0')
  assert code == 0 and len(lines) > 10  # Orbax's INFO lines, asked for.
  code, lines = run_tool('mae_jax.tools.export', '--checkpoint', str(tmp_path / 'missing'),
                         '--output', str(tmp_path / 'out'))
  assert code == 1
  assert lines == [f"mae_jax.tools.export: error: checkpoint path '{tmp_path}/missing' does "
                   'not exist']


def test_embed_prints_one_line(pretrained, tmp_path):
  workdir, config = pretrained
  output = str(tmp_path / 'emb.parquet')
  code, lines = run_tool('mae_jax.tools.embed', f'--checkpoint={workdir}',
                         f'--data_dir={config.dataset.data_dir}', f'--output={output}',
                         '--noprogress')
  assert code == 0, lines
  assert len(lines) == 1 and lines[0].startswith('Embedded 16 tiles'), lines
  code, lines = run_tool('mae_jax.tools.embed', f'--checkpoint={workdir}',
                         f'--data_dir={tmp_path / "nodata"}', f'--output={output}')
  assert code == 1
  assert lines == [f"mae_jax.tools.embed: error: data_dir '{tmp_path}/nodata' does not exist"]
