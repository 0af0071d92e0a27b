"""How fast jattn trains and evaluates on this machine, beside PyTorch, and what the paper's
protocol would cost here.

  jattn benchmark --configs configs/ours.py,configs/vgg19.py --torch --out bench.json
  jattn benchmark --dtype float32,bfloat16 --parallel-folds 1,5 --peak-tflops 989
  jattn benchmark --torch --torch-mode eager,channels_last,compile --roofline
  jattn benchmark --profile trace/          # where the step's time goes (jattn.perf.profile)
  jattn benchmark --steps-per-dispatch 1,8  # steps per dispatch (lax.scan)
  jattn benchmark --runs-per-device 1,2,4   # K processes on one device at once

For each config, dtype, number K of parallel folds and number N of steps per dispatch it measures,
on random weights and random uint8 images (no data set, nothing downloaded): train-step and
eval-step throughput (images/s, the median of --windows timed windows of --steps dispatches after a
warm-up, each ended by `jax.block_until_ready`), compile time, XLA's memory estimate of the compiled
step and the device's peak memory (GPU memory stats; the process' peak RSS on CPU), model FLOPs per
image from XLA's cost analysis (of the step as a GPU runs it: the CPU-only paths off,
`jattn.perf.roofline`) and MFU against the device's peak (`roofline.DEVICES` or --peak-tflops). K
parallel folds are K train states stacked on a leading axis, stepped by one vmapped program
(`fold_steps`); their rate is set against K separate runs (K times the K = 1 time). N steps per
dispatch are one `lax.scan` over N stacked batches, as `--config.steps_per_dispatch=N` trains. With
--torch, the PyTorch transcription of the same network (jattn.perf.torch_reference) runs with the
same shapes in the same process, in each --torch-mode (eager; channels_last; compile:
`torch.compile` of the channels-last model with fused Adam), with bfloat16 autocast when the row's
dtype is bfloat16; every peer's timed windows are interleaved with JAX's so that load from other
processes hits all alike, and a compiled peer warms up until no compilation is left for a timed
window (counted: `torch_<mode>_compilations_in_windows`). --roofline adds the step's lower bound
from its FLOPs and bytes (`jattn.perf.roofline`); --profile DIR traces a few steps instead of timing
windows and prints where their time goes (`jattn.perf.profile`); --runs-per-device K starts K
benchmark processes on one device at once and sums their rates (`jattn.perf.runs_per_device`). Each
row projects the wall-clock of the paper's protocol (PROTOCOL) from its measured rates. Prints a
table; --out writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import models
from jattn.core import config_lib
from jattn.core.errors import UserError
from jattn.models import cpu_paths
from jattn.perf import profile as profile_lib
from jattn.perf import roofline
from jattn.training import compat, parallel, train
from jattn.training import state as state_lib

# The paper's protocol: 4 configs x 5 folds x 130 epochs; BreakHis' 7,909 images split ~70/30.
PROTOCOL = {"configs": 4, "folds": 5, "epochs": 130, "train_images": 5500, "test_images": 2409}
TORCH_MODES = ("eager", "channels_last", "compile")  # --torch-mode

peak_tflops = roofline.peak_tflops  # the device table is roofline.DEVICES


def fold_steps(augment: dict, k: int) -> tuple[Callable, Callable]:
  """(train step, eval step) over K folds: K = 1 is a plain run's step; K > 1 is the program
  `--config.parallel_folds=K` trains with (`parallel.fold_train_step`: states and batches stacked
  on a leading fold axis, each fold's rng folded in from one key), and the eval step vmapped."""
  step = functools.partial(train.train_step, augment=augment)
  if k == 1:
    return step, state_lib.eval_step
  folds = parallel.fold_train_step(step, donate=False)  # what parallel-fold training runs
  active = jnp.ones((k,), bool)
  return (lambda state, batch, rng: folds(state, batch, rng, active)), jax.vmap(state_lib.eval_step)


def _stack(tree, k: int):
  return tree if k == 1 else parallel.stack_folds([tree] * k)


def _random_images(rng: np.random.Generator, shape) -> np.ndarray:
  return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _median_rate(seconds: list[float], images: int) -> float:
  return images / statistics.median(seconds)


def _dispatch_steps(train_fn: Callable, k: int, n: int) -> Callable:
  """`train_fn` (of `fold_steps`) as N steps in one `lax.scan` over N stacked batches
  (`parallel.scan_steps`, what `--config.steps_per_dispatch=N` trains with); N = 1: itself."""
  if n == 1:
    return train_fn
  if k == 1:  # each step its own rng, as training folds in its step
    body = lambda s, b, r, a: train_fn(s, b, jax.random.fold_in(r, s.step))  # noqa: E731
  else:  # fold_train_step folds each fold's step in itself
    body = lambda s, b, r, a: train_fn(s, b, r)  # noqa: E731
  steps = parallel.scan_steps(body)
  return lambda state, batches, rng: steps(state, batches, rng, None)


class JaxCase:
  """A config's train state (K folds stacked), its compiled steps (N per dispatch) and a timed
  window of each."""

  def __init__(self, config, image_size, batch_size, eval_batch_size, k, seed=0, n=1):
    self.k, self.n = k, n
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.key(seed), image_size)
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 64.0, np.float32)
    state = state_lib.make_state(config, model, variables, mean, std, steps_per_epoch=1000)
    self.state = _stack(state, k)
    lead = (k,) if k > 1 else ()
    data = np.random.default_rng(seed)
    stacked = (n,) if n > 1 else ()  # the same batch N times: the work of N steps
    self.batch = jax.device_put({
        "image": np.broadcast_to(
            _random_images(data, lead + (batch_size, image_size, image_size, 3)),
            stacked + lead + (batch_size, image_size, image_size, 3)).copy(),
        "label": np.broadcast_to(
            data.integers(0, config.model.num_classes, lead + (batch_size,), np.int32),
            stacked + lead + (batch_size,)).copy()})
    self.eval_batch = jax.device_put(
        {"image": _random_images(data, lead + (eval_batch_size, image_size, image_size, 3))})
    keys = jax.random.split(jax.random.key(seed + 1), 64)
    self.rngs = [keys[i] for i in range(64)]
    train_fn, eval_fn = fold_steps(config.augment.to_dict(), k)
    train_fn = _dispatch_steps(train_fn, k, n)
    started = time.perf_counter()
    self.train = jax.jit(train_fn, donate_argnums=(0,)).lower(
        self.state, self.batch, self.rngs[0]).compile()
    self.compile_train_s = time.perf_counter() - started
    started = time.perf_counter()
    self.eval = jax.jit(eval_fn).lower(self.state, self.eval_batch).compile()
    self.compile_eval_s = time.perf_counter() - started
    self.program_bytes = _program_bytes(self.train)
    self.images_per_train_step = n * k * batch_size
    self.images_per_eval_step = k * eval_batch_size
    self._i = 0

  def train_dispatch(self):
    """Dispatches one (N-step) train step without waiting for it; returns its metrics."""
    self.state, metrics = self.train(self.state, self.batch, self.rngs[self._i % 64])
    self._i += 1
    return metrics

  def train_window(self, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
      metrics = self.train_dispatch()
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - started

  def eval_window(self, steps: int) -> float:
    started = time.perf_counter()
    outs = [self.eval(self.state, self.eval_batch) for _ in range(steps)]
    jax.block_until_ready(outs)
    return time.perf_counter() - started


def _program_bytes(compiled) -> int | None:
  """XLA's estimate of a compiled step's memory: arguments + outputs + temporaries - aliased."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except (AttributeError, TypeError, NotImplementedError):
    return None


def step_flops(config, image_size: int, batch_size: int) -> dict[str, float]:
  """XLA's FLOP count (cost analysis of the lowered program) per image of a train and an eval
  step, counted on the explicit S-Attn (a fused attention op is opaque to the count), as a GPU
  runs the step (`roofline.xla_flops`: on the CPU backend with the models' CPU-only paths off).

  On a GPU the convolutions are cuDNN custom calls, which XLA's cost analysis does not count
  (seen on an H100: 4.6 GFLOP per training image instead of ~147), and the lowered program there
  reports no analysis at all; on a CPU the Winograd convolutions do fewer products."""
  with cpu_paths.off():
    config, state = roofline.abstract_state(config, image_size)
    images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    train_fn, eval_fn = fold_steps(config.augment.to_dict(), 1)
    return {"train": roofline.xla_flops(train_fn, state, {"image": images, "label": labels},
                                        jax.random.key(0)) / batch_size,
            "eval": roofline.xla_flops(lambda s, b: eval_fn(s, b), state,
                                       {"image": images}) / batch_size}


class TorchCase:
  """The PyTorch peer of a K = 1 JaxCase: same network shapes, batch, optimiser, in one `mode`:
  'eager' (NCHW), 'channels_last' (NHWC memory format), or 'compile' (`torch.compile` of the
  channels-last model, `compile_backend` inductor unless told, with fused Adam); bfloat16
  autocast when `dtype` is bfloat16."""

  def __init__(self, config, image_size, batch_size, eval_batch_size, dtype, seed=0,
               mode="eager", compile_backend="inductor"):
    import torch

    from jattn.perf import torch_reference

    self.torch, self.mode = torch, mode
    self.device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    mc = config.model
    self.model = torch_reference.for_config(mc, image_size).to(self.device)
    self.memory_format = (torch.contiguous_format if mode == "eager" else torch.channels_last)
    self.model = self.model.to(memory_format=self.memory_format)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay,
                                      **({"fused": True} if mode == "compile" else {}))
    self.forward = (torch.compile(self.model, backend=compile_backend) if mode == "compile"
                    else self.model)
    self.autocast = dtype == "bfloat16"
    data = np.random.default_rng(seed)
    as_tensor = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
    self.images = as_tensor(_random_images(data, (batch_size, 3, image_size, image_size)))
    self.labels = as_tensor(data.integers(0, mc.num_classes, (batch_size,)).astype(np.int64))
    self.eval_images = as_tensor(_random_images(data, (eval_batch_size, 3, image_size,
                                                       image_size)))
    self.images_per_train_step, self.images_per_eval_step = batch_size, eval_batch_size

  def compilations(self) -> int:
    """Graphs torch.compile has compiled so far in this process (0 outside compile mode)."""
    if self.mode != "compile":
      return 0
    from torch._dynamo.utils import counters  # noqa: PLC0415

    return int(counters["stats"]["unique_graphs"])

  def _forward(self, images, flip):
    x = (images.float() - 127.5) / 64.0
    if flip:  # the augmentation's share of the work: one flip and one right-angle rotation
      x = torch_rot90(self.torch, self.torch.flip(x, dims=(3,)))
    x = x.contiguous(memory_format=self.memory_format)
    with self.torch.autocast(self.device, self.torch.bfloat16, enabled=self.autocast):
      return self.forward(x).float()

  def _sync(self):
    if self.device == "cuda":
      self.torch.cuda.synchronize()

  def train_window(self, steps: int) -> float:
    torch = self.torch
    self.model.train()
    started = time.perf_counter()
    for _ in range(steps):
      loss = torch.nn.functional.cross_entropy(self._forward(self.images, True), self.labels)
      self.optimizer.zero_grad(set_to_none=True)
      loss.backward()
      self.optimizer.step()
    loss.item()
    self._sync()
    return time.perf_counter() - started

  def eval_window(self, steps: int) -> float:
    self.model.eval()
    started = time.perf_counter()
    with self.torch.inference_mode():
      outs = [self.torch.softmax(self._forward(self.eval_images, False), -1)
              for _ in range(steps)]
      outs[-1].cpu()
    self._sync()
    return time.perf_counter() - started


def torch_rot90(torch, x):
  return torch.rot90(x, 1, dims=(2, 3))


def _peak_memory_bytes() -> tuple[str, int]:
  """('device', peak bytes in use) where the device reports it, else ('host_rss', peak RSS)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device", int(stats["peak_bytes_in_use"])
  return "host_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def projected_hours(train_rate: float, eval_rate: float) -> float:
  """Hours of the paper's protocol (PROTOCOL) at these images/s: every fold's training epochs
  and its one test pass."""
  p = PROTOCOL
  runs = p["configs"] * p["folds"]
  seconds = runs * (p["epochs"] * p["train_images"] / train_rate + p["test_images"] / eval_rate)
  return seconds / 3600


def _case_row(config, name, dtype, k, n, args) -> tuple[Any, dict]:
  """(config with the row's dtype, the row's settings) of one (config, dtype, K, N)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = dtype
  row = {"config": name, "dtype": models.resolve_dtype(dtype), "parallel_folds": k,
         "steps_per_dispatch": n,
         "s_attn_impl": models.resolve_s_attn_impl(config.model.get("s_attn_impl", "auto")),
         "image_size": args.image_size, "batch_size": args.batch_size,
         "eval_batch_size": args.eval_batch_size}
  return config, row


def _jax_case(config, row, args) -> JaxCase:
  print(f"[{row['config']} {row['dtype']} K={row['parallel_folds']} "
        f"N={row['steps_per_dispatch']}] compiling ...", file=sys.stderr, flush=True)
  case = JaxCase(config, args.image_size, args.batch_size, args.eval_batch_size,
                 row["parallel_folds"], n=row["steps_per_dispatch"])
  row.update(compile_train_s=round(case.compile_train_s, 2),
             compile_eval_s=round(case.compile_eval_s, 2), xla_program_bytes=case.program_bytes)
  return case


def run_case(config, name, dtype, k, args, with_torch, n=1) -> dict:
  """Measures one (config, dtype, K, N): JAX, and PyTorch in each of `args.torch_modes` beside it
  when asked and K = N = 1."""
  config, row = _case_row(config, name, dtype, k, n, args)
  peers = {"jax": _jax_case(config, row, args)}
  if with_torch and k == 1 and n == 1:
    for mode in args.torch_modes:
      peers[f"torch_{mode}"] = TorchCase(config, args.image_size, args.batch_size,
                                         args.eval_batch_size, row["dtype"], mode=mode,
                                         compile_backend=args.torch_compile_backend)
  for phase in ("train", "eval"):
    times = {p: [] for p in peers}
    for case in peers.values():  # warm-up: compilation, caches, allocator
      # torch.compile compiles at the first step of each phase: one more step shows none is left
      warmup = max(args.warmup, 2) if getattr(case, "mode", None) == "compile" else args.warmup
      getattr(case, f"{phase}_window")(warmup)
    compiled = {p: case.compilations() for p, case in peers.items() if p != "jax"}
    for _ in range(args.windows):  # interleaved: jax, torch, jax, torch, ...
      for p, case in peers.items():
        times[p].append(getattr(case, f"{phase}_window")(args.steps))
    for p, case in peers.items():
      images = args.steps * getattr(case, f"images_per_{phase}_step")
      prefix = "" if p == "jax" else f"{p}_"
      row[f"{prefix}{phase}_images_per_s"] = round(_median_rate(times[p], images), 3)
      row[f"{prefix}{phase}_window_s"] = [round(t, 4) for t in times[p]]
      if p != "jax":
        row[f"{phase}_ratio_vs_{p}"] = round(
            row[f"{phase}_images_per_s"] / row[f"{p}_{phase}_images_per_s"], 3)
        late = case.compilations() - compiled[p]
        row[f"{p}_compilations_in_windows"] = row.get(f"{p}_compilations_in_windows", 0) + late
        if late:
          print(f"jattn.perf.benchmark: warning: {p} compiled {late} graph(s) during the timed "
                f"{phase} windows; raise --warmup", file=sys.stderr, flush=True)
  kind, peak = _peak_memory_bytes()
  row[f"peak_{kind}_bytes_so_far"] = peak
  del peers
  return row


def profile_case(config, name, dtype, k, n, args) -> dict:
  """Traces `args.steps` train dispatches of one (config, dtype, K, N) after `args.warmup` into
  `args.profile`/<row> and reads where their time goes (`jattn.perf.profile`); no timed windows."""
  config, row = _case_row(config, name, dtype, k, n, args)
  case = _jax_case(config, row, args)
  jax.block_until_ready(case.train_window(args.warmup) if args.warmup else None)
  where = os.path.join(args.profile, f"{name}_{row['dtype']}_K{k}_N{n}")
  traced = profile_lib.trace(case.train_dispatch, args.steps, where)
  sites = [path for path, _, _ in models.attention_sites(config.model)]
  steps = args.steps * n  # training steps traced: the figures are per step, not per dispatch
  found = profile_lib.breakdown(case.train.as_text(), traced["xplane"], steps, sites)
  found.update(wall_s_per_step=traced["wall_s"] / steps, trace_dir=where,
               xplane=traced["xplane"], perfetto=traced["perfetto"])
  row["profile"] = found
  row["train_images_per_s"] = round(k * args.batch_size / found["step_s"], 3)
  del case
  return row


def _device_info(args) -> dict:
  device = jax.devices()[0]
  info = {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "cpu": platform.processor() or platform.machine(),
          "cpu_threads": len(os.sched_getaffinity(0)),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "python": platform.python_version()}
  if args.torch:
    import torch

    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return info


def summarize(rows: list[dict], device_kind: str, peak_override: float | None,
              gbps_override: float | None = None) -> None:
  """Adds FLOP-based figures, parallel-fold speed-ups, the protocol projection and (rows with a
  `roofline` count) the roofline bound and achieved fraction to each row."""
  base = {(r["config"], r["dtype"], r.get("steps_per_dispatch", 1)): r for r in rows
          if r["parallel_folds"] == 1}
  for r in rows:
    peak = peak_override or peak_tflops(device_kind, r["dtype"])
    r["peak_tflops"] = peak
    for phase in ("train", "eval"):
      flops, rate = r.get(f"{phase}_flops_per_image"), r.get(f"{phase}_images_per_s")
      r[f"{phase}_mfu"] = (round(flops * rate / (peak * 1e12), 4)
                           if flops and peak and rate else None)
    one = base.get((r["config"], r["dtype"], r.get("steps_per_dispatch", 1)))
    # K separate runs take K times one run's time for K times its images: the K = 1 rate.
    r["train_speedup_vs_separate_runs"] = (
        round(r["train_images_per_s"] / one["train_images_per_s"], 3) if one else None)
    r["protocol_hours"] = (round(projected_hours(r["train_images_per_s"],
                                                 r["eval_images_per_s"]), 2)
                           if r.get("eval_images_per_s") else None)
    if r.get("roofline"):  # one fold's step on a batch, against the time per batch measured
      r["roofline"]["bound"] = roofline.bound(
          r["roofline"], peak, gbps_override or roofline.bandwidth_gbps(device_kind),
          r["batch_size"] / r["train_images_per_s"])


def format_table(rows: list[dict]) -> str:
  modes = [m for m in TORCH_MODES if any(f"torch_{m}_train_images_per_s" in r for r in rows)]
  torch_cols = [(f"torch {m} {phase}", f"torch_{m}_{phase}_images_per_s", "{:.1f}")
                for m in modes for phase in ("train", "eval")]
  torch_cols += [(f"{phase} x {m}", f"{phase}_ratio_vs_torch_{m}", "{:.2f}")
                 for m in modes for phase in ("train", "eval")]
  cols = [("config", "config", "{}"), ("dtype", "dtype", "{}"), ("K", "parallel_folds", "{}"),
          ("N", "steps_per_dispatch", "{}"),
          ("train img/s", "train_images_per_s", "{:.1f}"),
          ("eval img/s", "eval_images_per_s", "{:.1f}"),
          *torch_cols,
          ("x separate", "train_speedup_vs_separate_runs", "{:.2f}"),
          ("compile s", "compile_train_s", "{:.0f}"),
          ("GFLOP/img", "train_flops_per_image", "{:.1f}"),
          ("MFU", "train_mfu", "{:.1%}"),
          ("XLA GB", "xla_program_bytes", "{:.2f}"),
          ("protocol h", "protocol_hours", "{:.1f}")]

  def cell(r, key, fmt):
    v = r.get(key)
    if v is None:
      return "-"
    if key == "train_flops_per_image":
      v = v / 1e9
    if key == "xla_program_bytes":
      v = v / 2**30
    return fmt.format(v)

  table = [[h for h, _, _ in cols]] + [[cell(r, k, f) for _, k, f in cols] for r in rows]
  widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                   for row in table)


def _int_list(text: str, flag: str = "--parallel-folds", example: str = "1,5") -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise UserError(f"{flag} {text!r}: give positive integers, e.g. {example}")
  return values


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jattn benchmark",
                                   description=" ".join(__doc__.split("\n\n")[0].split()),
                                   epilog="--config.FIELD=VALUE overrides apply to every config.")
  parser.add_argument("--configs", default="configs/ours.py",
                      help="comma-separated config files (default: configs/ours.py)")
  parser.add_argument("--image-size", type=int, default=224, help="image side (default 224)")
  parser.add_argument("--batch-size", type=int, default=8, help="train batch (default 8)")
  parser.add_argument("--eval-batch-size", type=int, default=None,
                      help="default: --batch-size")
  parser.add_argument("--dtype", default="float32",
                      help=f"comma-separated compute dtypes: {', '.join(models.DTYPES)}")
  parser.add_argument("--parallel-folds", default="1", help="comma-separated K, e.g. 1,5")
  parser.add_argument("--steps-per-dispatch", default="1",
                      help="comma-separated N: training steps per dispatch (lax.scan), e.g. 1,8")
  parser.add_argument("--torch", action="store_true",
                      help="run the PyTorch peer beside each K = N = 1 case")
  parser.add_argument("--torch-mode", default="eager",
                      help=f"comma-separated PyTorch modes, each a peer: {', '.join(TORCH_MODES)}")
  parser.add_argument("--torch-compile-backend", default="inductor",
                      help="torch.compile's backend in --torch-mode compile (default inductor)")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for MFU and the roofline (default: "
                           "roofline.DEVICES by device kind)")
  parser.add_argument("--peak-gbps", type=float, default=None,
                      help="the device's memory bandwidth in GB/s for the roofline (default: "
                           "roofline.DEVICES by device kind)")
  parser.add_argument("--roofline", action="store_true",
                      help="add each row's roofline: the step's FLOPs and bytes at the peaks")
  parser.add_argument("--profile", default=None, metavar="DIR",
                      help="trace --steps dispatches after --warmup into DIR and print where "
                           "their time goes, instead of timing windows")
  parser.add_argument("--runs-per-device", default=None, metavar="K,...",
                      help="instead: the aggregate train rate of K benchmark processes at once on "
                           "one device, for each K (e.g. 1,2,4; first config and dtype)")
  parser.add_argument("--steps", type=int, default=5, help="dispatches per timed window")
  parser.add_argument("--windows", type=int, default=5, help="timed windows (median taken)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps before the windows")
  parser.add_argument("--out", default=None, help="write the figures as JSON here")
  return parser


def parse_args(argv):
  overrides, rest = config_lib.split_argv(argv)
  args = make_parser().parse_args(rest)
  args.overrides = overrides
  args.eval_batch_size = args.eval_batch_size or args.batch_size
  args.parallel_folds = _int_list(args.parallel_folds)
  args.steps_per_dispatch = _int_list(args.steps_per_dispatch, "--steps-per-dispatch", "1,8")
  args.runs_per_device = (None if args.runs_per_device is None else
                          _int_list(args.runs_per_device, "--runs-per-device", "1,2,4"))
  args.torch_modes = [m.strip() for m in args.torch_mode.split(",") if m.strip()]
  if not args.torch_modes or set(args.torch_modes) - set(TORCH_MODES):
    raise UserError(f"--torch-mode {args.torch_mode!r}: use {', '.join(TORCH_MODES)} "
                    f"(comma-separated)")
  for name in ("peak_tflops", "peak_gbps"):
    if getattr(args, name) is not None and not getattr(args, name) > 0:
      raise UserError(f"--{name.replace('_', '-')} must be a positive number")
  args.dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
  bad = [d for d in args.dtypes if d not in models.DTYPES]
  if bad or not args.dtypes:
    raise UserError(f"--dtype {args.dtype!r}: use {', '.join(models.DTYPES)} (comma-separated)")
  for name in ("image_size", "batch_size", "steps", "windows"):
    if getattr(args, name) < 1:
      raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
  if args.warmup < 0:
    raise UserError("--warmup must be 0 or more")
  return args


def result_header(args) -> dict:
  """What every benchmark result begins with: its schema, the device, the protocol and the
  settings of `args`."""
  settings = {k: getattr(args, k) for k in (
      "image_size", "batch_size", "eval_batch_size", "steps", "windows", "warmup",
      "peak_tflops", "peak_gbps", "torch_modes", "torch_compile_backend", "profile")} | {
          "overrides": list(args.overrides)}
  return {"schema": "jattn.benchmark/2", "device": _device_info(args), "protocol": PROTOCOL,
          "settings": settings}


def benchmark(args) -> dict:
  """Runs every (config, dtype, K, N) of `args`; returns {'device': ..., 'rows': [...], ...}."""
  result = result_header(args)
  info = result["device"]
  rows = []
  for spec in [s.strip() for s in args.configs.split(",") if s.strip()]:
    config = compat.load_config(spec, args.overrides)
    flops = step_flops(config, args.image_size, args.batch_size)
    for dtype in args.dtypes:
      counts = None
      if args.roofline:
        with_dtype = config.copy_and_resolve_references()
        with with_dtype.unlocked():
          with_dtype.model.dtype = models.resolve_dtype(dtype)
        counts = roofline.count_step(with_dtype, args.image_size, args.batch_size)
      for k in args.parallel_folds:
        for n in args.steps_per_dispatch:
          if args.profile:
            row = profile_case(config, config.name, dtype, k, n, args)
          else:
            row = run_case(config, config.name, dtype, k, args, args.torch, n)
          row["train_flops_per_image"] = flops["train"]
          row["eval_flops_per_image"] = flops["eval"]
          if counts is not None:
            row["roofline"] = dict(counts)
          rows.append(row)
          print(f"[{config.name} {row['dtype']} K={k} N={n}] train "
                f"{row['train_images_per_s']:.1f} img/s"
                + (f", eval {row['eval_images_per_s']:.1f} img/s" if "eval_images_per_s" in row
                   else ""), file=sys.stderr, flush=True)
  summarize(rows, info["device_kind"], args.peak_tflops, args.peak_gbps)
  return result | {"rows": rows}


def require_torch() -> None:
  """Imports the PyTorch transcription of the models (a missing torch is a one-line error)."""
  from jattn.perf import torch_reference  # noqa: F401, PLC0415 -- optional: torch

def report_head(result: dict) -> str:
  """The first line of a benchmark report: the device and the image and batch sizes."""
  d, s = result["device"], result["settings"]
  threads = f", torch threads {d['torch_threads']}" if "torch_threads" in d else ""
  return (f"{d['device_kind']} ({d['backend']}, {d['cpu_threads']} CPU threads{threads}), "
          f"image {s['image_size']}, batch {s['batch_size']}")


def report(result: dict) -> str:
  """The printed report of a `benchmark` result: the device, then the table (or the profile),
  then the rooflines."""
  s = result["settings"]
  head = report_head(result)
  lines = []
  if s.get("profile"):
    lines.append(f"{head}, {s['steps']} dispatches traced after {s['warmup']} warm-up")
    for r in result["rows"]:
      lines += [f"{r['config']} {r['dtype']} K={r['parallel_folds']} "
                f"N={r['steps_per_dispatch']}: {r['profile']['trace_dir']}",
                profile_lib.format_table(r["profile"])]
  else:
    lines += [f"{head}, median of {s['windows']} windows of {s['steps']} dispatches",
              format_table(result["rows"])]
  roofs = roofline.format_table(result["rows"])
  return "\n".join(lines + ([roofs] if roofs else []))
