"""launch.sh against fake gcloud / sbatch / srun, and its local multi-process launcher.

The fakes record their argv (one JSON list per line) so the tests can check the exact commands.
Remote commands (what `tpu ... --command=` would run on a worker) and the generated sbatch
script are also executed here, with stand-ins for python / pgrep / pkill / srun, to check that
they work as shell code and not only as text. Nothing here imports jax.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch.sh'
TIMEOUT = 30  # Seconds for any one subprocess: a bug must fail a test, never hang CI.
GS_ARGS = ['--config', 'configs/pretrain.py:poster', '--workdir', 'gs://bucket/run1']

FAKE_TOOL = '''#!{python}
"""Fake gcloud / sbatch / srun: records its argv, then acts a little like the real one."""
import json, os, shutil, signal, sys, time

name = os.path.basename(sys.argv[0])
args = sys.argv[1:]


def record(entry):
  with open(os.environ['FAKE_RECORD'], 'a') as f:
    f.write(json.dumps(entry) + '\\n')


record([name] + args)
if name == 'gcloud':
  if 'scp' in args:  # Keep the tarball: launch.sh deletes its own copy.
    source = args[args.index('scp') + 1]
    shutil.copy(source, os.path.join(os.environ['FAKE_COPIES'], os.path.basename(source)))
  if 'describe' in args:  # The next queued-resource state.
    with open(os.environ['FAKE_STATES']) as f:
      states = f.read().split()
    print(states[0])
    with open(os.environ['FAKE_STATES'], 'w') as f:
      f.write('\\n'.join(states[1:]))
elif name == 'sbatch':
  shutil.copy(args[-1], os.path.join(os.environ['FAKE_COPIES'], 'submitted.sbatch'))
  print('Submitted batch job 4242')
elif name == 'srun':
  if os.environ.get('FAKE_SRUN_READY'):  # Run until SIGTERM, like a training job.
    stopping = []

    def on_term(signum, frame):
      record(['srun-signal', signal.Signals(signum).name])
      stopping.append(signum)

    signal.signal(signal.SIGTERM, on_term)
    open(os.environ['FAKE_SRUN_READY'], 'w').close()
    deadline = time.time() + 20
    while time.time() < deadline and not stopping:
      time.sleep(0.02)
    time.sleep(0.5)  # "Saving a checkpoint": another SIGTERM now would be recorded too.
    sys.exit(0 if stopping else 1)
  sys.exit(int(os.environ.get('FAKE_SRUN_EXIT', '0')))
'''

# The entrypoint for `local`: reports what it sees, then sleeps / exits as its args say
# (key=value words: out=DIR, trap=1, sleepI=SECONDS, codeI=EXIT_CODE for process I).
PROBE = '''
import json, os, signal, sys, time

opts = dict(arg.split('=', 1) for arg in sys.argv[1:])
index = os.environ['JAX_PROCESS_ID']
out = opts['out']
received = []


def on_signal(signum, frame):
  received.append(signum)
  with open(os.path.join(out, f'signals_{index}.txt'), 'a') as f:
    f.write(signal.Signals(signum).name + '\\n')


if opts.get('trap') == '1':  # Like mae_jax: SIGTERM / SIGINT mean "save and stop".
  signal.signal(signal.SIGTERM, on_signal)
  signal.signal(signal.SIGINT, on_signal)
names = ['JAX_PLATFORMS', 'XLA_FLAGS', 'JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
         'JAX_PROCESS_ID', 'PYTHONUNBUFFERED']
report = {name: os.environ.get(name) for name in names}
report.update(pid=os.getpid(), pgrp=os.getpgrp())
with open(os.path.join(out, f'env_{index}.json.tmp'), 'w') as f:
  json.dump(report, f)
os.rename(os.path.join(out, f'env_{index}.json.tmp'), os.path.join(out, f'env_{index}.json'))
print(f'process {index} of {os.environ["JAX_NUM_PROCESSES"]} says hello')
print(f'process {index} writes to stderr', file=sys.stderr)
deadline = time.time() + float(opts.get('sleep' + index, 0))
while time.time() < deadline and not received:
  time.sleep(0.02)
if received:
  time.sleep(0.3)  # "Saving a checkpoint": a second signal now would be recorded too.
sys.exit(int(opts.get('code' + index, 0)))
'''

# A stand-in for a running mae_jax process on a TPU worker (`python3 -m mae_jax_sleeper`
# matches the pattern `tpu stop` uses).
SLEEPER = '''
import signal, sys, time

marker = sys.argv[1]


def on_term(signum, frame):
  with open(marker, 'a') as f:
    f.write('SIGTERM\\n')
  sys.exit(0)


signal.signal(signal.SIGTERM, on_term)
open(marker + '.ready', 'w').close()
time.sleep(20)
sys.exit(1)
'''

# The remote side of `tpu run`: ~/mae_jax/mae_jax/main.py records how it was started.
FAKE_MAIN = '''
import json, os, sys

with open(os.path.join(os.environ['HOME'], 'main_argv.json'), 'w') as f:
  json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd()}, f)
print('fake mae_jax.main ran')
'''

# The remote side of `tpu setup`: python3 that records pip calls and runs `-c` checks.
FAKE_PIP_PYTHON = '''#!{python}
import json, os, sys

if sys.argv[1] == '-c':
  os.execv(sys.executable, [sys.executable] + sys.argv[1:])
with open(os.environ['FAKE_PYTHON_RECORD'], 'a') as f:
  f.write(json.dumps({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}) + '\\n')
'''


def write_executable(path, text):
  path.write_text(text)
  path.chmod(0o755)


def wait_for(predicate, what, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    time.sleep(0.02)
  raise AssertionError(f'timed out waiting for {what}')


class Fakes:
  """A tmp dir with fake gcloud / sbatch / srun first on PATH, and what they recorded."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.bin = tmp_path / 'fakebin'
    self.bin.mkdir()
    self.copies = tmp_path / 'copies'
    self.copies.mkdir()
    self.record = tmp_path / 'record.jsonl'
    self.states = tmp_path / 'states.txt'
    tool = FAKE_TOOL.format(python=sys.executable)
    for name in ('gcloud', 'sbatch', 'srun'):
      write_executable(self.bin / name, tool)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'FAKE_')) and k not in ('PYTHON', 'PYTHONPATH')}
    env.update(PATH=f'{self.bin}{os.pathsep}{os.environ["PATH"]}', FAKE_RECORD=str(self.record),
               FAKE_COPIES=str(self.copies), FAKE_STATES=str(self.states),
               LAUNCH_POLL_SECONDS='0')
    self.env = env

  def launch(self, *args, env=None, cwd=None, timeout=TIMEOUT):
    return subprocess.run([str(LAUNCH), *args], env={**self.env, **(env or {})},
                          cwd=cwd or self.tmp, capture_output=True, text=True, timeout=timeout)

  def calls(self):
    if not self.record.exists():
      return []
    return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture
