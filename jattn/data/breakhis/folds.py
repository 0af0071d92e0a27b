"""The five train/test folds of BreakHis, in the three forms a user may have.

1. `Folds.csv`, widely circulated with the data: columns `fold,mag,grp,filename`, `filename` the
   image's path relative to the folder that holds BreaKHis_v1 (`read_folds_csv`).
2. The `mkfold` tree the paper's authors used: `mkfold/fold<k>/{train,test}/<mag>/<file>.png`;
   membership is by file name (`read_mkfold`).
3. Neither: `generate_folds` draws 5 patient-disjoint ~70/30 splits from a seed, each fold an
   independent random split like the official ones, stratified by subtype (hence by class), and
   `write_folds_csv` writes them in the Folds.csv form so that a run can be repeated and shared.

The official protocol splits by patient. `check_folds` lists what makes a split unusable (a missing
fold, a patient on both sides, files that are not in the data set, a fold without training or test
images or without training images of a class) and what is only worth a warning (a magnification
without test images: it is absent from that fold's results). `validate_folds` refuses a run whose
own fold is unusable with a `UserError`; other folds' problems are only warnings for that run.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import io
import os
import re
from collections.abc import Iterable, Mapping

import numpy as np

from jattn.core import files
from jattn.core.errors import UserError
from jattn.data.breakhis import naming

FOLDS = (1, 2, 3, 4, 5)
GROUPS = ("train", "test")
COLUMNS = ("fold", "mag", "grp", "filename")
TEST_FRACTION = 0.3  # of each subtype's patients


@dataclasses.dataclass(frozen=True)
class Folds:
  """Which images each fold trains and tests on, by file name."""

  source: str  # the Folds.csv or mkfold folder read, or the generated file / description
  splits: Mapping[int, Mapping[str, str]]  # fold -> file name -> 'train' or 'test'

  def names(self, fold: int, group: str) -> set[str]:
    return {name for name, g in self.splits[fold].items() if g == group}


def _parse_mag(value: str) -> str | None:
  value = value.strip().upper().removesuffix("X")
  return f"{value}X" if f"{value}X" in naming.MAGNIFICATIONS else None


@functools.lru_cache(maxsize=1 << 16)  # a Folds.csv names each image once per fold
def _name_mag(name: str) -> str | None:
  try:
    return naming.parse_file_name(name).magnification
  except ValueError:
    return None  # not a BreakHis name: check_folds reports it as not in the data set


def read_folds_csv(path: str) -> Folds:
  """Reads a Folds.csv; a malformed one (column, fold, mag, grp, repeated row): `UserError`."""
  if not os.path.isfile(path):
    raise UserError(f"folds file {path} does not exist")
  read = files.read_csv(path)
  header = read.header
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise UserError(
        f"{path} lacks the column(s) {', '.join(missing)}: a Folds.csv needs the columns "
        f"{','.join(COLUMNS)} (found: {','.join(header) or 'no header'})"
        f"{files.separator_hint(header)}"
    )
  splits: dict[int, dict[str, str]] = collections.defaultdict(dict)
  first_line: dict[tuple[int, str], int] = {}
  for line, row in read.records():
    fold_text = row["fold"].strip()
    if not (fold_text.isascii() and fold_text.isdigit() and len(fold_text) <= 6
            and int(fold_text) in FOLDS):
      raise UserError(f"{path} line {line}: fold {fold_text!r} is not a fold number 1..5")
    fold = int(fold_text)
    group = row["grp"].strip().lower()
    if group not in GROUPS:
      raise UserError(f"{path} line {line}: grp {row['grp']!r} is neither 'train' nor 'test'")
    mag = _parse_mag(row["mag"])
    if mag is None:
      raise UserError(f"{path} line {line}: mag {row['mag']!r} is not one of 40, 100, 200, 400")
    name = row["filename"].strip().replace("\\", "/").rsplit("/", 1)[-1]
    if not name:
      raise UserError(f"{path} line {line}: empty filename")
    name_mag = _name_mag(name)
    if name_mag is not None and name_mag != mag:
      raise UserError(
          f"{path} line {line}: mag {row['mag']} disagrees with the file name {name} "
          f"(which says {name_mag}); fix the row"
      )
    if (fold, name) in first_line:
      raise UserError(
          f"{path} line {line}: {name} is listed again in fold {fold} (first on line "
          f"{first_line[fold, name]}); every image appears once per fold"
      )
    first_line[fold, name] = line
    splits[fold][name] = group
  if not splits:
    raise UserError(f"{path} has a header but no rows")
  return Folds(source=os.path.abspath(path), splits=dict(sorted(splits.items())))


def read_mkfold(path: str) -> Folds:
  """Reads an `mkfold/fold<k>/{train,test}/<mag>/<file>.png` tree (the folder or its parent)."""
  if os.path.isdir(os.path.join(path, "mkfold")):
    path = os.path.join(path, "mkfold")
  if not os.path.isdir(path):
    raise UserError(f"mkfold folder {path} does not exist")
  splits: dict[int, dict[str, str]] = {}
  for entry in sorted(os.listdir(path)):
    if not os.path.isdir(os.path.join(path, entry)) or entry.startswith("."):
      continue
    m = re.fullmatch(r"fold(\d+)", entry)
    if m is None or int(m[1]) not in FOLDS:
      raise UserError(f"{os.path.join(path, entry)}: expected fold folders fold1..fold5 in {path}")
    fold = int(m[1])
    splits[fold] = {}
    for group in sorted(os.listdir(os.path.join(path, entry))):
      group_dir = os.path.join(path, entry, group)
      if not os.path.isdir(group_dir) or group.startswith("."):
        continue
      if group not in GROUPS:
        raise UserError(f"{group_dir}: expected only train/ and test/ in {entry}/")
      for mag_name in sorted(os.listdir(group_dir)):
        mag_dir = os.path.join(group_dir, mag_name)
        if not os.path.isdir(mag_dir) or mag_name.startswith("."):
          continue
        mag = _parse_mag(mag_name)
        if mag is None:
          raise UserError(f"{mag_dir}: {mag_name!r} is not a magnification 40X, 100X, 200X, 400X")
        for name in sorted(os.listdir(mag_dir)):
          if name.startswith(".") or not name.lower().endswith(".png"):
            continue  # junk (Thumbs.db, .DS_Store, ._*)
          name_mag = _name_mag(name)
          if name_mag is not None and name_mag != mag:
            raise UserError(
                f"{os.path.join(mag_dir, name)} sits in {mag_name}/ but its name says {name_mag}"
            )
          if name in splits[fold]:
            raise UserError(
                f"{name} is in both {splits[fold][name]}/ and {group}/ of {entry} "
                f"(a split must not share images)"
            )
          splits[fold][name] = group
  if not splits:
    raise UserError(
        f"{path} holds no fold<k> folders: expected mkfold/fold<k>/{{train,test}}/<mag>/<file>.png"
    )
  return Folds(source=os.path.abspath(path), splits=dict(sorted(splits.items())))


def read_folds(path: str) -> Folds:
  """A Folds.csv file or an mkfold folder, whichever `path` is."""
  return read_mkfold(path) if os.path.isdir(path) else read_folds_csv(path)


def _test_count(num_patients: int, test_fraction: float) -> int:
  if num_patients < 2:
    return 0
  k = int(np.floor(test_fraction * num_patients + 0.5))  # round half up
  return min(max(k, 1), num_patients - 1)


def generate_folds(
    records: Iterable[naming.Record],
    seed: int,
    *,
    num_folds: int = len(FOLDS),
    test_fraction: float = TEST_FRACTION,
) -> Folds:
  """Patient-disjoint folds, each an independent random split, stratified by subtype and class.

  Each subtype with n >= 2 patients gives round(test_fraction * n) of them (at least 1) to the
  test side; a class left without test patients (only single-patient subtypes) gets one drawn from
  the class. Depends only on the records' patients and the seed.
  """
  records = list(records)
  by_subtype: dict[str, list[str]] = collections.defaultdict(list)
  label_of: dict[str, int] = {}
  for r in records:
    if r.patient_id not in label_of:
      label_of[r.patient_id] = r.label
      by_subtype[r.subtype].append(r.patient_id)
  splits = {}
  for fold in range(1, num_folds + 1):
    rng = np.random.default_rng([seed, fold])
    test: set[str] = set()
    for subtype in naming.SUBTYPE_CODES:
      patients = sorted(by_subtype.get(subtype, []))
      k = _test_count(len(patients), test_fraction)
      test.update(rng.choice(patients, k, replace=False).tolist() if k else [])
    for label in range(len(naming.CLASSES)):
      members = sorted(p for p, lab in label_of.items() if lab == label)
      if len(members) >= 2 and not test.intersection(members):
        test.add(str(rng.choice(members)))
    splits[fold] = {
        r.file_name: ("test" if r.patient_id in test else "train")
        for r in sorted(records, key=lambda r: r.file_name)
    }
  return Folds(source=f"generated (seed {seed})", splits=splits)


def folds_csv_text(folds: Folds, records: Iterable[naming.Record]) -> str:
  """The Folds.csv form of `folds`: one row per fold and image, paths from `records`."""
  path_of = {r.file_name: r.path for r in records}
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(COLUMNS)
  for fold, split in folds.splits.items():
    for name in sorted(split, key=lambda n: path_of.get(n, n)):
      mag = _name_mag(name) or ""
      writer.writerow([fold, mag.removesuffix("X"), split[name], path_of.get(name, name)])
  return out.getvalue()


def write_folds_csv(folds: Folds, records: Iterable[naming.Record], path: str) -> None:
  """Writes `folds` as a Folds.csv (atomically)."""
  files.atomic_write_text(path, folds_csv_text(folds, records))


def _names_list(names, limit: int = 3) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _check_fold(
    where: str,
    split: Mapping[str, str],
    by_name: Mapping[str, naming.Record],
    skipped_names: set[str],
    task: str,
) -> tuple[list[str], list[str]]:
  """(problems, warnings) of one fold's `split` against the records it may use (`by_name`)."""
  problems, warnings = [], []
  unknown = [n for n in split if n not in by_name and n not in skipped_names]
  if unknown:
    problems.append(
        f"{where} lists {len(unknown)} file(s) not in the data set (not on disk, misnamed or "
        f"left out): {_names_list(unknown)}"
    )
  dropped = [n for n in split if n in skipped_names]
  if dropped:
    warnings.append(f"{where}: dropped {len(dropped)} unreadable file(s): {_names_list(dropped)}")
  sides = {g: [by_name[n] for n, grp in split.items() if grp == g and n in by_name] for g in GROUPS}
  leaked = {r.patient_id for r in sides["train"]} & {r.patient_id for r in sides["test"]}
  if leaked:
    problems.append(
        f"{where} leaks patient(s) {_names_list(leaked)}: they have images in both train and "
        f"test (the protocol splits by patient)"
    )
  if not sides["train"]:
    problems.append(f"{where} has no training images")
  else:
    # Every class the model has an output for must be seen in training.
    present = {r.subtype if task == "subtype" else naming.CLASSES[r.label]
               for r in sides["train"]}
    absent = [c for c in naming.TASKS[task] if c not in present]
    if absent:
      what = "subtype(s)" if task == "subtype" else "class(es)"
      problems.append(f"{where} has no training images of the {what} {', '.join(absent)}")
  if not sides["test"]:
    problems.append(f"{where} has no test images")
  mags = {_name_mag(n) for n in split} | {r.magnification for r in by_name.values()}
  for group in GROUPS:
    have = {r.magnification for r in sides[group]}
    for mag in naming.MAGNIFICATIONS:
      if sides[group] and mag in mags and mag not in have:
        warnings.append(
            f"{where} has no {group} images at {mag}"
            + (": that magnification is absent from its results" if group == "test" else "")
        )
  left_out = [n for n in by_name if n not in split]
  if left_out:
    warnings.append(
        f"{where} leaves out {len(left_out)} image(s) of the data set: {_names_list(left_out)}"
    )
  return problems, warnings


