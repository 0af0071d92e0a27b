"""What the folder and TFDS sources share: a table of labelled images, their folds and one fold of
them as a `FoldData`.

A `Table` lists every image of a data set in the order of its decoded-image cache, with its class,
its group (the unit folds keep apart: a patient, a slide; each image its own group when the data
has none) and its value on each strata axis (reported separately, e.g. a centre). Folds are a CSV
of `fold,split,path` rows (`split` train or test, `path` an image's name in the table), or K
stratified group folds drawn by scikit-learn's `StratifiedGroupKFold` from `config.data.folds_seed`
and written to `<prepared_dir>/folds/` for reuse. The fold being run must keep every group on one
side and train on every class; another fold's problem is only a warning for this run.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from jattn.core import errors, files
from jattn.core.errors import UserError
from jattn.data import prepare, sources
from jattn.data.fold import ClassMap, FoldData, Strata

FOLDS_COLUMNS = ("fold", "split", "path")
SPLITS = ("train", "test")
# The one strata axis of a data set whose images have no strata: its value is the data set's name,
# so that every per-stratum figure has a column (the evaluator reports per stratum value).
DATASET_AXIS = "dataset"


def manifest_path(spec: str, data_dir: str) -> str:
  """A manifest CSV's absolute path ('' for none): as given (absolute, or found from the working
  folder), else relative to data_dir."""
  spec = os.path.expanduser(spec)
  if not spec:
    return ""
  if os.path.isabs(spec) or os.path.exists(spec):
    return os.path.abspath(spec)
  inside = os.path.join(os.path.abspath(os.path.expanduser(data_dir)), spec)
  return os.path.abspath(inside if os.path.exists(inside) else spec)


def names_of(value) -> tuple[str, ...]:
  """A config field that lists names: a comma-separated string or a sequence of strings."""
  if value is None:
    return ()
  items = value.split(",") if isinstance(value, str) else list(value)
  return tuple(str(v).strip() for v in items if str(v).strip())


def natural_key(text: str):
  """Orders '40X' before '100X' and 'centre2' before 'centre10'."""
  return [(0, int(part), "") if part.isdigit() else (1, 0, part)
          for part in re.split(r"(\d+)", text) if part]


def normalise_path(path: str) -> str:
  """A path as written in a CSV, in one form: '/' separators, no './' or 'a/../'."""
  path = posixpath.normpath(path.strip().replace("\\", "/"))
  return "" if path == "." else path


def short_list(names, limit: int = 3) -> str:
  names = list(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(map(str, names[:limit])) + more


@dataclasses.dataclass(frozen=True, eq=False)
class Table:
  """Every image of a labelled data set, in the order its cache holds them."""

  names: tuple[str, ...]  # unique: paths relative to the data's root, or TFDS split/index
  labels: np.ndarray  # int32 [N]: index into `classes`
  classes: tuple[str, ...]
  groups: tuple[str, ...] | None  # each image's group; None: each image is its own group
  strata: tuple[Strata, ...]  # at least one axis (DATASET_AXIS when the data has none)
  where: str  # the folder, manifest or data set, for messages
  group_unit: str = "group"

  @property
  def group_of(self) -> tuple[str, ...]:
    return self.groups if self.groups is not None else self.names


def classes_of(requested, found: Sequence[str], where: str, own: str) -> tuple[str, ...]:
  """The model's classes: `requested` (the source's `classes` field, `own` its group, e.g.
  'data.folder') in its order, or the labels `found` sorted by name (torchvision's ImageFolder
  order). Fewer than two is one line."""
  classes = names_of(requested) or tuple(sorted(set(found)))
  if len(set(classes)) != len(classes):
    repeated = sorted(c for c, n in collections.Counter(classes).items() if n > 1)
    raise UserError(f"--config.{own}.classes names {repeated[0]!r} twice: list each class once")
  if len(classes) < 2:
    raise UserError(f"{where} has a single class ({', '.join(classes) or 'none'}): a classifier "
                    f"needs images of at least two classes")
  return classes


def class_map(positive, classes: tuple[str, ...], own: str) -> ClassMap | None:
  """Two classes and the source's `positive_class` (`own` its group of fields) -> their map onto
  themselves with that one positive (sensitivity, specificity and ROC of P(positive)); '' ->
  None."""
  if not positive:
    return None
  if positive not in classes:
    raise UserError(f"--config.{own}.positive_class={positive!r} is not one of the classes "
                    f"{', '.join(classes)}")
  if len(classes) != 2:
    raise UserError(f"--config.{own}.positive_class={positive!r}: a positive class gives binary "
                    "figures (sensitivity, ROC), which need two classes, and the data has "
                    f"{len(classes)} "
                    f"({short_list(classes)}); leave it empty for per-class figures")
  return ClassMap(classes, tuple(range(len(classes))), classes.index(positive))


def make_strata(axes: Mapping[str, Sequence[str]], mpp: Sequence[float | None], mpp_note: str,
                dataset: str) -> tuple[Strata, ...]:
  """Strata axes from each image's value per axis (none given: one axis, `DATASET_AXIS`, whose
  value is `dataset`), with each value's microns per pixel where all its images agree."""
  n = len(mpp)
  axes = dict(axes) or {DATASET_AXIS: [dataset] * n}
  out = []
  for name, per_image in axes.items():
    values = tuple(sorted(set(per_image), key=natural_key))
    position = {v: i for i, v in enumerate(values)}
    index = np.asarray([position[v] for v in per_image], np.int32)
    scales = []
    for v in range(len(values)):
      known = {mpp[i] for i in np.flatnonzero(index == v)}
      scales.append(known.pop() if len(known) == 1 else None)
    known_any = any(s is not None for s in scales)
    out.append(Strata(name, values, index, tuple(scales) if known_any else (),
                      mpp_note if known_any else ""))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class Folds:
  """Which images each fold trains and tests on, by name."""

  source: str  # the folds file, or how they were generated
  splits: Mapping[int, Mapping[str, str]]  # fold -> name -> 'train' or 'test'