def fakes(tmp_path):
  return Fakes(tmp_path)


def ok(result):
  assert result.returncode == 0, f'rc {result.returncode}\n{result.stdout}\n{result.stderr}'
  return result


def remote_command(call):
  """The --command=... of a recorded `gcloud compute tpus tpu-vm ssh`."""
  commands = [arg for arg in call if arg.startswith('--command=')]
  assert len(commands) == 1, call
  return commands[0][len('--command='):]


def ssh_prefix(worker, name='n', zone='z'):
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', name, f'--zone={zone}',
          f'--worker={worker}']


def procps_wrappers(bin_dir):
  """pgrep / pkill limited to this test's children, so nothing else on the machine is hit."""
  for name in ('pgrep', 'pkill'):
    real = shutil.which(name)
    if real is None:
      pytest.skip(f'{name} is not installed')
    write_executable(bin_dir / name, f'#!/bin/sh\nexec {real} "$@" -P {os.getpid()}\n')


def run_remote(command, home, bin_dir, extra_env=None, timeout=TIMEOUT):
  """Runs a worker's --command the way sshd does (login shell -c), with HOME=home."""
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHON')}
  env.update(HOME=str(home), PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', **(extra_env or {}))
  return subprocess.run(['bash', '-c', command], env=env, cwd=home, capture_output=True,
                        text=True, timeout=timeout)


# --- help and usage errors -------------------------------------------------------------------


@pytest.mark.parametrize('flag', ['--help', '-h', 'help'])
def test_help_documents_every_subcommand(fakes, flag):
  result = ok(fakes.launch(flag))
  for text in ['tpu create', 'tpu setup', 'tpu run', 'tpu tail', 'tpu stop', 'tpu delete',
               'slurm', 'local', '--dry-run', '--module', '--project', '--queued', '--spot',
               '--wait', 'queued-resources describe', 'SIGTERM', 'PYTHON', 'XLA_FLAGS',
               'LAUNCH_POLL_SECONDS', 'EXAMPLES', 'EXIT STATUS']:
    assert text in result.stdout, text
  assert os.access(LAUNCH, os.X_OK)
  assert fakes.calls() == []


@pytest.mark.parametrize('args, message', [
    ([], 'missing subcommand'),
    (['bogus'], "unknown subcommand 'bogus'"),
    (['tpu'], 'needs an action'),
    (['tpu', 'frob', '--name', 'n', '--zone', 'z'], "unknown tpu action 'frob'"),
    (['tpu', 'create', '--name', 'n', '--zone', 'z', '--type', 'v4-8', '--bogus'],
     "unknown option '--bogus'"),
    (['tpu', 'create', '--zone', 'z', '--type', 'v4-8'], "'tpu create' needs --name"),
    (['tpu', 'create', '--name', 'n', '--type', 'v4-8'], "'tpu create' needs --zone"),
    (['tpu', 'create', '--name', 'n', '--zone', 'z'], "'tpu create' needs --type"),
    (['tpu', 'create', '--name', 'n', '--zone', 'z', '--type', 'v4-8', '--wait'],
     '--wait goes with --queued'),
    (['tpu', 'create', '--name'], 'option --name needs a value'),
    (['tpu', 'delete', '--name', 'n', '--zone', 'z', '--', 'x'], 'takes no arguments after --'),
    (['tpu', 'run', '--name', 'n', '--zone', 'z', '--module', 'not a module', '--', *GS_ARGS],
     '--module must be a Python module name'),
    (['slurm', '--gpus-per-node', '4', '--', *GS_ARGS], "'slurm' needs --nodes"),
    (['slurm', '--nodes', '2', '--', *GS_ARGS], "'slurm' needs --gpus-per-node"),
    (['slurm', '--nodes', 'two', '--gpus-per-node', '4'], '--nodes must be a positive integer'),
    (['local'], "'local' needs the number of processes"),
    (['local', '0'], 'must be a positive integer'),
    (['local', '2', '--devices-per-process', 'x'], '--devices-per-process must be'),
    # Values written into the sbatch script or a remote command: a newline would end the
    # #SBATCH block (or the command) and start a line of shell.
    *[(['slurm', '--nodes', '1', '--gpus-per-node', '1', option, value, '--', *GS_ARGS],
       f'option {option} must not contain control characters')
      for option, value in [('--partition', 'gpu\nhostname'), ('--time', '1:00:00\nhostname'),
                            ('--account', 'acct\n#SBATCH --wrap=x'),
                            ('--script-dir', 'jobs\nx')]],
    (['tpu', 'run', '--name', 'n', '--zone', 'z', '--log', 'x\n', '--', *GS_ARGS],
     'option --log must not contain control characters'),
    (['slurm', '--nodes', '1', '--gpus-per-node', '1', '--partition', 'gpu #1', '--', *GS_ARGS],
     "--partition must not contain whitespace, quotes, '\\' or '#'"),
    (['slurm', '--nodes', '1', '--gpus-per-node', '1', '--account', 'a"b', '--', *GS_ARGS],
     "--account must not contain whitespace, quotes, '\\' or '#'"),
    (['slurm', '--nodes', '1', '--gpus-per-node', '1', '--time', '1 day', '--', *GS_ARGS],
     '--time must be a SLURM time limit'),
    (['slurm', '--nodes', '1', '--gpus-per-node', '1', '--script-dir', 'a\\b', '--', *GS_ARGS],
     "--script-dir: the job output folder must not contain '\\'"),
])
def test_usage_errors_exit_2(fakes, args, message):
  result = fakes.launch(*args)
  assert result.returncode == 2, result
  assert message in result.stderr
  assert 'usage:' in result.stderr
  assert fakes.calls() == []


# --- tpu create / delete / tail ----------------------------------------------------------------


@pytest.mark.parametrize('extra, expected', [
    ([], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'n', '--zone=z',
          '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']),
    (['--spot', '--version', 'v2-alpha-tpuv5'],
     ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'n', '--zone=z',
      '--accelerator-type=v4-32', '--version=v2-alpha-tpuv5', '--spot']),
    (['--queued'], ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'n',
                    '--node-id=n', '--zone=z', '--accelerator-type=v4-32',
                    '--runtime-version=tpu-ubuntu2204-base']),
    (['--queued', '--spot', '--project=p'],
     ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'n', '--node-id=n',
      '--zone=z', '--accelerator-type=v4-32', '--runtime-version=tpu-ubuntu2204-base',
      '--spot', '--project=p']),
])
def test_tpu_create(fakes, extra, expected):
  ok(fakes.launch('tpu', 'create', '--name', 'n', '--zone=z', '--type', 'v4-32', *extra))
  assert fakes.calls() == [expected]


