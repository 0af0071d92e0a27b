"""Where a training step's time goes, by kind of op, read from a `jax.profiler` trace.

  jattn benchmark --profile DIR [--steps 5] [--dtype bfloat16]

The benchmark compiles the step, warms it up, then traces `--steps` steps run back to back as
training runs them (dispatched ahead, waited for at the end) into DIR (TensorBoard's profile
plugin reads DIR/plugins/profile/<run>/*.xplane.pb, Perfetto its perfetto_trace.json.gz). The
trace's device ops (XLA's thunks on a CPU, the "XLA Ops" line of a GPU) are matched by name to the
instructions of the compiled program (its optimised HLO), and each instruction is given a kind
from what it computes and where its ops come from (their name stack: the attention modules'
paths, `transpose(...)` for the backward pass, `optimizer` for the update):

  convolutions, convolution gradients      a convolution (or a fusion or library call holding one)
  attention einsums, attention softmax ... products of, and other ops in, the attention modules
  matmuls                                  other matrix products (the classifier)
  optimiser update, pooling, reductions, element-wise fusions, copies and transposes,
  input augmentation, other                (other: ops the program's text does not name)
  host gaps                                the device idle between ops: dispatch, Python, waits

The window is the traced steps' span on the device (first op's start to last op's end); where ops
overlap (a CPU runs independent ones at once) each kind gets its share of the overlap, so the kinds
add up to the window exactly, and window / steps is the step's time. `KINDS` is the order shown.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.profiler import ProfileData

KINDS = ("convolutions", "convolution gradients", "attention einsums",
         "attention softmax and element-wise", "matmuls", "optimiser update", "pooling",
         "reductions", "element-wise fusions", "copies and transposes", "input augmentation",
         "other", "host gaps")
CONTROL = frozenset({"while", "conditional", "call", "async-start", "async-done", "async-update"})
MOVES = frozenset({"copy", "transpose", "bitcast", "reshape", "broadcast", "slice",
                   "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "reverse",
                   "parameter", "constant", "tuple", "get-tuple-element", "copy-start",
                   "copy-done", "bitcast-convert", "iota", "gather", "scatter"})
# cuDNN and cuBLAS calls of XLA's GPU backend, by custom_call_target.
CONV_TARGETS = ("__cudnn$conv",)
DOT_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__cudnn$fmha", "__triton_gemm")


@dataclasses.dataclass
class Instruction:
  """One instruction of an HLO module's text: what the profile needs of it."""

  name: str
  opcode: str
  op_name: str = ""
  calls: tuple[str, ...] = ()
  target: str = ""
  operands: tuple[str, ...] = ()


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def _skip_shape(rest: str) -> str:
  """`rest` (what follows `name = `) from its opcode on: the shape, a tuple of shapes included,
  skipped."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[i + 1:].lstrip()
  return rest.split(" ", 1)[1] if " " in rest else ""


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[str]], str]:
  """(instructions by name, instruction names by computation, module name) of an HLO module's
  text (`compiled.as_text()`)."""
  instructions, computations, module, current = {}, {}, "", None
  for line in text.splitlines():
    if line.startswith("HloModule "):
      module = line.split()[1].rstrip(",")
      continue
    head = _COMPUTATION.match(line)
    if head and not line.startswith(" "):
      current = head.group(1)
      computations[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None or not line.startswith(" "):
      continue
    name, rest = m.groups()
    body = _skip_shape(rest)
    op = re.match(r"([a-z][a-z0-9\-]*)\(", body)
    if not op:
      continue
    calls = []
    for group in _CALLS.findall(rest):
      calls += [c.strip().lstrip("%") for c in group.strip("{}").split(",") if c.strip()]
    op_name = _OP_NAME.search(rest)
    target = _TARGET.search(rest)
    instructions[name] = Instruction(name, op.group(1), op_name.group(1) if op_name else "",
                                     tuple(calls), target.group(1) if target else "",
                                     tuple(re.findall(r"%([\w.\-]+)", _argument_list(body))))
    computations[current].append(name)
  for i in instructions.values():  # a fusion is named by its fused ops (its line has no name)
    if not i.op_name and i.opcode == "fusion":
      i.op_name = next((instructions[n].op_name for c in i.calls
                        for n in reversed(computations.get(c, ())) if instructions[n].op_name), "")
  for i in instructions.values():  # an op XLA made (a rewritten weight gradient): its inputs'
    if not i.op_name:
      i.op_name = _inherited_name(i, instructions)
  return instructions, computations, module


def _argument_list(body: str) -> str:
  """The operand list of `opcode(...)` at the start of `body`."""
  depth = 0
  for i, ch in enumerate(body):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if ch == ")" and depth == 0:
      return body[:i]
  return body


def _inherited_name(instruction: Instruction, instructions, depth: int = 3) -> str:
  """The name stack of an instruction XLA created, from its operands': a backward one
  (`transpose(...)`) if any is, else the first found (within `depth` producers)."""
  names = []
  for operand in instruction.operands:
    producer = instructions.get(operand)
    if producer is None:
      continue
    name = producer.op_name or (_inherited_name(producer, instructions, depth - 1) if depth else "")
    if name:
      names.append(name)
  return next((n for n in names if "transpose(" in n), names[0] if names else "")


def _opcodes(instruction: Instruction, instructions, computations, seen=None) -> set[str]:
  """The opcodes an instruction runs: its own and, for a fusion, those of its computations."""
  seen = set() if seen is None else seen
  ops = {instruction.opcode}
  if instruction.opcode in ("fusion", "custom-call", "reduce", "reduce-window", "map", "sort",
                            "select-and-scatter", "scatter", "all-reduce", "reduce-scatter"):
    for comp in instruction.calls:
      if comp in seen:
        continue
      seen.add(comp)
      for name in computations.get(comp, ()):
        ops |= _opcodes(instructions[name], instructions, computations, seen)
  return ops


def _in_scope(op_name: str, site: str) -> str | None:
  """What follows attention module `site` (e.g. 'block3/s_attn') in an op's name stack, or None
  when the op is not in it."""
  i = op_name.find(f"/{site}/")
  return None if i < 0 else op_name[i + len(site) + 2:]


def classify(instruction: Instruction, instructions: dict[str, Instruction],
             computations: dict[str, list[str]], sites: Iterable[str]) -> str | None:
  """The kind (KINDS) of an executed instruction, or None for a container (a loop or call whose
  own ops are traced apart)."""
  if instruction.opcode in CONTROL:
    return None
  ops = _opcodes(instruction, instructions, computations)
  op_name, target = instruction.op_name, instruction.target
  conv = "convolution" in ops or target.startswith(CONV_TARGETS)
  dot = "dot" in ops or target.startswith(DOT_TARGETS)
  in_attention = None
  for site in sites:
    rest = _in_scope(op_name, site)
    if rest is not None:
      in_attention = rest
      break
  if "/optimizer/" in f"/{op_name}/":
    return "optimiser update"
  # An attention module's own convolutions (its query, key and value maps) are convolutions;
  # its products and softmax come from its einsums, named by their spec ('bmk,bnk->bmn').
  own_conv = in_attention is not None and "/" in in_attention and re.fullmatch(
      r"[A-Za-z_]\w*", in_attention.split("/", 1)[0]) is not None
  if conv or (dot and own_conv):
    return "convolution gradients" if "transpose(" in op_name else "convolutions"
  if in_attention is not None:
    return "attention einsums" if dot else "attention softmax and element-wise"
  if dot:
    return "matmuls"
  if "_augment" in op_name:
    return "input augmentation"
  if ops & {"reduce-window", "select-and-scatter"}:
    return "pooling"
  if "reduce" in ops:
    return "reductions"
  if ops <= MOVES:
    return "copies and transposes"
  return "element-wise fusions"


def device_events(xplane_path: str, op_names: set[str], module: str
                  ) -> list[tuple[float, float, str]]:
  """(start ns, end ns, HLO op name) of every op of `module` the trace's devices ran: a GPU's
  "XLA Ops" line, or (a CPU) the host threads' events that carry an `hlo_op` stat."""
  data = ProfileData.from_file(xplane_path)
  events = []
  for plane in data.planes:
    device = plane.name.startswith("/device:")
    for line in plane.lines:
      if device and line.name != "XLA Ops":
        continue
      for e in line.events:
        stats = dict(e.stats)
        name = str(stats.get("hlo_op", e.name if device else "")).lstrip("%")
        if not name or stats.get("hlo_module", module) != module or name not in op_names:
          continue
        events.append((float(e.start_ns), float(e.start_ns) + float(e.duration_ns), name))
  return events