def folds_csv_text(folds: Folds) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(FOLDS_COLUMNS)
  for fold, split in folds.splits.items():
    for name, side in split.items():
      writer.writerow([fold, side, name])
  return out.getvalue()


def read_folds_csv(path: str) -> Folds:
  """A `fold,split,path` CSV; a malformed one (column, fold, split, repeated path) is one line."""
  if not os.path.isfile(path):
    raise UserError(f"folds file {path} does not exist: give a CSV of {','.join(FOLDS_COLUMNS)} "
                    f"rows, or --config.data.folds=generated")
  splits: dict[int, dict[str, str]] = collections.defaultdict(dict)
  first: dict[tuple[int, str], int] = {}
  read = files.read_csv(path)
  header = read.header
  missing = [c for c in FOLDS_COLUMNS if c not in header]
  if missing:
    raise UserError(f"{path} lacks the column(s) {', '.join(missing)}: a folds CSV has the "
                    f"columns {','.join(FOLDS_COLUMNS)} (found: {','.join(header) or 'none'})"
                    f"{files.separator_hint(header)}")
  for line, row in read.records():
    text = row["fold"].strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or int(text) < 1:
      raise UserError(f"{path} line {line}: fold {text!r} is not a fold number 1, 2, ...")
    side = row["split"].strip().lower()
    if side not in SPLITS:
      raise UserError(f"{path} line {line}: split {row['split']!r} is neither 'train' nor "
                      f"'test'")
    name = normalise_path(row["path"])
    if not name:
      raise UserError(f"{path} line {line}: empty path")
    fold = int(text)
    if (fold, name) in first:
      raise UserError(f"{path} line {line}: {name} is listed again in fold {fold} (first on "
                      f"line {first[fold, name]}); every image appears once per fold")
    first[fold, name] = line
    splits[fold][name] = side
  if not splits:
    raise UserError(f"{path} has a header but no rows")
  return Folds(os.path.abspath(path), dict(sorted(splits.items())))


def count_folds(path: str) -> int:
  """The folds of a folds CSV: numbered 1 to its largest fold number."""
  return max(read_folds_csv(path).splits)


def _digest(table: Table) -> str:
  text = json.dumps([table.names, table.labels.tolist(), table.groups])
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def generated_folds_path(prepared_dir: str, table: Table, num_folds: int, seed: int) -> str:
  """Where generated folds are written: named by K, the seed and a hash of the images' names,
  labels and groups (a changed table gets folds of its own)."""
  return os.path.join(prepared_dir, "folds",
                      f"folds_k{num_folds}_seed{seed}_{_digest(table)}.csv")


