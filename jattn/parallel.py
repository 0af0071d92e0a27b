"""How the step math is mapped over folds and spread over devices and processes.

`train.train_step` and `train.eval_step` stay single-fold, single-device functions. This module
decides how they run:

  plan = parallel.make_plan(config)          # a mesh over the devices; K = config.parallel_folds
  state = parallel.place(plan, parallel.stack(plan, fold_states))
  step = parallel.train_step(plan, one_fold_step)  # jitted; vmapped over folds when K > 1
  state, metrics = step(state, parallel.batch(plan, fold_batches, batch_size), train_rng, active)

- Folds: with K > 1 the K folds' train states are stacked along a leading axis and the step is
  `jax.vmap`ped over it; a fold that has finished (`active` False) keeps its state. With K = 1 the
  step is the plain one, so a single fold computes exactly what it always did.
- Devices: one `jax.sharding.Mesh` with a `data` axis; batches are sharded along it (the fold
  axis is not), the train state is replicated, and XLA inserts the reductions (no pmap).
- Processes: after `initialize_distributed()`, the mesh spans every process' devices; each
  process loads only its rows of every global batch (`process_rows`) and the global array is
  assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn.errors import UserError

DATA_AXIS = "data"


def initialize_distributed() -> bool:
  """Starts JAX's multi-controller runtime when launched as several processes; True if it did.

  Detects SLURM (more than one task), Open MPI (more than one rank) and the variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Must run before anything touches
  the devices.
  """
  env = os.environ
  if "JAX_COORDINATOR_ADDRESS" in env:
    kwargs = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if name in env:
        try:
          kwargs[key] = int(env[name])
        except ValueError:
          raise UserError(f"{name}={env[name]!r}: must be an integer") from None
    if "process_id" in kwargs and not 0 <= kwargs["process_id"] < kwargs.get("num_processes", 1):
      raise UserError(f"JAX_PROCESS_ID={kwargs['process_id']} is outside 0..JAX_NUM_PROCESSES-1 "
                      f"({kwargs.get('num_processes')})")
    _initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], **kwargs)
    if kwargs.get("num_processes", jax.process_count()) != jax.process_count():
      raise UserError(f"JAX_NUM_PROCESSES={kwargs['num_processes']}, but the coordinator at "
                      f"{env['JAX_COORDINATOR_ADDRESS']} runs {jax.process_count()} processes; "
                      f"start every process with the same JAX_NUM_PROCESSES")
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    _initialize()
    return True
  return False


def _initialize(**kwargs) -> None:
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # the runtime's errors are long C++ traces; the cause is the launch
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"jax.distributed.initialize({args}) failed: {first}; check that every "
                    f"process got the same coordinator address and process count") from None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where a run's steps execute: K folds in one program over a mesh of devices."""

  mesh: Mesh
  num_folds: int

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def train_batch(self) -> NamedSharding:
    """Training batches: [B, ...], or [K, B, ...] with the fold axis not sharded."""
    return NamedSharding(self.mesh, P(DATA_AXIS) if self.num_folds == 1 else P(None, DATA_AXIS))

  @property
  def eval_batch(self) -> NamedSharding:
    """Test batches of one fold: [B, ...]."""
    return NamedSharding(self.mesh, P(DATA_AXIS))

  def eval_batch_size(self, eval_batch_size: int) -> int:
    """`eval_batch_size` rounded up to a multiple of the device count (padding rows are masked)."""
    return -(-eval_batch_size // self.num_devices) * self.num_devices


def make_mesh(num_devices: int = 0) -> Mesh:
  """A one-axis (`data`) mesh over the first `num_devices` devices of every process (0: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices % jax.process_count():
      raise UserError(f"--config.num_devices={num_devices} does not divide among "
                      f"{jax.process_count()} processes")
    per_process = num_devices // jax.process_count()
    local = [d for d in devices if d.process_index == jax.process_index()]
    if per_process > len(local):
      raise UserError(f"--config.num_devices={num_devices}: only {len(devices)} devices are "
                      f"available ({jax.process_count()} process(es)); use 0 for all")
    devices = [d for p in range(jax.process_count())
               for d in [d for d in devices if d.process_index == p][:per_process]]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def make_plan(config) -> Plan:
  """The plan of a run: its mesh and parallel folds, after checking that the batch divides."""
  mesh = make_mesh(config.get("num_devices", 0))
  if config.batch_size % mesh.size:
    raise UserError(f"--config.batch_size={config.batch_size} does not divide by the {mesh.size} "
                    f"devices; use a multiple of {mesh.size} (it is the global batch)")
  return Plan(mesh=mesh, num_folds=config.get("parallel_folds", 1))


# --------------------------------------------------------------------------------------------
# Train states of several folds.


def stack(plan: Plan, states: Sequence[Any]) -> Any:
  """One state for the plan: the fold's own state when K = 1, else leaves stacked on axis 0."""
  if len(states) != plan.num_folds:
    raise ValueError(f"{len(states)} states for {plan.num_folds} folds")
  return states[0] if plan.num_folds == 1 else stack_folds(states)


def stack_folds(states: Sequence[Any]) -> Any:
  """States of the same structure stacked leaf by leaf along a new leading (fold) axis; static
  fields (apply_fn, tx) are the first state's."""
  leaves = [jax.tree_util.tree_leaves(s) for s in states]
  stacked = [jnp.stack(xs) for xs in zip(*leaves, strict=True)]
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(states[0]), stacked)


