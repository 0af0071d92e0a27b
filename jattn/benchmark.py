"""How fast jattn trains and evaluates on this machine, beside PyTorch eager, and what the paper's
protocol would cost here.

  python -m jattn.benchmark --configs configs/ours.py,configs/vgg19.py --torch --out bench.json
  python -m jattn.benchmark --dtype float32,bfloat16 --parallel-folds 1,5 --peak-tflops 989

For each config, dtype and number K of parallel folds it measures, on random weights and random
uint8 images (no data set, nothing downloaded): train-step and eval-step throughput (images/s,
the median of --windows timed windows of --steps steps after a warm-up, each ended by
`jax.block_until_ready`), compile time, XLA's memory estimate of the compiled step and the
device's peak memory (GPU memory stats; the process' peak RSS on CPU), model FLOPs per image
from XLA's cost analysis and MFU against the device's peak (PEAK_TFLOPS or --peak-tflops). K
parallel folds are K train states stacked on a leading axis, stepped by one vmapped program
(`fold_steps`); their rate is set against K separate runs (K times the K = 1 time). With --torch,
the PyTorch eager transcription of the same network (jattn.torch_reference) runs with the same
shapes in the same process, its timed windows interleaved with JAX's so that load from other
processes hits both alike. Each row projects the wall-clock of the paper's protocol (PROTOCOL)
from its measured rates. Prints a table; --out writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jattn import config_lib, files, models, parallel, train
from jattn import state as state_lib
from jattn.errors import UserError, exit_on_user_error

# Dense (no sparsity) peak TFLOP/s per compute dtype, matched in order against device_kind. The
# float32 figure of tensor-core GPUs is their TF32 peak: XLA's default precision runs float32
# convs and matmuls as TF32 there. From NVIDIA's data sheets (SXM parts unless named).
PEAK_TFLOPS = (
    ("H100 NVL", {"float32": 418.0, "bfloat16": 835.0}),
    ("H100 PCIe", {"float32": 378.0, "bfloat16": 756.0}),
    ("H100", {"float32": 495.0, "bfloat16": 989.0}),
    ("H200", {"float32": 495.0, "bfloat16": 989.0}),
    ("A100", {"float32": 156.0, "bfloat16": 312.0}),
    ("L40S", {"float32": 183.0, "bfloat16": 362.0}),
    ("L40", {"float32": 90.5, "bfloat16": 181.0}),
    ("L4", {"float32": 60.0, "bfloat16": 121.0}),
    ("A10G", {"float32": 35.0, "bfloat16": 70.0}),
    ("A10", {"float32": 62.5, "bfloat16": 125.0}),
    ("RTX 4090", {"float32": 82.6, "bfloat16": 165.0}),
    ("RTX 3090", {"float32": 35.6, "bfloat16": 71.0}),
    ("V100", {"float32": 15.7}),  # no bfloat16 tensor cores
    ("T4", {"float32": 8.1}),
)

# The paper's protocol: 4 configs x 5 folds x 130 epochs; BreakHis' 7,909 images split ~70/30.
PROTOCOL = {"configs": 4, "folds": 5, "epochs": 130, "train_images": 5500, "test_images": 2409}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """The known dense peak of `device_kind` for `dtype`, or None."""
  for name, peaks in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


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


class JaxCase:
  """A config's train state (K folds stacked), its compiled steps and a timed window of each."""

  def __init__(self, config, image_size, batch_size, eval_batch_size, k, seed=0):
    self.k = k
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.key(seed), image_size)
    mean, std = np.full(3, 127.5, np.float32), np.full(3, 64.0, np.float32)
    state = state_lib.make_state(config, model, variables, mean, std, steps_per_epoch=1000)
    self.state = _stack(state, k)
    lead = (k,) if k > 1 else ()
    data = np.random.default_rng(seed)
    self.batch = jax.device_put({
        "image": _random_images(data, lead + (batch_size, image_size, image_size, 3)),
        "label": data.integers(0, config.model.num_classes, lead + (batch_size,), np.int32)})
    self.eval_batch = jax.device_put(
        {"image": _random_images(data, lead + (eval_batch_size, image_size, image_size, 3))})
    keys = jax.random.split(jax.random.key(seed + 1), 64)
    self.rngs = [keys[i] for i in range(64)]
    train_fn, eval_fn = fold_steps(config.augment.to_dict(), k)
    started = time.perf_counter()
    self.train = jax.jit(train_fn, donate_argnums=(0,)).lower(
        self.state, self.batch, self.rngs[0]).compile()
    self.compile_train_s = time.perf_counter() - started
    started = time.perf_counter()
    self.eval = jax.jit(eval_fn).lower(self.state, self.eval_batch).compile()
    self.compile_eval_s = time.perf_counter() - started
    self.program_bytes = _program_bytes(self.train)
    self.images_per_train_step = k * batch_size
    self.images_per_eval_step = k * eval_batch_size
    self._i = 0

  def train_window(self, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
      self.state, metrics = self.train(self.state, self.batch, self.rngs[self._i % 64])
      self._i += 1
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
  step, counted on the explicit S-Attn (a fused attention op is opaque to the count)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.s_attn_impl = "explicit"
  model = models.build_model(config.model)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  state = jax.eval_shape(lambda v: state_lib.make_state(config, model, v, jnp.zeros(3),
                                                        jnp.ones(3), 1000), variables)
  images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8)
  labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
  train_fn, eval_fn = fold_steps(config.augment.to_dict(), 1)
  out = {}
  # Counted on the CPU backend, whatever runs the benchmark: on a GPU the convolutions are cuDNN
  # custom calls, which XLA's cost analysis does not count (seen on an H100: 4.6 GFLOP per
  # training image instead of ~147), and the lowered program there reports no analysis at all.
  with jax.default_device(jax.devices("cpu")[0]):
    lowered = {
        "train": jax.jit(train_fn).lower(state, {"image": images, "label": labels},
                                         jax.random.key(0)),
        "eval": jax.jit(eval_fn).lower(state, {"image": images}),
    }
    for name, low in lowered.items():
      try:
        cost = low.cost_analysis()
      except (AttributeError, NotImplementedError):  # jax versions without the lowered analysis
        cost = None
      if not cost:
        cost = low.compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      out[name] = float(cost["flops"]) / batch_size
  return out