def group_index(table: Table) -> tuple[tuple[str, ...], np.ndarray]:
  """(group ids sorted by name, each image's index into them)."""
  ids = tuple(sorted(set(table.group_of)))
  position = {g: i for i, g in enumerate(ids)}
  return ids, np.asarray([position[g] for g in table.group_of], np.int32)


def check_generatable(table: Table, num_folds: int) -> list[str]:
  """Refuses fewer groups than folds; returns a warning per class with fewer groups than folds
  (some folds then test none of it)."""
  ids, groups = group_index(table)
  unit = table.group_unit
  if len(ids) < num_folds:
    raise UserError(f"{table.where} has {len(ids)} {unit}(s), fewer than the "
                    f"--config.data.num_folds={num_folds} folds to draw: lower "
                    "--config.data.num_folds or "
                    f"add data")
  out = []
  for c, name in enumerate(table.classes):
    count = len(np.unique(groups[table.labels == c]))
    if count < num_folds:
      out.append(f"class {name!r} of {table.where} has {count} {unit}(s), fewer than the "
                 f"{num_folds} folds: some folds test no {name} images"
                 + (f" (--config.data.num_folds={count} or fewer can test it in every fold)"
                    if count >= 2 else f" (it needs 2 {unit}s: one to train on, one to test)"))
  return out


def generate_folds(table: Table, num_folds: int, seed: int) -> Folds:
  """K folds, each group on one side, the classes' proportions kept as far as groups allow
  (scikit-learn's `StratifiedGroupKFold`, shuffled with `seed`); fold k tests the k-th part."""
  _, groups = group_index(table)
  splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  with warnings.catch_warnings():  # its warning counts images; `check_generatable` counts groups
    warnings.simplefilter("ignore", UserWarning)
    try:
      parts = list(splitter.split(np.zeros(len(table.names)), table.labels, groups))
    except ValueError as e:  # e.g. every class has fewer images than folds
      raise UserError(f"{table.where}: cannot draw {num_folds} stratified group folds ({e}); "
                      f"lower --config.data.num_folds or add data") from None
  splits = {}
  for fold, (_, test) in enumerate(parts, start=1):
    sides = np.full(len(table.names), "train", dtype=object)
    sides[test] = "test"
    splits[fold] = dict(zip(table.names, sides.tolist(), strict=True))
  return Folds(f"generated: {num_folds} stratified group folds (seed {seed})", splits)


def groups_per_class(table: Table) -> dict[str, int]:
  """Each class's number of distinct groups (patients, slides; an image is its own group when
  the data has none)."""
  _, groups = group_index(table)
  return {name: len(np.unique(groups[table.labels == c])) for c, name in enumerate(table.classes)}


def _what_to_do(table: Table, folds: Folds, fold: int, classes: list[str], generated: bool,
                side: str, own: str) -> str:
  """Why fold `fold` lacks `classes` on `side` and what to do: each class's group count against
  the number of folds, the numbers of folds that give every fold every class (at most the
  smallest class's group count), or which file to mend."""
  counts, unit, k = groups_per_class(table), table.group_unit, len(folds.splits)
  why = "; ".join(f"{c} has only {counts[c]} {unit}(s) for {k} folds" for c in classes)
  if not generated:
    return (f"{why}: give fold {fold} {side} images of {', '.join(classes)} in {folds.source}, "
            f"or draw folds with --config.data.folds=generated")
  fewest = min(counts.values())
  if fewest < 2:
    thin = [c for c, n in counts.items() if n < 2]
    return (f"{why}: a class needs at least 2 {unit}s (one to train on, one to test), which "
            f"{', '.join(thin)} lack(s): add {unit}s of {', '.join(thin)} or leave the class out "
            f"of --config.{own}.classes")
  return (f"{why}: with --config.data.num_folds={fewest} or fewer (the smallest class has {fewest} "
          f"{unit}s) every fold can train on and test every class")


