"""Device mesh and logical-axis sharding: sharding is configuration, not code.

The mesh always has the axes ``data``, ``fsdp`` and ``tensor`` (in that order, slowest-varying
first, so ``tensor`` neighbours share the fastest links). Their sizes come from
``config.mesh``; one size may be -1 and takes the remaining devices. For multi-slice pods,
``config.mesh.dcn_*`` sizes split each axis across slices (data-centre network) as well.
Model code names logical axes only; ``config.logical_rules`` maps them onto the mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
# The global batch is split over every axis that holds distinct examples.
BATCH_AXES = ('data', 'fsdp')


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int, prefix: str = 'mesh') -> list[int]:
  """Fills a -1 axis size so the product equals ``num_devices``; errors name the field."""
  values = [int(sizes[axis]) for axis in MESH_AXES]
  for axis, value in zip(MESH_AXES, values):
    if value == 0 or value < -1:
      raise ValueError(f'config.{prefix}.{axis} must be a positive size or -1, got {value}')
  if values.count(-1) > 1:
    raise ValueError(f'config.{prefix}: at most one axis may be -1, got {dict(zip(MESH_AXES, values))}')
  known = math.prod(v for v in values if v != -1)
  if -1 in values:
    if num_devices % known:
      raise ValueError(f'config.{prefix}: {num_devices} devices cannot be split into '
                       f'{dict(zip(MESH_AXES, values))}: {num_devices} is not divisible by {known}')
    values[values.index(-1)] = num_devices // known
  if math.prod(values) != num_devices:
    raise ValueError(f'config.{prefix} {dict(zip(MESH_AXES, values))} uses {math.prod(values)} '
                     f'devices but {num_devices} are available')
  return values


def create_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh from ``config.mesh``."""
  devices = list(devices if devices is not None else jax.devices())
  wanted = mesh_config.num_devices
  if wanted:
    if wanted > len(devices):
      raise ValueError(f'config.mesh.num_devices={wanted} but only {len(devices)} devices exist')
    devices = devices[:wanted]
  dcn = {axis: mesh_config.get(f'dcn_{axis}', 1) for axis in MESH_AXES}
  num_slices = math.prod(dcn.values())
  if len(devices) % num_slices:
    raise ValueError(f'config.mesh.dcn_*: {len(devices)} devices do not split into '
                     f'{num_slices} slices')
  ici = resolve_axis_sizes({a: mesh_config[a] for a in MESH_AXES}, len(devices) // num_slices)
  if num_slices > 1:
    dcn_sizes = [dcn[a] for a in MESH_AXES]
    device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn_sizes, devices)
  else:
    device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  # Mesh() built directly has Auto axes, which logical-rule sharding needs.
  return Mesh(device_array, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def rules_from_config(rules: Sequence[Sequence[Any]]) -> tuple[tuple[str, Any], ...]:
  """Turns config rules (lists from JSON or tuples) into flax's rule tuples."""
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'config.logical_rules: each rule is (logical, mesh axes), got {rule!r}')
    logical, mesh_axes = rule
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    for axis in (mesh_axes if isinstance(mesh_axes, tuple) else (mesh_axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f'config.logical_rules: {logical!r} maps to unknown mesh axis {axis!r}')
    out.append((logical, mesh_axes))
  return tuple(out)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
  """Maps a pytree of logical PartitionSpecs to NamedShardings on ``mesh``."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def describe(tree: Any) -> dict[str, str]:
  """'path: shape @ spec' for every array of a sharded pytree (for logs and tests)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in flat:
    spec = getattr(getattr(leaf, 'sharding', None), 'spec', None)
    out[jax.tree_util.keystr(path)] = f'{tuple(np.shape(leaf))} @ {spec}'
  return out