def test_tpu_create_queued_waits_until_active(fakes):
  fakes.states.write_text('WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n')
  ok(fakes.launch('tpu', 'create', '--name', 'n', '--zone', 'z', '--type', 'v4-32', '--queued',
                  '--wait', '--project', 'p'))
  describe = ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'n', '--zone=z',
              '--format=value(state.state)', '--project=p']
  calls = fakes.calls()
  assert calls[0][:5] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create']
  assert calls[1:] == [describe] * 3


def test_tpu_create_queued_wait_fails_on_failed_state(fakes):
  fakes.states.write_text('PROVISIONING\nFAILED\n')
  result = fakes.launch('tpu', 'create', '--name', 'n', '--zone', 'z', '--type', 'v4-32',
                        '--queued', '--wait')
  assert result.returncode == 1
  assert 'FAILED' in result.stderr


@pytest.mark.parametrize('extra, expected', [
    ([], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'n', '--zone=z', '--quiet']),
    (['--queued'], ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'n', '--zone=z',
                    '--force', '--quiet']),
    (['--project', 'p'], ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'n', '--zone=z',
                          '--quiet', '--project=p']),
    (['--queued', '--project', 'p'], ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
                                      'n', '--zone=z', '--force', '--quiet', '--project=p']),
])
def test_tpu_delete(fakes, extra, expected):
  ok(fakes.launch('tpu', 'delete', '--name', 'n', '--zone', 'z', *extra))
  assert fakes.calls() == [expected]


