"""Runs configs x folds x seeds, one work dir each, then prints the tables and comparisons.

The tables are the paper's Tables 1 and 2 (and more) from those runs, the comparisons the rows'
paired differences (jattn.evaluation.compare).

  jattn sweep                        # the paper's four rows, folds 1-5
  jattn sweep --set num_epochs=130 --set data_dir=/data/breakhis
  jattn sweep --demo                 # the four rows on the demo data, folds 1-2
  jattn sweep --rows resnet50        # the four rows on ResNet-50 (also --demo)
  jattn sweep --rows vit_s14         # the four rows on DINOv2 ViT-S/14 (also --demo)

Each run is `jattn train --config SPEC --workdir OUT/<name>/fold<k> --config.fold=k`
plus the `--set` overrides, its output appended to its work dir's log.txt. `--seeds 0,1,2` trains
every config and fold with each seed (`--config.seed=s`), seed 0 as above and seed s into
OUT/<name>/seed<s>/fold<k>; sweep.json records the rows, folds, seeds and runs. A finished run
(results.json present) is not repeated and an interrupted one resumes from its last checkpoint,
so the same command can be run again after any interruption. With several GPUs
(CUDA_VISIBLE_DEVICES, or all that nvidia-smi lists) one run goes to each GPU at a time;
otherwise runs go one after another. `--runs-per-device K` runs K at a time on each GPU (or on
the CPU), each given 0.9 / K of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION,
`jattn.perf.runs_per_device.memory_fraction`). The tables and paired comparisons come from
`jattn tables OUT`, which can also be run on its own, also while a sweep is still
running.

  jattn sweep --launcher slurm --partition gpu --gpus-per-run 1 --time 24:00:00

submits the unfinished runs to SLURM as one job array through submitit (`jattn.sweeps.slurm`),
requeued on preemption or time-out to resume from their checkpoints, and waits for them.
`--parallel-folds K` trains K consecutive folds of a config in one process
(`--config.parallel_folds=K --config.fold=<first>`, work dir `OUT/<name>/fold{fold}`); its
output goes to the first fold's log.txt.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from jattn.core import files
from jattn.core.errors import UserError
from jattn.evaluation import report, tables
from jattn.perf import runs_per_device as runs_per_device_lib
from jattn.training import compat, validate

# The repository that holds configs/ (a config spec is found relative to it, too) and sweeps/.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAPER_ROWS = ["configs/vgg19.py", "configs/vgg19_c.py", "configs/vgg19_s.py", "configs/ours.py"]
DEMO_ROWS = ["configs/demo.py:vgg19", "configs/demo.py:vgg19_c", "configs/demo.py:vgg19_s",
             "configs/demo.py:ours"]
RESNET50_ROWS = ["configs/resnet50.py", "configs/resnet50_c.py", "configs/resnet50_s.py",
                 "configs/resnet50_ours.py"]
DEMO_RESNET50_ROWS = ["configs/demo.py:resnet50", "configs/demo.py:resnet50_c",
                      "configs/demo.py:resnet50_s", "configs/demo.py:resnet50_ours"]
VIT_S14_ROWS = [f"configs/{r}.py" for r in ("vit_s14", "vit_s14_c", "vit_s14_s", "vit_s14_ours")]
DEMO_VIT_S14_ROWS = [f"configs/demo.py:{r}" for r in ("vit_s14", "vit_s14_c", "vit_s14_s",
                                                      "vit_s14_ours")]
ROWS = {"paper": (PAPER_ROWS, DEMO_ROWS), "resnet50": (RESNET50_ROWS, DEMO_RESNET50_ROWS),
        "vit_s14": (VIT_S14_ROWS, DEMO_VIT_S14_ROWS)}  # --rows


def plan(configs: list[str], folds: list[int], overrides: list[str],
         seeds: list[int] | None = None) -> list[dict]:
  """One entry per run: its config, fold, seed, name and work dir (configs are loaded to check
  them), seed by seed. Without `seeds`, each config's own seed (`config.seed`) in
  `<name>/fold<k>`, as before seeds; with them, `config.seed` set to each, seed 0 in
  `<name>/fold<k>` and seed s in `<name>/seed<s>/fold<k>` (tables.workdir)."""
  if seeds is not None and any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
    raise UserError("--set seed=... and --seeds: give the seeds with --seeds alone")
  runs = []
  for spec in configs:
    config = compat.load_config(_repo_path(spec), overrides)
    folds_of = validate.fold_range(config)  # the config's data source numbers its folds
    if not set(folds) <= set(folds_of):
      raise UserError(f"--folds {','.join(map(str, folds))}: {spec}'s folds are numbered 1 to "
                      f"{folds_of[-1]}")
    for seed in (config.seed,) if seeds is None else seeds:
      for fold in folds:
        run = {"config": spec, "name": config.name, "fold": fold, "seed": seed,
               "workdir": tables.workdir(config.name, fold, seed if seeds is not None else 0)}
        if seeds is not None and seed != config.seed:
          run["set_seed"] = True  # the command sets --config.seed
        runs.append(run)
  runs.sort(key=lambda r: r["seed"] if seeds is not None else 0)  # every row's seed 0 first
  keys = {(r["name"], r["fold"], r["seed"]) for r in runs}
  if len(keys) != len(runs):
    raise UserError("two configs in the sweep share a name; give each its own config.name")
  return runs


def parse_seeds(text: str | None) -> list[int] | None:
  """The seeds of `--seeds 0,1,2`: distinct integers >= 0, in the order given."""
  if text is None:
    return None
  try:
    seeds = [int(s) for s in text.split(",")]
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise UserError(f"--seeds {text!r}: give distinct seeds >= 0 like 0,1,2")
  return seeds


def _repo_path(spec: str) -> str:
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  return path + sep + arg


def write_manifest(out: str, runs: list[dict], folds: list[int], overrides: list[str]) -> None:
  names = list(dict.fromkeys(r["name"] for r in runs))
  seeds = sorted({r["seed"] for r in runs})
  manifest = {"names": names, "folds": folds, "seeds": seeds, "overrides": overrides,
              "runs": [{k: v for k, v in r.items() if k != "set_seed"} for r in runs]}
  files.atomic_write_text(os.path.join(out, "sweep.json"), json.dumps(manifest, indent=2))


def is_finished(out: str, run: dict) -> bool:
  return os.path.exists(os.path.join(out, run["workdir"], "results.json"))


def gpu_slots() -> list[str | None]:
  """One slot per local GPU (a CUDA_VISIBLE_DEVICES value), or [None] to run one at a time."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    ids = [d for d in visible.split(",") if d.strip()]
    return ids if len(ids) > 1 else [None]
  if shutil.which("nvidia-smi"):
    try:
      listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
      ids = [str(i) for i, line in enumerate(listed.stdout.splitlines()) if line.startswith("GPU")]
      return ids if len(ids) > 1 else [None]
    except (OSError, subprocess.SubprocessError):
      pass
  return [None]