class TorchCase:
  """The PyTorch eager peer of a K = 1 JaxCase: same network shapes, batch, optimiser."""

  def __init__(self, config, image_size, batch_size, eval_batch_size, dtype, seed=0):
    import torch

    from jattn import torch_reference

    self.torch = torch
    self.device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    mc = config.model
    self.model = torch_reference.for_config(mc).to(self.device)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate,
                                      weight_decay=config.weight_decay)
    self.autocast = dtype == "bfloat16"
    data = np.random.default_rng(seed)
    as_tensor = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
    self.images = as_tensor(_random_images(data, (batch_size, 3, image_size, image_size)))
    self.labels = as_tensor(data.integers(0, mc.num_classes, (batch_size,)).astype(np.int64))
    self.eval_images = as_tensor(_random_images(data, (eval_batch_size, 3, image_size,
                                                       image_size)))
    self.images_per_train_step, self.images_per_eval_step = batch_size, eval_batch_size

  def _forward(self, images, flip):
    x = (images.float() - 127.5) / 64.0
    if flip:  # the augmentation's share of the work: one flip and one right-angle rotation
      x = torch_rot90(self.torch, self.torch.flip(x, dims=(3,)))
    with self.torch.autocast(self.device, self.torch.bfloat16, enabled=self.autocast):
      return self.model(x).float()

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