def check_folds(
    folds: Folds,
    records: Iterable[naming.Record],
    *,
    skipped: Iterable[str] = (),
    magnifications: Iterable[str] = naming.MAGNIFICATIONS,
    task: str = "binary",
) -> tuple[list[str], list[str]]:
  """(problems, warnings) of every fold of `folds` against the data set's `records`.

  Problems make a fold unusable: a fold missing (of 1..5), a patient on both sides (a leak),
  listed files that are not in the data set, no training or no test images, a class (a subtype,
  for task 'subtype') without training images. Warnings: a magnification without test (or
  training) images, listed files skipped as unreadable (`skipped`, paths or names; they are
  dropped), images of the data set that a fold leaves out. Only images at `magnifications` count.
  """
  by_fold = check_by_fold(folds, records, skipped=skipped, magnifications=magnifications,
                          task=task)
  return ([p for fold in FOLDS for p in by_fold[fold][0]],
          [w for fold in FOLDS for w in by_fold[fold][1]])


def check_by_fold(
    folds: Folds,
    records: Iterable[naming.Record],
    *,
    skipped: Iterable[str] = (),
    magnifications: Iterable[str] = naming.MAGNIFICATIONS,
    task: str = "binary",
) -> dict[int, tuple[list[str], list[str]]]:
  """`check_folds` by fold: {1..5: (problems, warnings)}; a missing fold's problem is its own."""
  mags = set(magnifications)
  by_name = {r.file_name: r for r in records if r.magnification in mags}
  skipped_names = {s.rsplit("/", 1)[-1] for s in skipped}
  by_fold: dict[int, tuple[list[str], list[str]]] = {}
  for fold in FOLDS:
    if fold not in folds.splits:
      have = ", ".join(map(str, folds.splits)) or "none"
      by_fold[fold] = ([f"{folds.source} has no fold {fold} (it has folds {have})"], [])
      continue
    # A name of another magnification is not this run's concern (unparseable names still are).
    split = {n: g for n, g in folds.splits[fold].items() if _name_mag(n) in mags | {None}}
    by_fold[fold] = _check_fold(f"fold {fold} of {folds.source}", split, by_name, skipped_names,
                                task)
  return by_fold


