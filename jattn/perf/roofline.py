"""A lower bound on a training step's time: its FLOPs at the device's peak compute and the bytes it
must move at the device's memory bandwidth, whichever takes longer.

  jattn benchmark --roofline                 # beside the measured step: the fraction
  jattn benchmark --roofline --peak-tflops 0.4 --peak-gbps 60   # a CPU: give its peaks

The step is counted as a GPU runs it: lowered on the CPU backend with the models' CPU-only paths
off (`jattn.models.cpu_paths`), so that the convolutions are direct ones (on a GPU they are cuDNN
calls that XLA's cost analysis cannot see, and on a CPU the Winograd path does fewer products).

- FLOPs: XLA's cost analysis of that lowered step (`flops`).
- Bytes, assuming every element-wise op is fused into its neighbours: each convolution, matrix
  product, reduction and pooling window reads its operands and writes its result once, each time
  it runs (so an attention matrix such as S-Attn's E', [B, N, N] float32, counts once per
  product, softmax reduction and gradient that touches it); and the optimiser reads each gradient,
  parameter and moment and writes each parameter and moment once (Adam: 7 float32 accesses per
  parameter). Sub-programs (scans, loops, calls) count as often as they run (a loop of unknown
  trip count once).

The bound is max(FLOPs / peak, bytes / bandwidth); the achieved fraction is the bound over the
measured step time. DEVICES holds the data-sheet peaks of common GPUs; for a CPU, or any device
not in it, give --peak-tflops and --peak-gbps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import models
from jattn.models import cpu_paths
from jattn.training import state as state_lib
from jattn.training import train

# Dense (no sparsity) peak TFLOP/s per compute dtype and memory bandwidth (GB/s), matched in order
# against device_kind (so the NVL and PCIe parts before the SXM ones, GH200 before H200). The
# float32 figure of tensor-core GPUs is their TF32 peak: XLA's default precision runs float32 convs
# and matmuls as TF32 there. From NVIDIA's data sheets (SXM parts unless named).
DEVICES = (
    ("H100 NVL", {"float32": 418.0, "bfloat16": 835.0}, 3900.0),
    ("H100 PCIe", {"float32": 378.0, "bfloat16": 756.0}, 2000.0),
    ("H100", {"float32": 495.0, "bfloat16": 989.0}, 3350.0),
    ("GH200", {"float32": 495.0, "bfloat16": 989.0}, 4000.0),
    ("H200 NVL", {"float32": 418.0, "bfloat16": 835.0}, 4800.0),
    ("H200", {"float32": 495.0, "bfloat16": 989.0}, 4800.0),
    ("A100-SXM4-80GB", {"float32": 156.0, "bfloat16": 312.0}, 2039.0),
    ("A100 80GB PCIe", {"float32": 156.0, "bfloat16": 312.0}, 1935.0),
    ("A100", {"float32": 156.0, "bfloat16": 312.0}, 1555.0),  # the 40 GB parts
    ("L40S", {"float32": 183.0, "bfloat16": 362.0}, 864.0),
    ("L40", {"float32": 90.5, "bfloat16": 181.0}, 864.0),
    ("L4", {"float32": 60.0, "bfloat16": 121.0}, 300.0),
    ("A10G", {"float32": 35.0, "bfloat16": 70.0}, 600.0),
    ("A10", {"float32": 62.5, "bfloat16": 125.0}, 600.0),
    ("RTX 4090", {"float32": 82.6, "bfloat16": 165.0}, 1008.0),
    ("RTX 3090", {"float32": 35.6, "bfloat16": 71.0}, 936.0),
    ("V100", {"float32": 15.7}, 900.0),  # no bfloat16 tensor cores
    ("T4", {"float32": 8.1}, 320.0),
)

# Primitives that read their operands from memory and write their result to it (no fusion
# removes them): products, convolutions, reductions, pooling windows, sorts.
MOVES_MEMORY = frozenset({
    "conv_general_dilated", "dot_general", "reduce_window_max", "reduce_window_min",
    "reduce_window_sum", "reduce_window", "select_and_scatter_add", "select_and_gather_add",
    "reduce_max", "reduce_min", "reduce_sum", "reduce_prod", "reduce_and", "reduce_or",
    "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp", "sort"})


def _device(device_kind: str):
  for name, peaks, bandwidth in DEVICES:
    if name.lower() in device_kind.lower():
      return peaks, bandwidth
  return {}, None


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The known dense peak of `device_kind` for `dtype`, or None."""
  return _device(device_kind)[0].get(dtype)