def run_case(config, name, dtype, k, args, with_torch) -> dict:
  """Measures one (config, dtype, K): JAX, and PyTorch beside it when asked and K = 1."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = dtype
  resolved = models.resolve_dtype(dtype)
  row = {"config": name, "dtype": resolved, "parallel_folds": k,
         "s_attn_impl": models.resolve_s_attn_impl(config.model.get("s_attn_impl", "auto")),
         "image_size": args.image_size, "batch_size": args.batch_size,
         "eval_batch_size": args.eval_batch_size}
  print(f"[{name} {resolved} K={k}] compiling ...", file=sys.stderr, flush=True)
  peers = {"jax": JaxCase(config, args.image_size, args.batch_size, args.eval_batch_size, k)}
  jax_case = peers["jax"]
  row.update(compile_train_s=round(jax_case.compile_train_s, 2),
             compile_eval_s=round(jax_case.compile_eval_s, 2),
             xla_program_bytes=jax_case.program_bytes)
  if with_torch and k == 1:
    peers["torch"] = TorchCase(config, args.image_size, args.batch_size, args.eval_batch_size,
                               resolved)
  for phase in ("train", "eval"):
    times = {p: [] for p in peers}
    for case in peers.values():  # warm-up: compilation, caches, allocator
      getattr(case, f"{phase}_window")(args.warmup)
    for _ in range(args.windows):  # interleaved: jax, torch, jax, torch, ...
      for p, case in peers.items():
        times[p].append(getattr(case, f"{phase}_window")(args.steps))
    for p, case in peers.items():
      images = args.steps * getattr(case, f"images_per_{phase}_step")
      prefix = "" if p == "jax" else "torch_"
      row[f"{prefix}{phase}_images_per_s"] = round(_median_rate(times[p], images), 3)
      row[f"{prefix}{phase}_window_s"] = [round(t, 4) for t in times[p]]
    if "torch" in peers:
      row[f"{phase}_ratio_vs_torch"] = round(
          row[f"{phase}_images_per_s"] / row[f"torch_{phase}_images_per_s"], 3)
  kind, peak = _peak_memory_bytes()
  row[f"peak_{kind}_bytes_so_far"] = peak
  del peers, jax_case
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


def summarize(rows: list[dict], device_kind: str, peak_override: float | None) -> None:
  """Adds FLOP-based figures, parallel-fold speed-ups and the protocol projection to each row."""
  base = {(r["config"], r["dtype"]): r for r in rows if r["parallel_folds"] == 1}
  for r in rows:
    peak = peak_override or peak_tflops(device_kind, r["dtype"])
    r["peak_tflops"] = peak
    for phase in ("train", "eval"):
      flops = r.get(f"{phase}_flops_per_image")
      r[f"{phase}_mfu"] = (round(flops * r[f"{phase}_images_per_s"] / (peak * 1e12), 4)
                           if flops and peak else None)
    one = base.get((r["config"], r["dtype"]))
    # K separate runs take K times one run's time for K times its images: the K = 1 rate.
    r["train_speedup_vs_separate_runs"] = (
        round(r["train_images_per_s"] / one["train_images_per_s"], 3) if one else None)
    r["protocol_hours"] = round(projected_hours(r["train_images_per_s"],
                                                r["eval_images_per_s"]), 2)


def format_table(rows: list[dict]) -> str:
  cols = [("config", "config", "{}"), ("dtype", "dtype", "{}"), ("K", "parallel_folds", "{}"),
          ("train img/s", "train_images_per_s", "{:.1f}"),
          ("eval img/s", "eval_images_per_s", "{:.1f}"),
          ("torch train", "torch_train_images_per_s", "{:.1f}"),
          ("torch eval", "torch_eval_images_per_s", "{:.1f}"),
          ("train x torch", "train_ratio_vs_torch", "{:.2f}"),
          ("eval x torch", "eval_ratio_vs_torch", "{:.2f}"),
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


def _int_list(text: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise UserError(f"--parallel-folds {text!r}: give positive integers, e.g. 1,5")
  return values


def make_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m jattn.benchmark",
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
  parser.add_argument("--torch", action="store_true",
                      help="run the PyTorch eager peer beside each K = 1 case")
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="the device's peak TFLOP/s for MFU (default: PEAK_TFLOPS by device)")
  parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
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


def benchmark(args) -> dict:
  """Runs every (config, dtype, K) of `args`; returns {'device': ..., 'rows': [...]}."""
  info = _device_info(args)
  rows = []
  for spec in [s.strip() for s in args.configs.split(",") if s.strip()]:
    config = config_lib.apply_overrides(config_lib.load_config(spec), args.overrides)
    flops = step_flops(config, args.image_size, args.batch_size)
    for dtype in args.dtypes:
      for k in args.parallel_folds:
        row = run_case(config, config.name, dtype, k, args, args.torch)
        row["train_flops_per_image"] = flops["train"]
        row["eval_flops_per_image"] = flops["eval"]
        rows.append(row)
        print(f"[{config.name} {row['dtype']} K={k}] train {row['train_images_per_s']:.1f} "
              f"img/s, eval {row['eval_images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
  summarize(rows, info["device_kind"], args.peak_tflops)
  return {"schema": "jattn.benchmark/1", "device": info, "protocol": PROTOCOL,
          "settings": {k: getattr(args, k) for k in ("image_size", "batch_size",
                                                     "eval_batch_size", "steps", "windows",
                                                     "warmup", "peak_tflops")}
          | {"overrides": list(args.overrides)},
          "rows": rows}


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  with exit_on_user_error("jattn.benchmark"):
    args = parse_args(argv)
    if args.torch:
      from jattn import torch_reference  # noqa: F401  (a missing torch is a one-line error)
    result = benchmark(args)
    if args.out:
      files.atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
  d = result["device"]
  threads = f", torch threads {d['torch_threads']}" if "torch_threads" in d else ""
  print(f"{d['device_kind']} ({d['backend']}, {d['cpu_threads']} CPU threads{threads}), "
        f"image {args.image_size}, batch {args.batch_size}, median of {args.windows} windows "
        f"of {args.steps} steps")
  print(format_table(result["rows"]))


if __name__ == "__main__":
  main()
