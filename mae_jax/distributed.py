"""Multi-process start-up and the rules that keep many hosts from hanging on one host's error.

How a run becomes one JAX job over several processes (:func:`initialize`, called first thing
by every entrypoint):

* explicit: ``--coordinator_address``, ``--num_processes``, ``--process_id`` flags, or the
  environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
  (what ``launch.sh local N`` sets);
* detected: SLURM (``SLURM_JOB_ID`` and ``SLURM_NTASKS`` > 1) and multi-host Cloud TPU VMs,
  which JAX's own cluster detection configures;
* otherwise a single process, with no coordinator.

``--distributed=on|off`` forces or forbids the multi-process path.

Failure rules. A collective waits for every process, so one host that raises while the others
wait would hang the job (and JAX's shutdown barrier waits for the others on exit, up to five
minutes). Hence:

* errors every host can see (config, dataset metadata) are raised by every host alike;
* errors only one host can see at start-up go through :func:`agree`, so all hosts raise;
* errors during training travel in the batch (``mae_jax.trainers.pretrain``), so all hosts stop at the same
  step;
* anything else: :func:`exit_on_error` prints the traceback and leaves at once with
  ``os._exit(1)``, skipping the shutdown barrier. The other processes learn of it from the
  coordination service within ``--heartbeat_timeout_seconds`` and abort with a message naming
  the dead process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from typing import Callable, Iterator, TypeVar

import jax
import numpy as np
from absl import flags

_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'Multi-process JAX: auto = when a coordinator is given (flags or JAX_* variables) or SLURM / '
    'a multi-host Cloud TPU is detected; on = always call jax.distributed.initialize(); off = '
    'never.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, or '
    'detected on SLURM / Cloud TPU).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the job (default: $JAX_NUM_PROCESSES or detected).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0..num_processes-1 (default: $JAX_PROCESS_ID or detected).')
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds', 60, 'Seconds after which a silent process counts as dead and '
    'the others abort instead of waiting for it.')

T = TypeVar('T')


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r} is not an integer') from None


def _cluster_detected() -> bool:
  """Whether the environment is a multi-process cluster JAX configures by itself."""
  if 'SLURM_JOB_ID' in os.environ and (_env_int('SLURM_NTASKS') or 1) > 1:
    return True
  # Cloud TPU VMs list their workers; one name means a single-host slice.
  workers = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([w for w in workers.split(',') if w]) > 1


def settings() -> dict[str, object]:
  """The explicit coordinator settings (flags first, then environment), None where unset."""
  return {
      'coordinator_address': _COORDINATOR.value or os.environ.get('JAX_COORDINATOR_ADDRESS') or None,
      'num_processes': (_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None
                        else _env_int('JAX_NUM_PROCESSES')),
      'process_id': (_PROCESS_ID.value if _PROCESS_ID.value is not None
                     else _env_int('JAX_PROCESS_ID')),
  }


def initialize() -> bool:
  """Joins the multi-process job the flags or environment describe; returns whether it did.

  Must run before anything asks JAX for its devices.
  """
  mode = _DISTRIBUTED.value
  explicit = settings()
  wanted = mode == 'on' or (mode == 'auto' and (explicit['coordinator_address'] is not None
                                                or _cluster_detected()))
  if not wanted:
    return False
  given = {k: v for k, v in explicit.items() if v is not None}
  if given.get('coordinator_address') and len(given) != 3:
    missing = sorted(set(explicit) - set(given))
    raise ValueError(f'a coordinator address is set but not {", ".join(missing)}: pass '
                     '--num_processes and --process_id (or JAX_NUM_PROCESSES, JAX_PROCESS_ID)')
  # Stopping on SIGTERM is agreed through the training step (mae_jax.trainers.pretrain); JAX's preemption
  # service would install its own SIGTERM handler, so it is off.
  jax.config.update('jax_enable_preemption_service', False)
  jax.distributed.initialize(heartbeat_timeout_seconds=_HEARTBEAT.value, **given)
  return True


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def agree(check: Callable[[], T], what: str) -> T:
  """Runs ``check`` on every process; if it raised on any, raises on all.

  The process whose check failed re-raises its own exception; the others raise a RuntimeError
  naming the failed processes, so no process goes on to wait in a collective for a host that
  has given up. With one process this is just ``check()``.
  """
  if not is_multiprocess():
    return check()
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error = None
  result = None
  try:
    result = check()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
  if error is not None:
    raise error
  if failed.any():
    raise RuntimeError(f'{what} failed on process(es) {np.flatnonzero(failed).tolist()}; their '
                       'logs give the reason')
  return result


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
  """In a multi-process job, turns an uncaught exception into an immediate ``os._exit(1)``.

  A normal exit would wait in JAX's shutdown barrier for the other processes, which may be
  waiting in a collective for this one: both would hang until a timeout. Exiting at once lets
  the coordination service tell the others within the heartbeat timeout.
  """
  try:
    yield
  except BaseException as e:  # pylint: disable=broad-except
    if not is_multiprocess() or isinstance(e, SystemExit) and not e.code:
      raise
    traceback.print_exc()
    print(f'process {jax.process_index()} of {jax.process_count()} failed: {e}', file=sys.stderr,
          flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access