def test_tpu_tail(fakes):
  ok(fakes.launch('tpu', 'tail', '--name', 'n', '--zone', 'z'))
  ok(fakes.launch('tpu', 'tail', '--name', 'n', '--zone', 'z', '--worker', '3', '--log',
                  '~/other log.txt', '--project', 'p'))
  assert fakes.calls() == [
      ssh_prefix(0) + ['--command=tail -n 100 -F ~/mae_jax.log'],
      ssh_prefix(3) + ['--command=tail -n 100 -F ~/other\\ log.txt', '--project=p'],
  ]


# --- tpu setup ---------------------------------------------------------------------------------


def test_tpu_setup_copies_the_checkout_and_installs_it(fakes, tmp_path):
  ok(fakes.launch('tpu', 'setup', '--name', 'n', '--zone', 'z'))
  scp, ssh = fakes.calls()
  tarball = scp[5]
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', tarball, 'n:~/mae_jax.tar.gz',
                 '--zone=z', '--worker=all']
  assert tarball.endswith('.tar.gz') and not os.path.exists(tarball)  # Temporary, removed.
  assert ssh[:-1] == ssh_prefix('all')
  command = remote_command(ssh)
  assert "'jax[tpu]==0.10.2'" in command
  assert '-r requirements.txt -c requirements-lock.txt' in command
  assert 'libtpu_releases.html' in command
  assert command.endswith('python3 -m pip install --no-deps -e .')

  copy = fakes.copies / os.path.basename(tarball)
  with tarfile.open(copy) as tar:
    names = set(tar.getnames())
  for name in ['mae_jax/main.py', 'launch.sh', 'requirements.txt', 'requirements-lock.txt',
               'setup.py', 'configs/pretrain.py', 'tests/test_launch.py']:
    assert name in names, name
  assert not any(name.startswith(('.venv/', 'data/', 'workdirs/', '.git/')) for name in names)

  # What every worker would do: unpack into ~/mae_jax, check Python, pip install twice.
  home = tmp_path / 'home'
  home.mkdir()
  shutil.copy(copy, home / 'mae_jax.tar.gz')
  bin_dir = tmp_path / 'remote_bin'
  bin_dir.mkdir()
  write_executable(bin_dir / 'python3', FAKE_PIP_PYTHON.format(python=sys.executable))
  pip_record = tmp_path / 'pip.jsonl'
  ok(run_remote(command, home, bin_dir, {'FAKE_PYTHON_RECORD': str(pip_record)}))
  assert (home / 'mae_jax' / 'launch.sh').exists()
  assert (home / 'mae_jax' / 'mae_jax' / 'main.py').exists()
  assert not (home / 'mae_jax.tar.gz').exists()
  pips = [json.loads(line) for line in pip_record.read_text().splitlines()]
  assert [p['argv'] for p in pips] == [
      ['-m', 'pip', 'install', '-r', 'requirements.txt', '-c', 'requirements-lock.txt',
       'jax[tpu]==0.10.2', '-f',
       'https://storage.googleapis.com/jax-releases/libtpu_releases.html'],
      ['-m', 'pip', 'install', '--no-deps', '-e', '.'],
  ]
  assert {p['cwd'] for p in pips} == {str(home / 'mae_jax')}


def test_tpu_setup_other_jax_version_drops_the_pins(fakes, tmp_path):
  ok(fakes.launch('tpu', 'setup', '--name', 'n', '--zone', 'z', '--jax-version', '0.10.3',
                  '--python', 'python3.11'))
  command = remote_command(fakes.calls()[1])
  assert "'jax[tpu]==0.10.3'" in command
  assert '-r requirements-tpu.txt -c requirements-lock-tpu.txt' in command
  assert 'python3.11 -m pip install' in command
  # The filtering part, run on copies of the two files.
  work = tmp_path / 'work'
  work.mkdir()
  for name in ('requirements.txt', 'requirements-lock.txt'):
    shutil.copy(REPO / name, work / name)
  filters = re.findall(r"sed -E '[^']*' [a-z.-]+ > [a-z.-]+", command)
  assert len(filters) == 2
  subprocess.run(['bash', '-c', ' && '.join(filters)], cwd=work, check=True, timeout=TIMEOUT)
  for name in ('requirements-tpu.txt', 'requirements-lock-tpu.txt'):
    lines = (work / name).read_text().splitlines()
    assert not [line for line in lines if re.match(r'(jax|jaxlib)==', line)]
    assert 'flax==0.12.8' in lines


# --- tpu run / stop ----------------------------------------------------------------------------


@pytest.mark.parametrize('workdir_args', [['--workdir', 'gs://bucket/run1'],
                                          ['--workdir=gs://bucket/run1']])