def fold_problems(folds: Folds, fold: int, table: Table, generated: bool = False, *,
                  own: str) -> tuple[list[str], list[str]]:
  """(problems, warnings) of fold `fold`: a problem makes it unusable. A fold lacking a class
  says why (the class's groups against the folds) and what to do; `generated`: the folds were
  drawn by jattn (`--config.data.num_folds` then chooses their number); `own` is the source's group
  of fields ('data.folder')."""
  where = f"fold {fold} of {folds.source}"
  if fold not in folds.splits:
    return [f"{folds.source} has no fold {fold} (it has folds "
            f"{', '.join(map(str, folds.splits))})"], []
  split = folds.splits[fold]
  known = set(table.names)
  unknown = [n for n in split if n not in known]
  problems, warned = [], []
  if unknown:
    problems.append(f"{where} lists {len(unknown)} image(s) that are not in {table.where}: "
                    f"{short_list(unknown)}")
  sides = {s: [i for i, n in enumerate(table.names) if split.get(n) == s] for s in SPLITS}
  group_of = table.group_of
  unit = table.group_unit
  both = sorted({group_of[i] for i in sides["train"]} & {group_of[i] for i in sides["test"]})
  if both:
    problems.append(f"{where} puts {unit}(s) {short_list(both)} on both sides: their images are "
                    f"in train and in test (a split keeps each {unit} on one side)")
  for side in SPLITS:
    if not sides[side]:
      problems.append(f"{where} has no {side} images")
  if sides["train"]:
    trained = set(table.labels[sides["train"]].tolist())
    absent = [c for i, c in enumerate(table.classes) if i not in trained]
    if absent:
      problems.append(f"{where} has no training images of the class(es) {', '.join(absent)}: "
                      f"the model could never predict them; "
                      + _what_to_do(table, folds, fold, absent, generated, "training", own))
  if sides["test"]:
    tested = set(table.labels[sides["test"]].tolist())
    untested = [c for i, c in enumerate(table.classes) if i not in tested]
    if untested:
      warned.append(f"{where} has no test images of the class(es) {', '.join(untested)}; "
                    + _what_to_do(table, folds, fold, untested, generated, "test", own))
  left_out = len(table.names) - len(sides["train"]) - len(sides["test"])
  if left_out:
    warned.append(f"{where} leaves out {left_out} image(s) of {table.where}")
  return problems, warned


def validate_fold(folds: Folds, fold: int, table: Table, generated: bool = False, *,
                  own: str) -> list[str]:
  """Raises `UserError` on the first problem of fold `fold`; returns its warnings, and the other
  folds' problems as warnings (they do not stop a run of this one)."""
  problems, warned = fold_problems(folds, fold, table, generated, own=own)
  if problems:
    more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
    raise UserError(problems[0] + more)
  for other in folds.splits:
    if other != fold:
      warned += [f"{p} (fold {fold}, the one being run, is not affected)"
                 for p in fold_problems(folds, other, table, generated, own=own)[0]]
  return warned


def resolve_folds(config, table: Table, prepared_dir: str, *, root: str) -> tuple[Folds, list[str]]:
  """The folds `config.data.folds` names, fold `config.fold` checked, and the warnings about them:
  'generated' (read back where written before, else drawn; `save_generated` writes them), or a
  folds CSV (a relative path is also tried in the data's `root`). Writes nothing."""
  notes = []
  if config.data.folds == "generated":
    k, seed = config.data.num_folds, config.data.folds_seed
    notes += check_generatable(table, k)
    path = generated_folds_path(prepared_dir, table, k, seed)
    folds = read_folds_csv(path) if os.path.isfile(path) else generate_folds(table, k, seed)
  else:
    folds = read_folds_csv(folds_path(config.data.folds, root))
  return folds, notes + validate_fold(folds, config.fold, table, config.data.folds == "generated",
                                      own=f"data.{sources.of(config).NAME}")


def save_generated(config, table: Table, prepared_dir: str, folds: Folds) -> Folds:
  """Generated folds written to the prepared dir for reuse, once (call under its lock); the
  folds as read from there. Other folds are returned as they are."""
  if config.data.folds != "generated":
    return folds
  path = generated_folds_path(prepared_dir, table, config.data.num_folds, config.data.folds_seed)
  if not os.path.isfile(path):
    files.atomic_write_text(path, folds_csv_text(folds))
  return Folds(os.path.abspath(path), folds.splits)


def folds_path(spec: str, root: str) -> str:
  """A folds CSV named by `config.data.folds`: as given, else relative to the data's `root`."""
  spec = os.path.expanduser(spec)
  if os.path.isabs(spec) or os.path.exists(spec) or not os.path.exists(os.path.join(root, spec)):
    return os.path.abspath(spec)
  return os.path.abspath(os.path.join(root, spec))