def bandwidth_gbps(device_kind: str) -> float | None:
  """The known memory bandwidth of `device_kind` in GB/s, or None."""
  return _device(device_kind)[1]


def _bytes(aval) -> int:
  shape = getattr(aval, "shape", None)
  dtype = getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:  # PRNG keys and other extended dtypes: not memory traffic worth counting
    return 0
  return int(math.prod(shape)) * itemsize


def _sub_jaxprs(params: dict) -> Iterable[Any]:
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v


def memory_traffic(jaxpr, scopes: Iterable[str] = ()) -> dict[str, Any]:
  """Bytes the memory-moving ops of `jaxpr` (a Jaxpr or ClosedJaxpr) read and write (module doc):
  {'total', 'by_scope': {scope or 'other': bytes}, 'largest': {'shape', 'dtype', 'bytes',
  'touches'}}. An op whose name stack holds one of `scopes` (e.g. 'block3/s_attn') counts under
  it; `largest` is the largest tensor such an op touches and how many times it is touched."""
  scopes = tuple(scopes)
  by_scope: dict[str, int] = {}
  tensors: dict[tuple, int] = {}

  def walk(jaxpr, times: int) -> None:
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in MOVES_MEMORY:
        stack = str(eqn.source_info.name_stack)
        scope = next((s for s in scopes if f"/{s}/" in f"/{stack}/"), "other")
        for var in [*eqn.invars, *eqn.outvars]:
          if isinstance(var, jax.extend.core.Literal) or type(var).__name__ == "DropVar":
            continue
          size = _bytes(var.aval)
          by_scope[scope] = by_scope.get(scope, 0) + size * times
          key = (tuple(var.aval.shape), str(var.aval.dtype))
          tensors[key] = tensors.get(key, 0) + times
      subs = list(_sub_jaxprs(eqn.params))
      if name == "scan":
        for sub in subs:
          walk(sub, times * int(eqn.params["length"]))
      elif name == "cond":  # a lower bound: the cheapest branch
        costs = [memory_traffic(sub, scopes)["total"] for sub in subs]
        cheapest = subs[int(np.argmin(costs))] if subs else None
        if cheapest is not None:
          walk(cheapest, times)
      else:
        for sub in subs:
          walk(sub, times)

  walk(jaxpr, 1)
  largest = max(tensors, key=lambda k: (math.prod(k[0]) * np.dtype(k[1]).itemsize, tensors[k]),
                default=None)
  return {"total": sum(by_scope.values()), "by_scope": by_scope,
          "largest": None if largest is None else {
              "shape": list(largest[0]), "dtype": largest[1],
              "bytes": int(math.prod(largest[0]) * np.dtype(largest[1]).itemsize),
              "touches": tensors[largest]}}


