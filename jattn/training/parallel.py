"""How the step math is mapped over folds and spread over devices and processes.

`train.train_step` and `state.eval_step` stay single-fold, single-device functions. This module
decides how they run:

  plan = parallel.make_plan(config)          # a mesh over the devices; K = config.parallel_folds
  state = parallel.place(plan, parallel.stack(plan, fold_states))
  step = parallel.train_step(plan, one_fold_step)  # jitted; vmapped over folds when K > 1
  state, metrics = step(state, parallel.batch(plan, fold_batches, batch_size), train_rng, active)

- Folds: with K > 1 the K folds' train states are stacked along a leading axis and the step is
  `jax.vmap`ped over it; a fold that has finished (`active` False) keeps its state. With K = 1 the
  step is the plain one, so a single fold computes exactly what it always did.
- Steps: `train_steps` runs n steps in one dispatch, a `lax.scan` of the same step over n stacked
  batches (`batches`), for `config.steps_per_dispatch`.
- Devices: one `jax.sharding.Mesh` with a `data` axis; batches are sharded along it (the fold
  axis is not), the train state is replicated, and XLA inserts the reductions (no pmap).
- Processes: after `initialize_distributed()`, the mesh spans every process' devices; each
  process loads only its rows of every global batch (`process_rows`) and the global array is
  assembled with `jax.make_array_from_process_local_data`. The processes first meet in a
  rendezvous of jattn's own (bounded, one line when it fails), and `sync` barriers carry a
  process's failure (`telling_peers`) to the others, so that a launch that cannot run ends in
  one line on every process rather than in JAX's aborts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import clusters, distributed
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jattn.core.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(timeout_s: float = 300.0, agree_on: Mapping[str, Any] | None = None
                           ) -> bool:
  """Starts JAX's multi-controller runtime when launched as several processes; True if it did.

  Detects SLURM (more than one task), Open MPI (more than one rank) and the variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Must run before anything touches
  the devices. First every process meets the others in `rendezvous` on the coordinator's address,
  so that a process that never starts, a wrong process count or a different `agree_on` (the
  config) is one line on every process after at most `timeout_s` seconds, and
  `jax.distributed.initialize` (whose own timeout aborts the process in C++) starts only once all
  are there.
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
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    kwargs = _detect_cluster(timeout_s)
  else:
    return False
  if not timeout_s > 0:
    raise UserError(f"--config.coordinator_timeout_s={timeout_s!r}: a number of seconds > 0")
  if {"coordinator_address", "num_processes", "process_id"} <= set(kwargs):
    rendezvous(kwargs["coordinator_address"], kwargs["num_processes"], kwargs["process_id"],
               timeout_s, agree_on or {})
  # Everyone is there: initialize's own wait is short. Its timeout stays above ours regardless.
  _initialize(initialization_timeout=max(60, int(timeout_s) + 30), **kwargs)
  if kwargs.get("num_processes", jax.process_count()) != jax.process_count():
    raise UserError(f"JAX_NUM_PROCESSES={kwargs['num_processes']}, but the coordinator at "
                    f"{kwargs['coordinator_address']} runs {jax.process_count()} processes; "
                    f"start every process with the same JAX_NUM_PROCESSES")
  return True


def _detect_cluster(timeout_s: float) -> dict[str, Any]:
  """The coordinator address, process count and id JAX would detect under SLURM or Open MPI
  (through JAX's own cluster detection, a private module: {} if it is not there)."""
  try:
    address, count, index, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, int(timeout_s))
  except Exception:  # noqa: BLE001 -- then jax.distributed.initialize() detects it itself
    return {}
  found = {"coordinator_address": address, "num_processes": count, "process_id": index,
           "local_device_ids": local_ids}
  return {k: v for k, v in found.items() if v is not None}


def _initialize(**kwargs) -> None:
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # the runtime's errors are long C++ traces; the cause is the launch
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if k != "initialization_timeout")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"jax.distributed.initialize({args}) failed: {first}; check that every "
                    f"process got the same coordinator address and process count") from None


# --------------------------------------------------------------------------------------------
# The rendezvous before jax.distributed.initialize.