def group_folds(runs: list[dict], parallel_folds: int) -> list[list[dict]]:
  """The runs each process trains: up to `parallel_folds` consecutive folds of one config and
  seed."""
  groups: list[list[dict]] = []
  for run in runs:
    last = groups[-1] if groups else None
    if (last and len(last) < parallel_folds and last[-1]["name"] == run["name"]
        and last[-1].get("seed") == run.get("seed") and run["fold"] == last[-1]["fold"] + 1):
      last.append(run)
    else:
      groups.append([run])
  return groups


def build_command(out: str, group: list[dict], overrides: list[str], parallel_folds: int = 1
                  ) -> list[str]:
  """The `jattn train` command that trains (or resumes) a group of runs, on any launcher.

  With parallel_folds > 1 the work dir is a template that jattn.main fills in for each fold.
  """
  first = group[0]
  workdir = os.path.join(out, first["workdir"])
  cmd = [sys.executable, "-m", "jattn.main", "--config", _repo_path(first["config"])]
  if parallel_folds > 1:
    cmd += ["--workdir", os.path.join(os.path.dirname(workdir), "fold{fold}"),
            f"--config.fold={first['fold']}", f"--config.parallel_folds={len(group)}"]
  else:
    cmd += ["--workdir", workdir, f"--config.fold={first['fold']}"]
  seed = [f"--config.seed={first['seed']}"] if first.get("set_seed") else []
  return cmd + seed + [f"--config.{o}" for o in overrides]