def attribute(intervals: list[tuple[float, float, str]]) -> tuple[dict[str, float], float]:
  """({kind: ns}, window ns) over the span of `intervals` (start, end, kind): each moment split
  evenly among the intervals running then, the moments when none runs counted as 'host gaps'."""
  if not intervals:
    return {}, 0.0
  lo = min(s for s, _, _ in intervals)
  hi = max(e for _, e, _ in intervals)
  edges = sorted([(s, 1, k) for s, _, k in intervals] + [(e, -1, k) for _, e, k in intervals],
                 key=lambda x: (x[0], x[1]))
  out: dict[str, float] = collections.defaultdict(float)
  running: collections.Counter = collections.Counter()
  count, prev = 0, lo
  for t, delta, kind in edges:
    if t > prev:
      if count == 0:
        out["host gaps"] += t - prev
      else:
        for k, c in running.items():
          if c:
            out[k] += (t - prev) * c / count
      prev = t
    running[kind] += delta
    count += delta
  return dict(out), hi - lo


def breakdown(hlo_text: str, xplane_path: str, steps: int, sites: Iterable[str]
              ) -> dict[str, Any]:
  """Seconds per step by kind of op (KINDS order) from a trace of `steps` steps of the program
  whose optimised HLO is `hlo_text`; 'step_s' is the traced window / steps."""
  instructions, computations, module = parse_hlo(hlo_text)
  sites = list(sites)
  kinds = {name: classify(i, instructions, computations, sites)
           for name, i in instructions.items()}
  events = device_events(xplane_path, set(instructions), module)
  intervals = [(s, e, kinds[name]) for s, e, name in events if kinds[name] is not None]
  by_kind, window = attribute(intervals)
  ops = collections.Counter(kinds[name] for _, _, name in events if kinds[name] is not None)
  return {"module": module, "steps": steps, "events": len(intervals),
          "step_s": window / steps / 1e9,
          "kinds": {k: by_kind.get(k, 0.0) / steps / 1e9 for k in KINDS},
          "ops_per_step": {k: ops.get(k, 0) / steps for k in KINDS if k != "host gaps"}}


