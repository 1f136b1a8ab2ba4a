"""How much device memory a compiled step plans to use, and the remat policy that makes it fit.

Rematerialisation trades compute for memory: with it the backward pass recomputes what the
forward pass did not keep. It is only worth its cost where the step would not fit otherwise,
so ``remat_policy='auto'`` compiles the step without remat first and falls back to cheaper
memory (``dots``, then ``full``) only while XLA's own buffer assignment for the compiled step
(``Compiled.memory_analysis``: arguments + outputs - donated + temporaries) exceeds the
device's memory. That plan is the compiler's, for this backend, batch and mesh, not a formula.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# Fastest first: each saves less for the backward pass and recomputes more.
REMAT_SEARCH = ('none', 'dots', 'full')
# Share of the device's memory a step may plan to use: the allocator also holds the next
# batches (prefetch), the checkpoint copy and fragmentation.
PLAN_HEADROOM = 0.9


def planned_bytes(compiled: Any) -> int | None:
  """XLA's peak memory plan for one call of ``compiled`` per device, or None if not known."""
  try:
    analysis = compiled.memory_analysis()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """Memory the allocator may use on ``device`` (None where the backend does not say: CPUs)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except (AttributeError, NotImplementedError, RuntimeError):
    return None
  return int(stats['bytes_limit']) if stats and stats.get('bytes_limit') else None


def compile_fitting(compile_with: Callable[[str], Any], policy: str,
                    memory_limit: int | None) -> tuple[Any, str, int | None]:
  """Compiles with ``policy``, or for 'auto' with the first of REMAT_SEARCH that fits.

  Args:
    compile_with: remat policy -> the compiled step.
    policy: a remat policy, or 'auto'.
    memory_limit: bytes per device (``device_memory_bytes``); None = everything fits.

  Returns:
    (compiled step, the policy it uses, its planned bytes per device or None).

  Raises:
    MemoryError: for 'auto' when even the last policy's plan does not fit.
  """
  if policy != 'auto':
    compiled = compile_with(policy)
    return compiled, policy, planned_bytes(compiled)
  plans = []
  for candidate in REMAT_SEARCH:
    compiled = compile_with(candidate)
    planned = planned_bytes(compiled)
    if memory_limit is None or planned is None or planned <= PLAN_HEADROOM * memory_limit:
      return compiled, candidate, planned
    plans.append(f'{candidate}: {planned / 1e9:.1f} GB')
  raise MemoryError(
      f"config.model.remat_policy='auto': the step does not fit in "
      f'{PLAN_HEADROOM:.0%} of the {memory_limit / 1e9:.1f} GB of each device with any remat '
      f'policy ({"; ".join(plans)}); lower the batch per device (config.batch_size, or more '
      'config.optim.grad_accum_steps) or shard params and optimiser state (config.mesh.fsdp)')