def check_unchanged(prepared_dir: str, fingerprint: str, entries: Sequence, where: str) -> None:
  """Refuses a prepared dir made from other data than `entries` (what `fingerprint` digests, e.g.
  [name, size] per image, in order), naming what changed, as its `source.json` (`record_source`)
  recorded them; a prepared dir without one passes."""
  path = os.path.join(prepared_dir, "source.json")
  if not os.path.isfile(path):
    return
  recorded = files.read_json(path, f"delete {prepared_dir} to prepare again")
  if recorded["fingerprint"] == fingerprint:
    return
  old = [tuple(e) if isinstance(e, list) else e for e in recorded["entries"]]
  new = [tuple(e) if isinstance(e, list) else e for e in entries]
  added, removed = sorted(set(new) - set(old), key=str), sorted(set(old) - set(new), key=str)
  example = (added or removed or [None])[0]
  example = example[0] if isinstance(example, tuple) else example
  what = (f"{len(added)} added or resized, {len(removed)} removed or resized, e.g. {example}"
          if added or removed else "the same images in another order")
  raise UserError(f"the images of {where} changed since {prepared_dir} was prepared from them "
                  f"({what}): delete {prepared_dir} to prepare again, or set "
                  f"--config.data.prepared_dir to a new folder")


def record_source(prepared_dir: str, fingerprint: str, entries: Sequence) -> None:
  """Writes `source.json` (what `check_unchanged` compares against), once."""
  path = os.path.join(prepared_dir, "source.json")
  if not os.path.isfile(path):
    files.atomic_write_text(path, json.dumps({"fingerprint": fingerprint,
                                              "entries": [list(e) if isinstance(e, tuple) else e
                                                          for e in entries]}))


def fingerprint_of(entries: Sequence) -> str:
  return hashlib.sha256(json.dumps([list(e) if isinstance(e, tuple) else e
                                    for e in entries]).encode()).hexdigest()


def warn_all(messages: Sequence[str]) -> None:
  for message in messages:
    errors.warn(message)


def check_fields(config) -> None:
  """The fields the folder and TFDS sources share: num_folds (with generated folds) and mpp."""
  folds, k = config.data.folds, config.data.num_folds
  if folds == "generated" and not (isinstance(k, int) and k >= 2):
    raise UserError(f"--config.data.num_folds={k!r}: the number of folds to generate, at least 2")
  mpp = sources.settings(config).mpp
  if not isinstance(mpp, (int, float)) or mpp < 0:
    raise UserError(f"--config.{sources.field(config, 'mpp')}={mpp!r}: microns per pixel of the "
                    f"images, > 0 (0: unknown)")


def fold_data(config, *, source: str, table: Table, cache: prepare.Cache, folds: Folds | None,
              prepared_dir: str, binary: ClassMap | None) -> FoldData:
  """Fold `config.fold` of `table` (whose images `cache` holds, in the same order) as a FoldData,
  with the normalisation statistics of its training images (computed once, stored); with
  `folds=None`, every image as a test image and no statistics (`mean`, `std` NaN: external
  validation, where the run brings its own)."""
  if tuple(cache.file_names) != table.names:
    raise AssertionError("the decoded-image cache does not hold the table's images in its order")
  if folds is None:
    train = np.zeros(0, np.int64)
    test = np.arange(len(table.names), dtype=np.int64)
    mean = std = np.full(3, np.nan, np.float32)
    fold, folds_source = 0, f"every image of {table.where} (no folds)"
  else:
    split = folds.splits[config.fold]
    sides = np.array([split.get(n, "") for n in table.names])
    train = np.flatnonzero(sides == "train").astype(np.int64)
    test = np.flatnonzero(sides == "test").astype(np.int64)
    stats = prepare.stats_path(prepared_dir,
                               prepare.folds_id(folds.source, [table.names[i] for i in train]),
                               config.fold, config.image_size)
    mean, std = prepare.fold_stats(stats, cache.images, train)
    fold, folds_source = config.fold, folds.source
  group_ids, groups = group_index(table)
  return FoldData(
      source=source, images=cache.images, file_names=table.names, targets=table.labels,
      classes=table.classes, groups=groups, group_ids=group_ids, strata=table.strata,
      train_indices=train, test_indices=test, mean=mean, std=std, fold=fold,
      folds_source=folds_source, group_unit=table.group_unit, binary=binary)