def unstack(plan: Plan, state: Any, fold: int) -> Any:
  """The state of the plan's `fold`-th fold (0-based), as a separate run would hold it."""
  if plan.num_folds == 1:
    return state
  return jax.tree_util.tree_map(lambda x: x[fold], state)


def place(plan: Plan, tree: Any) -> Any:
  """`tree` (a train state, a key) replicated over the plan's mesh, in every process."""
  sharding = plan.replicated
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(x):
    x = jnp.asarray(x)  # also Python numbers, as device_put takes them
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


# --------------------------------------------------------------------------------------------
# Batches.


def process_rows(plan: Plan) -> tuple[int, int]:
  """(index, count): this process loads rows index/count of every global batch."""
  del plan
  return jax.process_index(), jax.process_count()


def _global(sharding: NamedSharding, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, global_shape)


def batch(plan: Plan, fold_batches: Sequence[Mapping[str, np.ndarray] | None],
          batch_size: int) -> dict[str, jax.Array]:
  """The global training batch of one step from each fold's (process-local) batch.

  A fold that has finished passes None and gets zeros, which its masked step ignores.
  """
  template = next(b for b in fold_batches if b is not None)
  rows = batch_size // process_rows(plan)[1]
  out = {}
  for key, value in template.items():
    if plan.num_folds == 1:
      local = np.asarray(value)
      global_shape = (batch_size,) + local.shape[1:]
    else:
      local = np.stack([np.zeros_like(value) if b is None else np.asarray(b[key])
                        for b in fold_batches])
      global_shape = (plan.num_folds, batch_size) + local.shape[2:]
    if local.shape[plan.num_folds > 1] != rows:
      raise ValueError(f"batch {key!r} has {local.shape} rows here, expected {rows}")
    out[key] = _global(plan.train_batch, local, global_shape)
  return out


def eval_images(plan: Plan, images: np.ndarray, batch_size: int) -> jax.Array:
  """The global test batch of images from this process' rows."""
  return _global(plan.eval_batch, np.asarray(images), (batch_size,) + images.shape[1:])


# --------------------------------------------------------------------------------------------
# Steps.


def _masked(step_fn: Callable) -> Callable:
  """`step_fn` that keeps the old state where its fold is not `active`."""
  def step(state, batch, rng, active):
    new_state, metrics = step_fn(state, batch, rng)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(active, new, old), new_state,
                                       state)
    return new_state, metrics

  return step


def fold_train_step(step_fn: Callable, mesh: Mesh | None = None, donate: bool = True) -> Callable:
  """K folds' `step_fn` in one jitted program, vmapped over stacked states.

  `step_fn(state, batch, rng) -> (state, metrics)` is one fold's step, e.g.
  `functools.partial(train.train_step, augment=config.augment.to_dict())`. The result is
  `(state[K], batch[K, B, ...], train_rng, active bool[K]) -> (state[K], metrics[K])`: fold k
  steps with `jax.random.fold_in(train_rng, state.step[k])`, the rng its separate run uses, and
  folds with `active[k]` False keep their state. With a mesh, the batch axis B is sharded over its
  `data` axis and everything else replicated. The state is donated unless `donate=False`.
  """
  masked = jax.vmap(_masked(step_fn))

  def step(state, batch, train_rng, active):
    rngs = jax.vmap(lambda s: jax.random.fold_in(train_rng, s))(state.step)
    return masked(state, batch, rngs, active)

  kwargs = {"donate_argnums": (0,)} if donate else {}
  if mesh is None:
    return jax.jit(step, **kwargs)
  plan = Plan(mesh=mesh, num_folds=2)  # the shardings of any K > 1
  return jax.jit(step, in_shardings=(plan.replicated, plan.train_batch, plan.replicated,
                                     plan.replicated),
                 out_shardings=(plan.replicated, plan.replicated), **kwargs)


def train_step(plan: Plan, step_fn: Callable) -> Callable:
  """The plan's jitted step: (state, batch, train_rng, active) -> (state, metrics).

  K = 1: `step_fn` itself with rng `fold_in(train_rng, state.step)` (`active` is not used: a
  single fold that has finished is not stepped). K > 1: `fold_train_step`.
  """
  if plan.num_folds > 1:
    return fold_train_step(step_fn, plan.mesh)

  def step(state, batch, train_rng):
    return step_fn(state, batch, jax.random.fold_in(train_rng, state.step))

  jitted = jax.jit(step, in_shardings=(plan.replicated, plan.train_batch, plan.replicated),
                   out_shardings=(plan.replicated, plan.replicated), donate_argnums=(0,))
  return lambda state, batch, train_rng, active: jitted(state, batch, train_rng)


def eval_step(plan: Plan, eval_fn: Callable) -> Callable:
  """`eval_fn(state, batch)` of one fold, jitted on a sharded test batch; its output replicated."""
  return jax.jit(eval_fn, in_shardings=(plan.replicated, plan.eval_batch),
                 out_shardings=plan.replicated)


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every leaf of `tree` is finite (one scalar; several folds are checked together)."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)]))