def _host_port(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise UserError(f"coordinator address {address!r}: expected HOST:PORT "
                    f"(JAX_COORDINATOR_ADDRESS)")
  return host.strip("[]"), int(port)


def _send(conn: socket.socket, message: Mapping[str, Any]) -> None:
  with contextlib.suppress(OSError):  # a peer that has gone learns nothing; it has stopped
    conn.sendall((json.dumps(message) + "\n").encode())


def _receive(conn: socket.socket, deadline: float) -> dict | None:
  """One JSON line from `conn` before `deadline`; None if the peer closed or time ran out."""
  data = b""
  while not data.endswith(b"\n"):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return None
    conn.settimeout(remaining)
    try:
      chunk = conn.recv(65536)
    except (TimeoutError, OSError):
      return None
    if not chunk:
      return None
    data += chunk
  try:
    return json.loads(data)
  except ValueError:
    return None


def _differing(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
  keys = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    if isinstance(x, Mapping) and isinstance(y, Mapping):
      keys += _differing(x, y, f"{prefix}{key}.")
    elif x != y:
      keys.append(prefix + key)
  return keys


def rendezvous(address: str, num_processes: int, process_id: int, timeout_s: float,
               agree_on: Mapping[str, Any]) -> None:
  """Waits, at most `timeout_s` seconds, until all `num_processes` processes have met on
  `address` (HOST:PORT, the coordinator's) with the same process count and `agree_on`.

  Process 0 listens on the coordinator's port (closed again before `jax.distributed.initialize`
  binds it) and every other process connects, retrying until process 0 is up. Process 0 answers
  everyone once all are there, or tells the connected ones what went wrong; every process that
  fails raises a one-line `UserError` naming who was waited for where.
  """
  if num_processes <= 1:
    return
  deadline = time.monotonic() + timeout_s
  hint = "(--config.coordinator_timeout_s)"
  if process_id == 0:
    _rendezvous_coordinator(address, num_processes, deadline, timeout_s, agree_on, hint)
    return
  host, port = _host_port(address)
  print(f"jattn: process {process_id} of {num_processes}: waiting up to {timeout_s:g} s for "
        f"process 0 (the coordinator) at {address}", flush=True)
  hello = {"process_id": process_id, "num_processes": num_processes, "agree_on": agree_on}
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise UserError(f"process {process_id} of {num_processes}: process 0 (the coordinator) did "
                      f"not answer at {address} within {timeout_s:g} s {hint}; start it with "
                      f"JAX_COORDINATOR_ADDRESS={address} JAX_PROCESS_ID=0, or check the address")
    try:
      conn = socket.create_connection((host, port), timeout=min(remaining, 5.0))
    except OSError:  # not listening yet
      time.sleep(min(0.1, remaining))
      continue
    with conn:
      _send(conn, hello)
      # Process 0 answers by its own deadline, which may come a little after ours.
      answer = _receive(conn, deadline + 10.0)
    if answer is None and time.monotonic() < deadline:
      continue  # the port closed on us before an answer: process 0 restarted; connect again
    if answer is None:
      raise UserError(f"process {process_id} of {num_processes}: process 0 (the coordinator) at "
                      f"{address} was still waiting for the other processes after {timeout_s:g} "
                      f"s {hint}; start every process with JAX_COORDINATOR_ADDRESS={address} "
                      f"JAX_NUM_PROCESSES={num_processes}")
    if "error" in answer:
      raise UserError(answer["error"])
    return


def _rendezvous_coordinator(address, num_processes, deadline, timeout_s, agree_on, hint) -> None:
  _, port = _host_port(address)
  bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "")
  bind_host = _host_port(bind)[0] if bind else ""
  try:
    if not bind_host and socket.has_dualstack_ipv6():
      server = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    else:
      server = socket.create_server((bind_host, port))
  except OSError as e:
    raise UserError(f"process 0 (the coordinator) cannot listen on port {port} of {address} "
                    f"({e.strerror}); choose a free port in JAX_COORDINATOR_ADDRESS for every "
                    f"process") from None
  joined: set[int] = set()
  conns: list[socket.socket] = []

  def fail(message: str) -> None:
    for conn in conns:
      _send(conn, {"error": message})
      conn.close()
    raise UserError(message)

  waiting = ", ".join(str(i) for i in range(1, num_processes))
  print(f"jattn: process 0 of {num_processes} (the coordinator): waiting up to {timeout_s:g} s "
        f"at {address} for process(es) {waiting}", flush=True)
  with server:
    while len(joined) < num_processes - 1:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        missing = [str(i) for i in range(1, num_processes) if i not in joined]
        fail(f"process(es) {', '.join(missing)} of {num_processes} did not join process 0 (the "
             f"coordinator) at {address} within {timeout_s:g} s {hint}; start every process "
             f"with JAX_COORDINATOR_ADDRESS={address} JAX_NUM_PROCESSES={num_processes} and its "
             f"own JAX_PROCESS_ID")
      server.settimeout(remaining)
      try:
        conn, _ = server.accept()
      except OSError:  # the timeout: the deadline is checked above
        continue
      hello = _receive(conn, min(deadline, time.monotonic() + 10.0))
      if not isinstance(hello, dict) or "process_id" not in hello:
        conn.close()  # not one of ours (a port scanner, a stray client)
        continue
      conns.append(conn)
      index, count = hello.get("process_id"), hello.get("num_processes")
      if count != num_processes:
        fail(f"JAX_NUM_PROCESSES={count}, but the coordinator at {address} runs "
             f"{num_processes} processes; start every process with the same JAX_NUM_PROCESSES")
      if index in joined or not isinstance(index, int) or not 0 < index < num_processes:
        fail(f"two processes were started with JAX_PROCESS_ID={index}; give each of the "
             f"{num_processes} processes its own id, 0 to {num_processes - 1}")
      differ = [k.removeprefix("config.")
                for k in _differing(agree_on, hello.get("agree_on") or {})]
      if differ:
        fail(f"process {index} was started with another config than process 0 (fields: "
             f"{', '.join(differ)}); start every process with the same command")
      joined.add(index)
    for conn in conns:
      _send(conn, {"ok": True})
    for conn in conns:  # let each close first, so that the port is free for JAX at once
      _receive(conn, time.monotonic() + 2.0)
      conn.close()


# --------------------------------------------------------------------------------------------
# After the start: barriers that carry a process's failure to the others.

_FAILED = "jattn/failed"  # the key-value store key of the first process that stopped
_barriers = itertools.count(1)  # every process passes the same barriers in the same order


class PeerFailed(UserError):
  """Another process of the run stopped; its message says which and why."""


def _client():
  return distributed.global_state.client


def sync(name: str) -> None:
  """Waits for every process at barrier `name` (nothing in a one-process run).

  If a process stopped before reaching it (`telling_peers`), every waiting process stops with one
  line naming that process and its error, instead of waiting in a collective until JAX's
  heartbeat aborts them all with C++ traces.
  """
  if jax.process_count() == 1:
    return
  client = _client()
  prefix = f"jattn/sync/{next(_barriers)}"
  client.key_value_set(f"{prefix}/{jax.process_index()}", name)
  for index in range(jax.process_count()):
    while True:
      asked = time.monotonic()
      try:
        client.blocking_key_value_get(f"{prefix}/{index}", 500)
        break
      except Exception:  # noqa: BLE001 -- the runtime's timeout: look for a failure, wait on
        failure = _peer_failure(client)
        if failure:
          raise PeerFailed(failure) from None
        time.sleep(max(0.0, 0.5 - (time.monotonic() - asked)))  # no spinning on a dead service


def _peer_failure(client) -> str | None:
  try:
    return client.key_value_try_get(_FAILED)
  except Exception:  # noqa: BLE001 -- not found: nobody has stopped
    return None


@contextlib.contextmanager
def telling_peers():
  """Within this block, an exception that stops this process of a multi-process run is first
  recorded for the other processes, whose next `sync` then stops them with one line."""
  try:
    yield
  except PeerFailed:
    raise
  except BaseException as e:
    if jax.process_count() > 1 and not isinstance(e, KeyboardInterrupt):
      text = " ".join(str(e).split())[:500] or type(e).__name__
      why = text if isinstance(e, UserError) else f"{type(e).__name__}: {text}"
      with contextlib.suppress(Exception):  # the first failure is kept, later ones dropped
        _client().key_value_set(_FAILED, f"process {jax.process_index()} of "
                                         f"{jax.process_count()} stopped: {why}")
    raise


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
  def train_batches(self) -> NamedSharding:
    """The training batches of n steps stacked: [n, B, ...], or [n, K, B, ...]."""
    return NamedSharding(self.mesh, P(None, DATA_AXIS) if self.num_folds == 1
                         else P(None, None, DATA_AXIS))

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


# The parts of a layout that change a run's arithmetic (the order of its reductions, its
# precision): a resume that changes one of them continues correctly, but not bit-identically.
ARITHMETIC = ("platform", "device_kind", "devices", "processes", "parallel_folds", "position",
              "dtype", "steps_per_dispatch")
# What a layout recorded before a part of it was: steps_per_dispatch came later, and was 1.
LAYOUT_DEFAULTS = {"steps_per_dispatch": 1}


def layout(plan: Plan, position: int, num_devices: int, dtype: str,
           steps_per_dispatch: int = 1) -> dict[str, Any]:
  """How the plan lays out the fold at `position` (0-based) of its group, for results.json:
  the devices of the mesh (names, platform, kind), processes, folds in one program and this
  fold's place among them (1-based), the num_devices setting, the computation dtype and the
  steps run in one dispatch."""
  devices = list(plan.mesh.devices.flat)
  return {"devices": [str(d) for d in devices], "platform": devices[0].platform,
          "device_kind": devices[0].device_kind, "num_devices": num_devices,
          "processes": jax.process_count(), "parallel_folds": plan.num_folds,
          "position": position + 1, "dtype": dtype, "steps_per_dispatch": steps_per_dispatch}


def layout_changes(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """'field old -> new' for each ARITHMETIC part that differs (the device count for devices); a
  part a layout predates counts as its LAYOUT_DEFAULTS value."""
  changes = []
  for key in ARITHMETIC:
    old, new = (x.get(key, LAYOUT_DEFAULTS.get(key)) for x in (before, now))
    if key == "devices":
      old, new = len(old or ()), len(new or ())
    if old != new:
      changes.append(f"{key} {old} -> {new}")
  return changes


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
  return {key: _global(plan.train_batch, local, global_shape)
          for key, (local, global_shape) in _local_batch(plan, fold_batches, batch_size).items()}


def batches(plan: Plan, steps: Sequence[Sequence[Mapping[str, np.ndarray] | None]],
            batch_size: int) -> dict[str, jax.Array]:
  """The global training batches of n steps (each step's fold batches, as `batch` takes them),
  stacked on a leading axis for `train_steps`."""
  locals_ = [_local_batch(plan, fold_batches, batch_size) for fold_batches in steps]
  return {key: _global(plan.train_batches, np.stack([step[key][0] for step in locals_]),
                       (len(steps),) + global_shape)
          for key, (_, global_shape) in locals_[0].items()}


def _local_batch(plan: Plan, fold_batches: Sequence[Mapping[str, np.ndarray] | None],
                 batch_size: int) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
  """{key: (this process' rows of one step's batch, the global batch's shape)}."""
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
    out[key] = (local, global_shape)
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
  step = _folds_body(step_fn)
  kwargs = {"donate_argnums": (0,)} if donate else {}
  if mesh is None:
    return jax.jit(step, **kwargs)
  plan = Plan(mesh=mesh, num_folds=2)  # the shardings of any K > 1
  return jax.jit(step, in_shardings=(plan.replicated, plan.train_batch, plan.replicated,
                                     plan.replicated),
                 out_shardings=(plan.replicated, plan.replicated), **kwargs)


def _folds_body(step_fn: Callable) -> Callable:
  """One step of K folds, unjitted: (state[K], batch[K, B, ...], train_rng, active[K])."""
  masked = jax.vmap(_masked(step_fn))

  def step(state, batch, train_rng, active):
    rngs = jax.vmap(lambda s: jax.random.fold_in(train_rng, s))(state.step)
    return masked(state, batch, rngs, active)

  return step


def step_body(plan: Plan, step_fn: Callable) -> Callable:
  """The plan's step unjitted, (state, batch, train_rng, active) -> (state, metrics): what
  `train_step` jits (one fold: rng `fold_in(train_rng, state.step)`, `active` unused)."""
  if plan.num_folds > 1:
    return _folds_body(step_fn)
  return lambda state, batch, train_rng, active: step_fn(
      state, batch, jax.random.fold_in(train_rng, state.step))


def scan_steps(body: Callable) -> Callable:
  """`body` (a `step_body`) over n stacked batches in one `lax.scan`: (state, batches[n, ...],
  train_rng, active) -> (state, metrics[n, ...]). Each step is the one `body` takes alone, with
  the state's own step counter choosing its rng."""
  def steps(state, batches, train_rng, active):
    return jax.lax.scan(lambda s, batch: body(s, batch, train_rng, active), state, batches)

  return steps


def train_steps(plan: Plan, step_fn: Callable) -> Callable:
  """The plan's jitted program of n steps in one dispatch (`scan_steps`, Keras'
  steps_per_execution): (state, batches [n, ...] from `batches`, train_rng, active) -> (state,
  metrics [n, ...]); compiled once per n. The state is donated.

  On XLA's CPU backend a step inside the scan sums the convolution weight gradients in another
  order than the plain `train_step` (the loop body's convolutions keep autodiff's layout): its
  first step has the plain step's loss and parameters within a hundredth of the learning rate,
  and Adam amplifies the difference in later steps (README, Reproducibility); the same as any
  other scan's step: n steps in chunks of 1, 2 or n are bit-identical (tests/test_dispatch.py)."""
  return jax.jit(scan_steps(step_body(plan, step_fn)),
                 in_shardings=(plan.replicated, plan.train_batches, plan.replicated,
                               plan.replicated),
                 out_shardings=(plan.replicated, plan.replicated), donate_argnums=(0,))


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