def validate_folds(
    folds: Folds,
    records: Iterable[naming.Record],
    *,
    fold: int,
    skipped: Iterable[str] = (),
    magnifications: Iterable[str] = naming.MAGNIFICATIONS,
    task: str = "binary",
) -> list[str]:
  """Raises `UserError` on the first problem of fold `fold`; returns its warnings and, as
  warnings, the problems of the other folds (they do not stop a run of this one)."""
  by_fold = check_by_fold(folds, records, skipped=skipped, magnifications=magnifications,
                          task=task)
  problems, warnings = by_fold[fold]
  if problems:
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    raise UserError(
        f"{problems[0]}{more}; list them with `jattn data describe --source DATA_DIR "
        f"--folds {folds.source}`"
    )
  others = [f"{p} (fold {fold}, the one being run, is not affected)"
            for k in FOLDS if k != fold for p in by_fold[k][0]]
  return warnings + others


def generated_folds_path(prepared_dir: str, seed: int) -> str:
  return os.path.join(prepared_dir, "folds", f"Folds_generated_seed{seed}.csv")


def resolve_folds(
    spec: str,
    *,
    records: Iterable[naming.Record],
    data_dir: str,
    prepared_dir: str,
    seed: int,
) -> Folds:
  """The folds a config names: 'generated' (written once per seed to the prepared dir, then read
  back), or the path of a Folds.csv or an mkfold folder (relative paths also tried in data_dir).
  Call under the prepared dir's lock: it may write the generated file."""
  records = list(records)
  if spec == "generated":
    path = generated_folds_path(prepared_dir, seed)
    if not os.path.isfile(path):
      write_folds_csv(generate_folds(records, seed), records, path)
    return read_folds_csv(path)
  candidates = [spec] if os.path.isabs(spec) else [spec, os.path.join(data_dir, spec)]
  for candidate in candidates:
    if os.path.exists(candidate):
      return read_folds(candidate)
  raise UserError(
      f"folds {spec!r} is neither 'generated' nor an existing Folds.csv file or mkfold folder "
      f"(looked at {', '.join(os.path.abspath(c) for c in candidates)}); set --config.data.folds"
  )