def run_command(cmd: list[str], workdir: str, gpu: str | None, runs_per_device: int = 1) -> int:
  """Runs a command in a subprocess, its output appended to WORKDIR/log.txt; its exit status.
  With `runs_per_device` K > 1 it gets its share of the device's memory."""
  os.makedirs(workdir, exist_ok=True)
  env = dict(runs_per_device_lib.environment(runs_per_device), PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  if gpu is not None:
    env["CUDA_VISIBLE_DEVICES"] = gpu
  with open(os.path.join(workdir, "log.txt"), "a") as log:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode


def _last_line(path: str) -> str:
  try:
    with open(path) as f:
      lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""
  except OSError:
    return ""


def _label(group: list[dict]) -> str:
  seed = f" seed {group[0]['seed']}" if group[0].get("set_seed") else ""
  return f"{group[0]['name']} fold{'s' if len(group) > 1 else ''} " + ",".join(
      str(r["fold"]) for r in group) + seed


def sweep(configs: list[str], folds: list[int], out: str, overrides: list[str],
          parallel_folds: int = 1, make_executor=None, seeds: list[int] | None = None,
          runs_per_device: int = 1) -> str:
  """Runs every unfinished run (configs x seeds x folds, `plan`), then writes and returns the
  tables (and the paired comparisons, SWEEP/compare.md).

  Runs go to the local GPUs (`runs_per_device` at a time on each), or, given `make_executor`
  (folder -> submitit executor), to one submitit job array (`jattn.sweeps.slurm`).
  """
  out = os.path.abspath(out)
  runs = plan(configs, folds, overrides, seeds)
  write_manifest(out, runs, folds, overrides)
  todo = [r for r in runs if not is_finished(out, r)]
  print(f"sweep {out}: {len(runs)} runs, {len(runs) - len(todo)} finished before, "
        f"{len(todo)} to run", flush=True)
  tasks = [{"runs": g, "cmd": build_command(out, g, overrides, parallel_folds),
            "workdir": os.path.join(out, g[0]["workdir"]), "log": "log.txt"}
           for g in group_folds(todo, parallel_folds)]
  lock = threading.Lock()
  started, durations, failures, finished = time.time(), [], [], [0]
  slots = gpu_slots() if make_executor is None else [None]
  slots = [slot for slot in slots for _ in range(runs_per_device)]  # K runs on each device

  def done(task: dict, error: str | None, seconds: float | None = None) -> None:
    """Reports a task that ended; `seconds` (local runs) also gives the time left."""
    with lock:
      durations.append(seconds if seconds is not None else time.time() - started)
      finished[0] += len(task["runs"])
      eta = ""
      if seconds is not None:  # local tasks run len(slots) at a time
        mean = sum(durations) / len(durations)
        eta = f"; about {(len(tasks) - len(durations)) * mean / len(slots) / 60:.0f} min left"
      print(f"[{len(runs) - len(todo) + finished[0]}/{len(runs)}] {_label(task['runs'])} "
            f"{'done' if error is None else f'FAILED ({error})'} after "
            f"{durations[-1] / 60:.1f} min{eta}", flush=True)
      if error is not None:
        failures.append((task, error))

  if make_executor is not None:
    from jattn.sweeps import slurm  # noqa: PLC0415 - submitit is needed only for this launcher

    slurm.submit_and_wait(out, tasks, make_executor, done)
  else:
    _run_local(tasks, slots, done, runs_per_device)
  if failures:
    task, status = failures[0]
    log = os.path.join(task["workdir"], task["log"])
    raise UserError(f"{_label(task['runs'])} failed ({status}): {_last_line(log)} (full log: "
                    f"{log}); fix it and run the sweep again, finished runs are kept")
  text, comparisons = report.write(out)  # checks every results.json before saying all is well
  print(f"all {len(runs)} runs finished in {(time.time() - started) / 60:.1f} min", flush=True)
  return text + "\n" + comparisons


def _run_local(tasks: list[dict], slots: list[str | None], done, runs_per_device: int = 1
               ) -> None:
  """One task per slot at a time: a local GPU's (K slots each with K runs per device), or the
  CPU's (one after another, or K at a time)."""
  free, lock = list(slots), threading.Lock()

  def work(task):
    with lock:
      gpu = free.pop()
      where = f" on GPU {gpu}" if gpu is not None else ""
      print(f"  start {_label(task['runs'])}{where}", flush=True)
    t0 = time.time()
    try:
      status = run_command(task["cmd"], task["workdir"], gpu, runs_per_device)
    finally:
      with lock:
        free.append(gpu)
    done(task, f"exit {status}" if status else None, time.time() - t0)
    return status

  with concurrent.futures.ThreadPoolExecutor(len(slots)) as pool:
    futures = [pool.submit(work, task) for task in tasks]
    for future in futures:
      if future.result() != 0 and len(slots) == 1:
        for f in futures:
          f.cancel()  # a failure (often bad input, the same for every run) stops the sweep
        break