def test_tpu_run(fakes, workdir_args):
  args = ['--config', 'configs/pretrain.py:poster', *workdir_args]
  ok(fakes.launch('tpu', 'run', '--name', 'n', '--zone', 'z', '--', *args))
  (call,) = fakes.calls()
  assert call[:-1] == ssh_prefix('all')
  command = remote_command(call)
  assert 'python3 -m mae_jax.main --config configs/pretrain.py:poster' in command
  assert ' '.join(workdir_args) in command
  assert re.search(r'nohup python3 -m mae_jax\.main .* > ~/mae_jax\.log 2>&1 < /dev/null &',
                   command)


def test_tpu_run_module_log_and_project(fakes):
  ok(fakes.launch('tpu', 'run', '--name', 'n', '--zone', 'z', '--project', 'p', '--module',
                  'mae_jax.trainers.study', '--log', 'study.log', '--', '--config',
                  'configs/study.py:full', '--workdir', 'gs://b/study'))
  (call,) = fakes.calls()
  assert call[:-2] == ssh_prefix('all') and call[-1] == '--project=p'
  command = remote_command(call)
  assert 'python3 -m mae_jax.trainers.study --config configs/study.py:full --workdir gs://b/study' in command
  assert '> study.log 2>&1' in command


@pytest.mark.parametrize('args', [
    ['--config', 'c', '--workdir', '/tmp/run1'],
    ['--config', 'c', '--workdir=workdirs/run1'],
    ['--config', 'c'],
    [],
    ['--workdir', 'gs://b/x', '--workdir', '/local/last/wins'],
])
def test_tpu_run_needs_a_gs_workdir(fakes, args):
  result = fakes.launch('tpu', 'run', '--name', 'n', '--zone', 'z', '--', *args)
  assert result.returncode == 2
  assert 'multi-host TPU runs need a gs:// workdir that every worker can see' in result.stderr
  assert fakes.calls() == []


def test_tpu_run_remote_command_starts_the_entrypoint_detached(fakes, tmp_path):
  args = ['--config', 'configs/pretrain.py:poster', '--workdir', 'gs://bucket/run1',
          '--config.note=two words', "--config.odd=it's $HOME; `x`"]
  ok(fakes.launch('tpu', 'run', '--name', 'n', '--zone', 'z', '--', *args))
  command = remote_command(fakes.calls()[0])
  home = tmp_path / 'home'
  (home / 'mae_jax' / 'mae_jax').mkdir(parents=True)
  (home / 'mae_jax' / 'mae_jax' / '__init__.py').write_text('')
  (home / 'mae_jax' / 'mae_jax' / 'main.py').write_text(FAKE_MAIN)
  bin_dir = tmp_path / 'remote_bin'
  bin_dir.mkdir()
  (bin_dir / 'python3').symlink_to(sys.executable)
  procps_wrappers(bin_dir)
  result = ok(run_remote(command, home, bin_dir))
  assert 'started pid' in result.stdout
  wait_for(lambda: (home / 'main_argv.json').exists(), 'the entrypoint to start')
  seen = json.loads((home / 'main_argv.json').read_text())
  assert seen == {'argv': args, 'cwd': str(home / 'mae_jax')}
  wait_for(lambda: 'fake mae_jax.main ran' in (home / 'mae_jax.log').read_text(), 'the log')


def test_tpu_stop_and_the_already_running_check(fakes, tmp_path):
  ok(fakes.launch('tpu', 'stop', '--name', 'n', '--zone', 'z'))
  ok(fakes.launch('tpu', 'run', '--name', 'n', '--zone', 'z', '--', *GS_ARGS))
  stop_call, run_call = fakes.calls()
  assert stop_call[:-1] == ssh_prefix('all')
  stop = remote_command(stop_call)
  assert stop.startswith('pkill -TERM -f ')

  home = tmp_path / 'home'
  (home / 'mae_jax').mkdir(parents=True)
  bin_dir = tmp_path / 'remote_bin'
  bin_dir.mkdir()
  (bin_dir / 'python3').symlink_to(sys.executable)
  procps_wrappers(bin_dir)
  modules = tmp_path / 'modules'
  modules.mkdir()
  (modules / 'mae_jax_sleeper.py').write_text(SLEEPER)
  marker = tmp_path / 'sleeper_signals'
  # Looks like `python3 -m mae_jax...` to pgrep / pkill, as training does on a worker.
  sleeper = subprocess.Popen([str(bin_dir / 'python3'), '-m', 'mae_jax_sleeper', str(marker)],
                             env={**os.environ, 'PYTHONPATH': str(modules)})
  try:
    wait_for(lambda: Path(f'{marker}.ready').exists(), 'the sleeper')
    result = run_remote(remote_command(run_call), home, bin_dir)
    assert result.returncode == 1
    assert 'already running' in result.stderr
    # The shell running the command must survive its own pkill, and exit 0.
    result = ok(run_remote(stop, home, bin_dir))
    assert 'sent SIGTERM' in result.stdout
    assert sleeper.wait(timeout=10) == 0
    assert marker.read_text() == 'SIGTERM\n'
  finally:
    if sleeper.poll() is None:
      sleeper.kill()
      sleeper.wait()
  result = ok(run_remote(stop, home, bin_dir))  # Nothing left to stop: still exit 0.
  assert 'no mae_jax process running' in result.stdout


