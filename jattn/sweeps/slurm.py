"""The sweep's SLURM launcher: unfinished runs as one submitit job array, one run (a config, fold
and seed) per array task.

`experiments/sweep.py --launcher slurm --partition P [--gpus-per-run N] [--time HH:MM:SS]
[--max-parallel K]` calls `submit_and_wait`. Each array task runs the same `jattn train`
command as the local launcher, its output appended to the run's log.txt. When SLURM preempts a
task or its time limit nears, submitit calls `RunTask.checkpoint`, which resubmits the same
command: jattn resumes the run from its last checkpoint. submitit's own files for a task (the
sbatch log, the pickled call) are in SWEEP/submitit/<job id>/, which the run's work dir links to
as `submitit`. Jobs outlive the sweep command: stopping it stops the waiting, not the runs.

The command learns when a task ends from its result file or from `sacct` (through submitit). If
sacct lists none of the jobs in SACCT_SILENT_CALLS calls in a row (accounting off, or the jobs
unknown to it), it stops waiting with one line: the jobs keep running, and the same command, once
they have ended, resubmits what did not finish.

The executor is a function of that folder, so tests pass submitit's local executor: real
subprocesses through the same code path as SLURM, sbatch aside.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

from jattn.core.errors import UserError


def _import_submitit():
  """submitit configures logging when imported (logging.config.dictConfig), which closes every
  handler already installed (pytest's, a notebook's): import it without that (its warnings reach
  the root logger). Jobs, started afresh, configure it as usual."""
  level = os.environ.get("SUBMITIT_LOG_LEVEL")
  os.environ["SUBMITIT_LOG_LEVEL"] = "NOCONFIG"
  try:
    import submitit  # noqa: PLC0415
  finally:
    if level is None:
      del os.environ["SUBMITIT_LOG_LEVEL"]
    else:
      os.environ["SUBMITIT_LOG_LEVEL"] = level
  return submitit


submitit = _import_submitit()

# The repository, which holds configs/ (three folders above this file).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A run may need many time slots (130 epochs at 224x224): requeue it this often on a time limit.
MAX_TIMEOUTS = 50
# Consecutive sacct calls that list none of the jobs before the sweep stops waiting. submitit calls
# sacct 4 s after the submission, then at doubling intervals up to one every 10 min: 8 silent calls
# from the submission take about 6 minutes.
SACCT_SILENT_CALLS = 8
POLL_S = 2.0  # how often the sweep looks for ended tasks (submitit calls sacct less often)


def parse_time(value: str) -> int:
  """Minutes of an HH:MM:SS time limit (as sbatch --time), refusing anything else."""
  match = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d)", value or "")
  if not match:
    raise UserError(f"--time {value!r}: give the time limit of one run as HH:MM:SS, e.g. 12:00:00")
  hours, minutes, seconds = (int(g) for g in match.groups())
  total = hours * 60 + minutes + (1 if seconds else 0)
  if total < 1:
    raise UserError(f"--time {value!r}: give at least 00:01:00")
  return total


def slurm_executor(partition: str | None, gpus_per_run: int, time: str,
                   max_parallel: int | None) -> Callable[[str], submitit.Executor]:
  """Checks the SLURM options (before the sweep writes anything) and returns the executor maker."""
  for command in ("sbatch", "srun", "sacct"):  # sacct: how the sweep learns that jobs ended
    if shutil.which(command) is None:
      raise UserError(f"--launcher slurm: no {command} on PATH; run the sweep on a SLURM login "
                      f"node, or use --launcher local")
  if not partition:
    raise UserError("--launcher slurm needs --partition P: the partition to submit to (sinfo -s "
                    "lists them)")
  timeout_min = parse_time(time)
  if gpus_per_run < 0 or (max_parallel is not None and max_parallel < 1):
    raise UserError("--gpus-per-run must be >= 0 and --max-parallel >= 1")

  def make(folder: str) -> submitit.Executor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(
        name="jattn", slurm_partition=partition, timeout_min=timeout_min, nodes=1,
        tasks_per_node=1, gpus_per_node=gpus_per_run, cpus_per_task=max(4, 4 * gpus_per_run),
        **({"slurm_array_parallelism": max_parallel} if max_parallel else {}))
    return executor

  return make


class RunTask(submitit.helpers.Checkpointable):
  """One array task: runs a jattn command; on preemption or time-out submitit calls the inherited
  `checkpoint`, which resubmits this same call (the run resumes from its last checkpoint)."""

  def __call__(self, cmd: list[str], workdir: str, log_name: str = "log.txt") -> str:
    env = submitit.JobEnvironment()
    _link(os.path.join(workdir, "submitit"), str(env.paths.folder))
    with open(os.path.join(workdir, log_name), "a") as log:
      log.write(f"$ {' '.join(cmd)}  (job {env.job_id})\n")
      log.flush()
      # SIGUSR2 (SLURM's warning before preemption or the time limit) is for this process:
      # submitit's handler saves this call for the requeued job and exits, and subprocess.run
      # kills the command on the way out. The command itself ignores the signal.
      status = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(),
                              cwd=REPO, preexec_fn=_ignore_usr2).returncode
    if status:
      raise RuntimeError(f"{' '.join(cmd)} failed (exit {status}); see {log.name}")
    return workdir


def _env() -> dict[str, str]:
  return dict(os.environ, PYTHONPATH=os.pathsep.join(
      [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _ignore_usr2() -> None:
  signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _link(path: str, target: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)
  os.symlink(os.path.relpath(target, os.path.dirname(path)), path)


@contextlib.contextmanager
def _repo_importable() -> Iterator[None]:
  """Jobs unpickle RunTask from this repository: they inherit PYTHONPATH from the submitter."""
  before = os.environ.get("PYTHONPATH")
  os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]
  try:
    yield
  finally:
    if before is None:
      os.environ.pop("PYTHONPATH")
    else:
      os.environ["PYTHONPATH"] = before


def submit_and_wait(out: str, tasks: list[dict], make_executor: Callable[[str], submitit.Executor],
                    on_done: Callable[[dict, str | None], None]) -> None:
  """Submits one job array (a task per entry of `tasks`: cmd, workdir, log) and waits for it,
  calling on_done(task, error) as each task ends."""
  if not tasks:
    return
  folder = os.path.join(out, "submitit", "%j")
  executor = make_executor(folder)
  for task in tasks:
    os.makedirs(task["workdir"], exist_ok=True)
  said = io.StringIO()  # what submitit prints while submitting (a refusing sbatch's stderr)
  with _repo_importable():
    try:
      with contextlib.redirect_stderr(said):
        jobs = executor.map_array(RunTask(), [t["cmd"] for t in tasks],
                                  [t["workdir"] for t in tasks], [t["log"] for t in tasks])
    except submitit.core.utils.FailedSubmissionError as e:
      printed = re.search(r'sbatch output "(.*)"\nJob instance', str(e), re.DOTALL)
      raise UserError(f"sbatch printed {(printed.group(1) if printed else str(e)).strip()!r}, "
                      f"not 'Submitted batch job <id>': the array may have been submitted "
                      f"without its id; check `squeue --me` (scancel it) before running the sweep "
                      f"again") from None
    except submitit.core.utils.FailedJobError as e:
      lines = [line for line in (str(e) or said.getvalue()).splitlines() if line.strip()]
      raise UserError(f"sbatch refused the job array: {lines[-1] if lines else 'no message'}; "
                      f"check --partition, --gpus-per-run and --time against `sinfo`") from None
  sys.stderr.write(said.getvalue())
  ids = jobs[0].job_id + ("" if len(jobs) == 1 else f" to {jobs[-1].job_id}")
  print(f"submitted {len(jobs)} job(s), {ids}; their submitit files are in {out}/submitit/<job "
        f"id>/, linked from each run's work dir as 'submitit'", flush=True)
  by_job = {job.job_id: task for job, task in zip(jobs, tasks, strict=True)}
  later = (f"the jobs keep running (squeue --me). Run the same command when they have ended to "
           f"resubmit what did not finish, or `jattn tables {out}` for the tables so far.")
  try:
    for job in _as_completed(jobs, ids, later):
      try:
        job.result()
        on_done(by_job[job.job_id], None)
      except Exception as e:  # noqa: BLE001 - a failed run is reported, the others go on
        on_done(by_job[job.job_id], f"job {job.job_id}: {type(e).__name__}")
    with contextlib.suppress(OSError):
      os.rmdir(folder)  # submitit's local executor also makes the folder as named, empty
  except KeyboardInterrupt:
    print(f"stopped waiting; {later}", flush=True)
    raise SystemExit(130) from None


class _SacctWatcher(submitit.slurm.slurm.SlurmInfoWatcher):
  """submitit's sacct poller, counting the calls in a row in which sacct listed none of the jobs
  (it failed, printed nothing, or only other jobs)."""

  def __init__(self, job_ids: list[str]):
    super().__init__(delay_s=600)  # as submitit's own SLURM watcher
    self.silent_calls = 0
    self.job_ids = set(job_ids)
    for job_id in job_ids:
      self.register_job(job_id)

  def update(self) -> None:
    self.silent_calls += 1  # reset by read_info when sacct lists a job
    super().update()

  def read_info(self, string):
    info = super().read_info(string)
    if any(job_id in info for job_id in self.job_ids):
      self.silent_calls = 0
    return info


def _as_completed(jobs: list, ids: str, later: str) -> Iterator:
  """The jobs as they end (submitit's `as_completed`), or a `UserError` when sacct has stayed
  silent about all of them for SACCT_SILENT_CALLS calls (SLURM jobs only)."""
  watcher = None
  if isinstance(jobs[0], submitit.SlurmJob):
    watcher = _SacctWatcher([job.job_id for job in jobs])
    for job in jobs:
      job.watcher = watcher  # this wait's own poller (submitit's is shared by every job)
  started, pending = time.monotonic(), list(jobs)
  while pending:
    for job in [j for j in pending if j.done()]:
      pending.remove(job)
      yield job
    if pending and watcher is not None and watcher.silent_calls >= SACCT_SILENT_CALLS:
      seconds = time.monotonic() - started
      waited = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
      what = f"job {ids}" if len(jobs) == 1 else f"jobs {ids}"
      raise UserError(f"sacct has listed none of {what} in {watcher.silent_calls} calls in a row "
                      f"({waited} of waiting), so this command cannot tell when they end and "
                      f"stops waiting; {later}")
    if pending:
      time.sleep(POLL_S)