def optimizer_traffic(params, opt_state) -> int:
  """Bytes one optimiser update moves: each gradient read, each parameter read and written, each
  state leaf of a parameter's shape (Adam's two moments) read and written."""
  shapes = {(tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(params)}
  params_bytes = sum(_bytes(x) for x in jax.tree_util.tree_leaves(params))
  moments = sum(_bytes(x) for x in jax.tree_util.tree_leaves(opt_state)
                if (tuple(x.shape), str(x.dtype)) in shapes)
  return 3 * params_bytes + 2 * moments


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of `fn(*args)` lowered on the CPU backend (abstract args are enough)."""
  with jax.default_device(jax.devices("cpu")[0]):
    lowered = jax.jit(fn).lower(*args)
    try:
      cost = lowered.cost_analysis()
    except (AttributeError, NotImplementedError):  # jax versions without the lowered analysis
      cost = None
    if not cost:
      cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def abstract_state(config, image_size: int):
  """(config, abstract train state) of `config` as a GPU runs it, for counting: the explicit
  S-Attn (a fused attention op is opaque to the counts) and, while the caller stays inside
  `cpu_paths.off()`, the models' CPU-only paths off (module doc)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.s_attn_impl = "explicit"
  model = models.build_model(config.model)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  state = jax.eval_shape(lambda v: state_lib.make_state(config, model, v, jnp.zeros(3),
                                                        jnp.ones(3), 1000), variables)
  return config, state


def count_step(config, image_size: int, batch_size: int) -> dict[str, Any]:
  """FLOPs and bytes of one training step of `config` (its model.dtype resolved) on a batch of
  `batch_size` uint8 images of `image_size`, counted as a GPU runs it (module doc):
  {'flops', 'bytes', 'bytes_by_part': {'parameters and optimiser', <attention module path>...,
  'other activations'}, 'largest_tensor', 'parameters'}."""
  with cpu_paths.off():
    config, state = abstract_state(config, image_size)
    batch = {"image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    # A fresh function: a step jax.jit has traced before keeps the program it traced.
    step = functools.partial(train.train_step, augment=config.augment.to_dict())
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    flops = xla_flops(lambda s, b, r: step(s, b, r), state, batch, rng)
    jaxpr = jax.make_jaxpr(lambda s, b, r: step(s, b, r))(state, batch, rng)
  sites = [path for path, _, _ in models.attention_sites(config.model)]
  traffic = memory_traffic(jaxpr, sites)
  optimizer = optimizer_traffic(state.params, state.opt_state)
  parts = {"parameters and optimiser": optimizer}
  parts.update({s: traffic["by_scope"][s] for s in sites if s in traffic["by_scope"]})
  parts["other activations"] = traffic["by_scope"].get("other", 0)
  return {"flops": flops, "bytes": optimizer + traffic["total"], "bytes_by_part": parts,
          "largest_tensor": traffic["largest"],
          "parameters": sum(int(math.prod(x.shape)) for x in
                            jax.tree_util.tree_leaves(state.params))}


def bound(counts: dict[str, Any], peak_tflops_: float | None, gbps: float | None,
          step_s: float | None) -> dict[str, Any]:
  """The roofline of one step: compute and memory times at the peaks, the bound (the larger; None
  without both peaks) and the achieved fraction bound / step_s (the measured step)."""
  compute = counts["flops"] / (peak_tflops_ * 1e12) if peak_tflops_ else None
  memory = counts["bytes"] / (gbps * 1e9) if gbps else None
  low = max(compute, memory) if compute is not None and memory is not None else None
  return {"peak_tflops": peak_tflops_, "peak_gbps": gbps, "compute_s": compute,
          "memory_s": memory, "bound_s": low,
          "bound_by": None if low is None else ("compute" if compute >= memory else "memory"),
          "step_s": step_s,
          "achieved": low / step_s if low is not None and step_s else None}


def format_table(rows: list[dict]) -> str:
  """One block per benchmark row with a roofline: the counts, the peaks, the bound, the step."""
  lines = []
  for r in rows:
    roof = r.get("roofline")
    if not roof:
      continue
    b = roof["bound"]
    ms = lambda s: "-" if s is None else f"{s * 1e3:.2f} ms"  # noqa: E731
    lines.append(f"{r['config']} {r['dtype']} K={r['parallel_folds']}: "
                 f"{roof['flops'] / 1e9:.1f} GFLOP and {roof['bytes'] / 1e9:.2f} GB per step of "
                 f"{r['batch_size']} images")
    for part, n in roof["bytes_by_part"].items():
      lines.append(f"  {part:<28}{n / 1e9:9.3f} GB")
    big = roof["largest_tensor"]
    if big:
      lines.append(f"  largest tensor {big['dtype']}{big['shape']}: {big['bytes'] / 1e6:.0f} MB, "
                   f"touched {big['touches']} times")
    peaks = (f"{b['peak_tflops']} TFLOP/s, {b['peak_gbps']} GB/s" if b["bound_s"] is not None
             else "peaks unknown: give --peak-tflops and --peak-gbps")
    achieved = "-" if b["achieved"] is None else f"{b['achieved']:.1%}"
    lines.append(f"  at {peaks}: compute {ms(b['compute_s'])}, memory {ms(b['memory_s'])}, "
                 f"bound {ms(b['bound_s'])} ({b['bound_by'] or '-'}); measured step "
                 f"{ms(b['step_s'])}: {achieved} of the bound")
  return "\n".join(lines)