# --- dry runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize('args', [
    ['tpu', 'create', '--name', 'n', '--zone', 'z', '--type', 'v4-32', '--queued', '--wait'],
    ['tpu', 'setup', '--name', 'n', '--zone', 'z'],
    ['tpu', 'run', '--name', 'n', '--zone', 'z', '--', *GS_ARGS, '--config.note=two words'],
    ['tpu', 'tail', '--name', 'n', '--zone', 'z'],
    ['tpu', 'stop', '--name', 'n', '--zone', 'z', '--project', 'p'],
    ['tpu', 'delete', '--name', 'n', '--zone', 'z', '--queued'],
])
def test_tpu_dry_run_prints_commands_that_paste(fakes, args):
  dry = ok(fakes.launch('--dry-run', *args))
  assert fakes.calls() == []
  assert 'gcloud compute tpus' in dry.stdout
  if args[1] in ('setup', 'run', 'stop'):
    assert '--worker=all' in dry.stdout
  if args[1] == 'run':
    assert 'gs://bucket/run1' in dry.stdout
  if args[1] != 'setup':  # setup's tarball path differs between the two modes.
    fakes.states.write_text('ACTIVE\n')
    ok(fakes.launch(*args))
    real = fakes.calls()
    fakes.record.unlink()
    fakes.states.write_text('ACTIVE\n')
    subprocess.run(['bash', '-c', dry.stdout], env=fakes.env, cwd=fakes.tmp, check=True,
                   capture_output=True, timeout=TIMEOUT)
    assert fakes.calls() == real


def test_dry_run_option_may_follow_the_subcommand(fakes):
  dry = ok(fakes.launch('tpu', 'stop', '--name', 'n', '--dry-run', '--zone', 'z'))
  assert fakes.calls() == []
  assert 'pkill' in dry.stdout


# --- slurm -------------------------------------------------------------------------------------

SLURM_ARGS = ['--nodes', '2', '--gpus-per-node', '4', '--partition', 'gpu', '--time',
              '01:00:00', '--account', 'acct', '--job-name', 'pre']
PY_ARGS = ['--config', 'configs/pretrain.py:poster', '--workdir', '/shared/run1',
           '--config.note=two words']


def test_slurm_writes_and_submits_the_script(fakes, tmp_path):
  result = ok(fakes.launch('slurm', *SLURM_ARGS, '--script-dir', 'jobs', '--', *PY_ARGS))
  (call,) = fakes.calls()
  assert call[0] == 'sbatch' and len(call) == 2
  script_path = Path(call[1])
  assert script_path.parent == tmp_path / 'jobs'
  assert re.fullmatch(r'pre-\d{8}-\d{6}\.sbatch', script_path.name)
  assert 'Submitted batch job 4242' in result.stdout
  script = script_path.read_text()
  assert (fakes.copies / 'submitted.sbatch').read_text() == script
  directives = [line for line in script.splitlines() if line.startswith('#SBATCH')]
  assert directives == [
      '#SBATCH --job-name=pre', '#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=4',
      '#SBATCH --gpus-per-node=4', '#SBATCH --cpus-per-task=8', '#SBATCH --signal=B:TERM@120',
      '#SBATCH --requeue', '#SBATCH --open-mode=append',
      f'#SBATCH --output={tmp_path}/jobs/%x-%j.out', f'#SBATCH --chdir={tmp_path}',
      '#SBATCH --partition=gpu', '#SBATCH --time=01:00:00', '#SBATCH --account=acct']
  assert ('srun --kill-on-bad-exit=1 python -m mae_jax.main --config configs/pretrain.py:poster '
          '--workdir /shared/run1 --config.note=two\\ words &') in script
  # A second submission within the same second gets its own file.
  ok(fakes.launch('slurm', *SLURM_ARGS, '--script-dir', 'jobs', '--', *PY_ARGS))
  assert len(list((tmp_path / 'jobs').glob('*.sbatch'))) == 2


def sbatch_options(script):
  """The options of a script's #SBATCH lines as sbatch reads them (its _get_argument): words
  end at whitespace, quotes group, a backslash escapes, an unquoted '#' starts a comment."""
  options = []
  for line in script.splitlines():
    if not line.startswith('#SBATCH'):
      continue
    word, quote, escape, started = '', None, False, False
    for char in line[len('#SBATCH'):]:
      if escape:
        word, escape = word + char, False
      elif char == '\\':
        escape = started = True
      elif quote:
        if char == quote:
          quote = None
        else:
          word += char
      elif char in '"\'':
        quote, started = char, True
      elif char == '#':
        break
      elif char.isspace():
        if started:
          options.append(word)
        word, started = '', False
      else:
        word, started = word + char, True
    assert quote is None, f'unmatched quote: {line}'
    if started:
      options.append(word)
  return options