def trace(run: Callable[[], Any], steps: int, logdir: str) -> dict[str, Any]:
  """Runs `run()` (one step, not waited for) `steps` times back to back under the profiler into
  `logdir`, waits for the last; returns the wall time and the trace's files."""
  os.makedirs(logdir, exist_ok=True)
  before = set(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
  jax.profiler.start_trace(logdir, create_perfetto_trace=True)
  started = time.perf_counter()
  try:
    out = None
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation("train", step_num=i):
        out = run()
    jax.block_until_ready(out)
    wall = time.perf_counter() - started
  finally:
    jax.profiler.stop_trace()
  new = sorted(set(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
               - before, key=os.path.getmtime)
  if not new:
    raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {logdir}")
  perfetto = glob.glob(os.path.join(os.path.dirname(new[-1]), "*perfetto_trace.json.gz"))
  return {"wall_s": wall, "xplane": new[-1], "perfetto": perfetto[0] if perfetto else None}


def format_table(profile: dict[str, Any]) -> str:
  """The kinds with their ms per step, share of the step and ops per step; then the total."""
  step = profile["step_s"]
  lines = [f"{'kind of op':<36}{'ms/step':>10}{'share':>8}{'ops/step':>10}"]
  for kind in KINDS:
    s = profile["kinds"][kind]
    if s or kind == "host gaps":
      n = profile["ops_per_step"].get(kind)
      lines.append(f"{kind:<36}{s * 1e3:>10.2f}{s / step:>8.1%}"
                   f"{'' if n is None else f'{n:>10.0f}'}")
  total = sum(profile["kinds"].values())
  lines.append(f"{'total (the traced step)':<36}{total * 1e3:>10.2f}{total / step:>8.1%}")
  lines.append(f"wall clock per step while traced: {profile['wall_s_per_step'] * 1e3:.2f} ms")
  return "\n".join(lines)