def test_slurm_paths_with_spaces_are_quoted_for_sbatch(fakes, tmp_path):
  cwd = tmp_path / 'my runs'
  cwd.mkdir()
  ok(fakes.launch('slurm', '--nodes', '1', '--gpus-per-node', '1', '--script-dir',
                  'jobs 100% "done"', '--', *PY_ARGS, cwd=cwd))
  (call,) = fakes.calls()
  assert Path(call[1]).parent == cwd / 'jobs 100% "done"'
  options = sbatch_options(Path(call[1]).read_text())
  # A literal % is %% in sbatch's file name patterns; %x-%j stay the job name and id.
  assert f'--output={cwd}/jobs 100%% "done"/%x-%j.out' in options
  assert f'--chdir={cwd}' in options
  assert options[:2] == ['--job-name=mae_jax', '--nodes=1']


def run_batch_script(fakes, script, extra_env=None):
  env = {k: v for k, v in fakes.env.items() if k != 'PYTHON'}
  env.update(extra_env or {})
  return subprocess.Popen(['bash', str(script)], env=env, cwd=fakes.tmp, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_slurm_script_runs_srun_and_returns_its_status(fakes, tmp_path):
  ok(fakes.launch('slurm', '--nodes', '1', '--gpus-per-node', 'h100:2', '--module',
                  'mae_jax.trainers.study', '--', *PY_ARGS))
  script = Path(fakes.calls()[0][1])
  assert '#SBATCH --gpus-per-node=h100:2' in script.read_text()
  assert '#SBATCH --ntasks-per-node=2' in script.read_text()
  assert script.parent == tmp_path / 'slurm'
  fakes.record.unlink()
  process = run_batch_script(fakes, script)
  process.communicate(timeout=TIMEOUT)
  assert process.returncode == 0
  assert fakes.calls() == [['srun', '--kill-on-bad-exit=1', 'python', '-m', 'mae_jax.trainers.study',
                            *PY_ARGS]]
  process = run_batch_script(fakes, script, {'FAKE_SRUN_EXIT': '3'})
  process.communicate(timeout=TIMEOUT)
  assert process.returncode == 3


def test_slurm_script_forwards_sigterm_to_srun_once(fakes, tmp_path):
  ok(fakes.launch('slurm', '--nodes', '2', '--gpus-per-node', '4', '--', *PY_ARGS))
  script = Path(fakes.calls()[0][1])
  fakes.record.unlink()
  ready = tmp_path / 'srun_ready'
  process = run_batch_script(fakes, script, {'FAKE_SRUN_READY': str(ready)})
  try:
    wait_for(ready.exists, 'srun to start')
    process.send_signal(signal.SIGTERM)  # What --signal=B:TERM@120 does.
    time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # Not passed on: mae_jax would stop without saving.
    _, stderr = process.communicate(timeout=10)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 0, stderr
  assert fakes.calls() == [['srun', '--kill-on-bad-exit=1', 'python', '-m', 'mae_jax.main',
                            *PY_ARGS], ['srun-signal', 'SIGTERM']]
  assert 'passing it on to srun' in stderr


def test_slurm_python_from_the_environment(fakes):
  ok(fakes.launch('slurm', '--nodes', '1', '--gpus-per-node', '1', '--', *PY_ARGS,
                  env={'PYTHON': '/opt/venv/bin/python'}))
  script = Path(fakes.calls()[0][1]).read_text()
  assert 'srun --kill-on-bad-exit=1 /opt/venv/bin/python -m mae_jax.main' in script


def test_slurm_dry_run_writes_nothing_and_prints_a_working_snippet(fakes, tmp_path):
  dry = ok(fakes.launch('--dry-run', 'slurm', *SLURM_ARGS, '--', *PY_ARGS))
  assert fakes.calls() == []
  assert not (tmp_path / 'slurm').exists()
  for text in ['#SBATCH --nodes=2', '#SBATCH --signal=B:TERM@120', 'srun --kill-on-bad-exit=1',
               '--workdir /shared/run1', 'sbatch ']:
    assert text in dry.stdout
  subprocess.run(['bash', '-c', dry.stdout], env=fakes.env, cwd=tmp_path, check=True,
                 capture_output=True, timeout=TIMEOUT)
  (call,) = fakes.calls()
  assert call[0] == 'sbatch'
  script = Path(call[1]).read_text()
  assert script.startswith('#!/bin/bash\n') and '#SBATCH --nodes=2' in script
  assert script.rstrip('\n').endswith('exit "${status}"')


# --- local -------------------------------------------------------------------------------------


@pytest.fixture
def probe(tmp_path):
  """(extra env, out dir) for running the probe module as the `local` entrypoint."""
  modules = tmp_path / 'modules'
  modules.mkdir()
  (modules / 'launch_probe.py').write_text(PROBE)
  out = tmp_path / 'out'
  out.mkdir()
  return {'PYTHONPATH': str(modules), 'PYTHON': sys.executable}, out


def read_env(out, index):
  return json.loads((out / f'env_{index}.json').read_text())


def test_local_processes_form_one_job(fakes, probe, tmp_path):
  env, out = probe
  env['XLA_FLAGS'] = '--xla_cpu_use_thunk_runtime=false --xla_force_host_platform_device_count=8'
  logs = tmp_path / 'logs'
  result = ok(fakes.launch('local', '2', '--devices-per-process', '3', '--module', 'launch_probe',
                           '--log-dir', str(logs), '--', f'out={out}', env=env))
  seen = [read_env(out, index) for index in range(2)]
  address = seen[0]['JAX_COORDINATOR_ADDRESS']
  assert re.fullmatch(r'localhost:\d+', address)
  for index, report in enumerate(seen):
    assert report['JAX_PROCESS_ID'] == str(index)
    assert report['JAX_NUM_PROCESSES'] == '2'
    assert report['JAX_COORDINATOR_ADDRESS'] == address
    assert report['JAX_PLATFORMS'] == 'cpu'
    assert report['XLA_FLAGS'] == ('--xla_cpu_use_thunk_runtime=false '
                                   '--xla_force_host_platform_device_count=3')
  lines = result.stdout.splitlines()
  assert 'process 0 of 2 says hello' in lines
  assert '[process 1] process 1 of 2 says hello' in lines
  assert '[process 1] process 1 writes to stderr' in lines
  assert 'process 0 writes to stderr' in lines  # With --log-dir, through the log's pipe.
  for index in range(2):
    assert (logs / f'process_{index}.log').read_text().splitlines() == [
        f'process {index} of 2 says hello', f'process {index} writes to stderr']


def test_local_failure_kills_the_others(fakes, probe):
  env, out = probe
  start = time.time()
  result = fakes.launch('local', '2', '--port', '23456', '--module',
                        'launch_probe', '--', f'out={out}', 'sleep0=60', 'sleep1=1', 'code1=3',
                        env=env)
  elapsed = time.time() - start
  assert result.returncode == 3, result
  assert elapsed < 10
  assert 'process 1 failed with exit code 3' in result.stderr
  # Process 0's stderr is merged into its stdout, which passes through `sed -u` line by line.
  assert 'process 0 writes to stderr' in result.stdout.splitlines()
  assert '[process 1] process 1 of 2 says hello' in result.stdout.splitlines()
  assert 'localhost:23456' in result.stdout + result.stderr
  pid0 = read_env(out, 0)['pid']

  def gone():
    try:
      os.kill(pid0, 0)
    except ProcessLookupError:
      return True
    return False

  wait_for(gone, 'process 0 to be killed', timeout=5)


@pytest.mark.parametrize('how', ['SIGTERM to launch.sh', 'Ctrl-C'])
def test_local_signal_reaches_every_process_once(fakes, probe, how):
  env, out = probe
  # A shell puts SIGINT on ignore for what it starts in the background (POSIX), and bash cannot
  # trap a signal ignored on entry: a suite started with `cmd &` would see no Ctrl-C at all.
  # `env --default-signal` (coreutils, exec, same pid) gives the launcher a terminal's default.
  launcher = subprocess.Popen(
      ['env', '--default-signal=INT', str(LAUNCH), 'local', '2', '--module', 'launch_probe',
       '--', f'out={out}', 'trap=1', 'sleep0=30', 'sleep1=30'], env={**fakes.env, **env},
      cwd=fakes.tmp,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    wait_for(lambda: all((out / f'env_{i}.json').exists() for i in range(2)), 'the processes')
    if how == 'Ctrl-C':  # The terminal signals the whole foreground process group.
      os.killpg(launcher.pid, signal.SIGINT)
    else:
      launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=15)
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode == 0, stderr
  for index in range(2):
    assert (out / f'signals_{index}.txt').read_text() == 'SIGTERM\n'
    assert read_env(out, index)['pgrp'] != launcher.pid  # Own process group.
  assert 'sending SIGTERM to the processes' in stderr


def test_local_dry_run_prints_the_commands(fakes, probe):
  env, out = probe
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  result = ok(fakes.launch('--dry-run', 'local', '2', '--port', '12345', '--module',
                           'launch_probe', '--', f'out={out}', 'note=two words', env=env))
  lines = result.stdout.splitlines()
  assert len(lines) == 2
  for index, line in enumerate(lines):
    assert line == (
        f'env JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4 '
        f'JAX_COORDINATOR_ADDRESS=localhost:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={index} '
        f'PYTHONUNBUFFERED=1 {sys.executable} -m launch_probe out={out} note=two\\ words')
  assert list(out.iterdir()) == []
