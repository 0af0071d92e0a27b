"""Hostile user files, round three: the manifest's absolute and `..` paths, a dangling link in a
class folder, a manifest that is not UTF-8 or holds a cell over the csv module's field limit, and
the same eye on every other reader of a user's CSV or JSON (folds CSVs, BreakHis' Folds.csv, slide
labels, the predict command's manifest, a sweep's sweep.json).

Each refusal is one line naming the file (and line), exit status 2 through the command line, and
nothing written into the prepared dir. The property-based tests feed generated CSVs (encodings,
quoting, blank rows, huge fields, odd paths, a byte-order mark) to the manifest and folds readers:
what they load is compared with what was generated, and anything else must be a one-line
`UserError` naming the file.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import types

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from jattn import main
from jattn.core.errors import UserError
from jattn.data import folder, labelled, load_fold
from jattn.data.breakhis import folds as breakhis_folds
from jattn.evaluation import tables
from jattn.inference import predict
from jattn.slides import cohort
from tests.conftest import data_config
from tests.runs import DEMO, tiny_overrides
from tests.test_hostile import one_line_error, snapshot

LIMIT = 131_072  # the csv module's default field size limit

COLOURS = {"adipose/a0.png": (200, 10, 10), "adipose/a1.png": (10, 200, 10),
           "adipose/a2.png": (10, 10, 200), "tumour/t0.png": (250, 250, 0),
           "tumour/t1.png": (0, 250, 250), "tumour/t2.png": (250, 0, 250)}


def _images(root) -> dict[str, tuple]:
  """Writes a solid-colour 8x8 PNG per name of COLOURS under `root`; returns COLOURS."""
  for name, colour in COLOURS.items():
    os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(os.path.join(root, name))
  return COLOURS


def _manifest(path, rows, encoding="utf-8", header="path,label,patient") -> str:
  with open(path, "w", encoding=encoding, newline="") as f:
    f.write(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
  return str(path)


def _rows(paths) -> list[tuple[str, str, str]]:
  """(path as written, label, patient) per image of COLOURS, `paths` mapping its name."""
  return [(paths(name), name.split("/")[0], name.split("/")[1][:2]) for name in COLOURS]


def _refused_cli(tmp_path, capsys, pattern, **overrides) -> str:
  """The training command on the folder source: one line matching `pattern`, exit 2, nothing
  written anywhere under tmp_path (no prepared dir, no run dir)."""
  kw = {"dataset": "folder", "tie_rule": "adipose", "num_folds": 2, **overrides}
  args = ["--config", DEMO, "--workdir", str(tmp_path / "run"),
          *[f"--config.{o}" for o in tiny_overrides(kw.pop("data_dir", "unused"), "", **kw)]]
  before = snapshot(tmp_path)
  err = one_line_error(lambda: main.main(args), capsys, "jattn train", pattern)
  assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
  prepared = [os.path.join(r, d) for r, dirs, _ in os.walk(tmp_path) for d in dirs
              if d == "jattn_prepared"]
  assert prepared == []
  return err


# ------------------------------------------------------------------------------------------------
# Paths in a manifest: absolute ones, and `..` leaving its folder.


def _colour_of(data, name) -> tuple:
  return tuple(int(v) for v in data.images[data.file_names.index(name)].reshape(-1, 3)[0])


def test_an_absolute_manifest_path_is_read_where_it_points(tmp_path):
  """The README's 'paths relative to the CSV's folder (or absolute)': an absolute path is not
  joined onto the manifest's folder; every cached image has the colour of the file its row
  names (the colours written here, not what jattn decodes)."""
  images = tmp_path / "images"
  colours = _images(images)
  listed = tmp_path / "lists"
  listed.mkdir()
  absolute = {"adipose/a0.png", "tumour/t1.png"}
  manifest = _manifest(listed / "m.csv", _rows(
      lambda n: str(images / n) if n in absolute else f"../images/{n}"))
  d = load_fold(data_config("unused", str(tmp_path / "p"), dataset="folder", manifest=manifest,
                            group="patient", num_folds=2, fold=1))
  expected = [str(images / n) if n in absolute else f"../images/{n}" for n in colours]
  assert list(d.file_names) == expected
  for name, written in zip(colours, expected, strict=True):
    assert _colour_of(d, written) == colours[name]


def test_dotdot_paths_are_read_as_written_and_match_the_folds(tmp_path):
  """A `..` that leaves the manifest's folder is allowed as written (README): the image is the
  file `..` leads to, and a folds CSV naming it the same way picks it out."""
  colours = _images(tmp_path / "images")
  (tmp_path / "sub").mkdir()
  manifest = _manifest(tmp_path / "sub" / "m.csv", _rows(lambda n: f"./x/../../images/{n}"))
  test = {"adipose/a0.png", "tumour/t0.png"}
  with open(tmp_path / "sub" / "folds.csv", "w") as f:
    f.write("fold,split,path\n" + "".join(
        f"1,{'test' if n in test else 'train'},../images/{n}\n" for n in colours))
  d = load_fold(data_config("unused", str(tmp_path / "p"), dataset="folder", manifest=manifest,
                            group="patient", folds=str(tmp_path / "sub" / "folds.csv"), fold=1))
  assert list(d.file_names) == [f"../images/{n}" for n in colours]
  assert {d.file_names[i] for i in d.test_indices} == {f"../images/{n}" for n in test}
  for name in colours:
    assert _colour_of(d, f"../images/{name}") == colours[name]


# ------------------------------------------------------------------------------------------------
# One line, exit 2, nothing prepared: through the command line.


def test_a_latin1_manifest_is_one_line_naming_the_fix(tmp_path, capsys):
  """Latin-1 (as spreadsheets save): one line that says it is not UTF-8, where, and the fix."""
  _images(tmp_path)
  rows = _rows(lambda n: n)
  rows[3] = (rows[3][0], rows[3][1], "José")
  manifest = _manifest(tmp_path / "m.csv", rows, encoding="latin-1")
  _refused_cli(tmp_path, capsys, rf"{re.escape(manifest)} is not UTF-8 text \(byte 0xe9 on line "
               r"5; perhaps Latin-1 .*\): save it as UTF-8", manifest=manifest, group="patient")


def test_a_cell_over_the_field_limit_is_one_line_naming_the_row(tmp_path, capsys):
  _images(tmp_path)
  rows = _rows(lambda n: n)
  rows[2] = (rows[2][0], rows[2][1], "p" * (LIMIT + 1))
  manifest = _manifest(tmp_path / "m.csv", rows)
  _refused_cli(tmp_path, capsys, rf"{re.escape(manifest)} line 4: a field longer than 131,072 "
               r"characters", manifest=manifest, group="patient")


def test_a_dangling_link_in_a_class_folder_is_one_line(tmp_path, capsys):
  data = tmp_path / "data"
  _images(data)
  link = data / "tumour" / "moved.png"
  os.symlink(data / "elsewhere" / "moved.png", link)
  _refused_cli(tmp_path, capsys, rf"{re.escape(str(link))} in class folder "
               rf"{re.escape(str(data / 'tumour'))} is a symbolic link to "
               rf"{re.escape(str(data / 'elsewhere' / 'moved.png'))}, which does not exist",
               data_dir=str(data))


def test_a_manifest_row_naming_a_dangling_link_says_so(tmp_path):
  _images(tmp_path)
  os.symlink(tmp_path / "gone.png", tmp_path / "tumour" / "t9.png")
  manifest = _manifest(tmp_path / "m.csv", [*_rows(lambda n: n), ("tumour/t9.png", "tumour", "t9")])
  config = data_config("unused", "", dataset="folder", manifest=manifest, group="patient")
  with pytest.raises(UserError, match=rf"{re.escape(manifest)} line 8: .*t9\.png is a symbolic "
                     r"link to .*gone\.png, which does not exist"):
    folder.read_manifest(config)


def test_an_infinite_mpp_is_refused(tmp_path):
  _images(tmp_path)
  rows = [(*r, "inf" if i == 1 else "0.5") for i, r in enumerate(_rows(lambda n: n))]
  manifest = _manifest(tmp_path / "m.csv", rows, header="path,label,patient,mpp")
  config = data_config("unused", "", dataset="folder", manifest=manifest, group="patient")
  with pytest.raises(UserError, match=rf"{re.escape(manifest)} line 3: mpp 'inf' is not a "
                     r"positive number"):
    folder.read_manifest(config)


def test_a_semicolon_separated_manifest_says_so(tmp_path):
  manifest = tmp_path / "m.csv"
  manifest.write_text("path;label\na/1.png;x\n")
  config = data_config("unused", "", dataset="folder", manifest=str(manifest))
  with pytest.raises(UserError, match=r"has no column 'path': its columns are path;label \(its "
                     r"header looks separated by semicolons: save it comma-separated"):
    folder.read_manifest(config)


# ------------------------------------------------------------------------------------------------
# The other readers of a user's CSV or JSON.


def test_a_folds_csv_not_in_utf8_or_with_an_odd_fold_is_one_line(tmp_path):
  path = tmp_path / "folds.csv"
  path.write_bytes("fold,split,path\n1,train,caf\xe9.png\n".encode("latin-1"))
  with pytest.raises(UserError, match=rf"{re.escape(str(path))} is not UTF-8 text \(byte 0xe9 on "
                     r"line 2"):
    labelled.read_folds_csv(str(path))
  for fold in ("²", "9" * 5000):  # a digit int() refuses; more digits than int() converts
    path.write_text(f"fold,split,path\n1,train,a.png\n{fold},test,a.png\n")
    with pytest.raises(UserError, match=rf"{re.escape(str(path))} line 3: fold .* is not a fold "
                       r"number 1, 2"):
      labelled.read_folds_csv(str(path))


def test_a_breakhis_folds_csv_not_in_utf8_or_with_an_odd_fold_is_one_line(tmp_path):
  path = tmp_path / "Folds.csv"
  name = "SOB_B_A-14-22549AB-40-001.png"
  path.write_bytes(f"fold,mag,grp,filename\n1,40,train,{name}\n1,40,test,\xe9.png\n"
                   .encode("latin-1"))
  with pytest.raises(UserError, match=rf"{re.escape(str(path))} is not UTF-8 text \(byte 0xe9 on "
                     r"line 3"):
    breakhis_folds.read_folds_csv(str(path))
  path.write_text(f"fold,mag,grp,filename\n²,40,train,{name}\n")
  with pytest.raises(UserError, match=r"line 2: fold '²' is not a fold number 1\.\.5"):
    breakhis_folds.read_folds_csv(str(path))


def _plans(*names):
  return [types.SimpleNamespace(name=n, path=f"/slides/{n}.svs") for n in names]


def test_slide_labels_not_in_utf8_are_one_line_and_lines_count_blank_rows(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_bytes("slide,label\ns0,b\xe9nign\n".encode("latin-1"))
  with pytest.raises(UserError, match=rf"--labels {re.escape(str(path))} is not UTF-8 text "
                     r"\(byte 0xe9 on line 2"):
    cohort.read_labels(str(path), _plans("s0"), ("benign", "malignant"), "malignant")
  # A blank row and a quoted note over two lines before it: the bad label is on line 6.
  path.write_text('slide , label,note\ns0,malignant,x\n\ns1,benign,"two\nlines"\ns2,tumour,\n')
  with pytest.raises(UserError, match=r"line 6: label 'tumour' is none of benign, malignant"):
    cohort.read_labels(str(path), _plans("s0", "s1", "s2"), ("benign", "malignant"), "malignant")
  path.write_text("\ufeffslide , label\ns0,malignant\ns1,0\n")  # BOM, spaces around the names
  assert cohort.read_labels(str(path), _plans("s0", "s1"), ("benign", "malignant"),
                            "malignant") == {"s0": 1, "s1": 0}


def test_the_predict_manifest_with_a_huge_cell_is_one_line(tmp_path):
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  path = tmp_path / "m.csv"
  path.write_text(f"path,label\na.png,{'x' * (LIMIT + 1)}\n")
  with pytest.raises(UserError, match=rf"--manifest {re.escape(str(path))} line 2: a field longer "
                     r"than 131,072 characters"):
    predict.read_manifest(str(path))


def test_a_sweep_json_not_in_utf8_is_one_line(tmp_path):
  (tmp_path / "sweep.json").write_bytes('{"names": ["caf\xe9"], "folds": [1]}'.encode("latin-1"))
  with pytest.raises(UserError, match=r"sweep\.json is not valid JSON \(truncated or damaged: "
                     r"'utf-8' codec can't decode"):
    tables.collect(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Property-based: generated manifests and folds CSVs.

ENCODINGS = ("utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16")  # each UTF-8 mostly
# Letters of Latin-1 that are lead bytes in UTF-8 (0xc0-0xff), none of its continuation bytes
# (0x80-0xbf), and never followed by one ('²' of FOLDS only stands between delimiters): a Latin-1
# file holding any non-ASCII letter here is never valid UTF-8.
LATIN = "ÀÉÑÖÜßàéñöüÿ"
NAME_CHARS = "abcXYZ019 _-,;'\"#()[]&+=" + LATIN + "αβ漢字"
VALUE_CHARS = NAME_CHARS + ".\n\t"
BLANK_ROWS = ("", ",", " , ,", "  ")
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _value(chars=VALUE_CHARS, max_size=10):
  """A non-empty value without white space at its ends (the readers strip it)."""
  return st.text(st.sampled_from(chars), min_size=1, max_size=max_size).map(
      lambda v: v.strip() or "v")


@st.composite
def _layout(draw, n):
  """How a CSV of n rows is written: encoding, quoting, line ends, blank rows before each row,
  and which row (if any) gets a field over the limit in its last column."""
  return {"encoding": draw(st.sampled_from(ENCODINGS)),
          "quoting": draw(st.sampled_from((csv.QUOTE_MINIMAL, csv.QUOTE_ALL,
                                           csv.QUOTE_NONNUMERIC))),
          "newline": draw(st.sampled_from(("\n", "\r\n"))),
          "blank": [draw(st.lists(st.sampled_from(BLANK_ROWS), max_size=2)) for _ in range(n)],
          "huge": draw(st.none() | st.none() | st.none() | st.integers(0, n - 1))}


def _render(columns, rows, layout) -> tuple[bytes, list[int], str | None]:
  """The CSV's bytes, each row's line (as a reader counts lines: its last one) and the refusal
  its encoding or a huge field must give (None: neither)."""
  newline = layout["newline"]

  def line_of(values):
    out = io.StringIO()
    csv.writer(out, quoting=layout["quoting"], lineterminator=newline).writerow(values)
    return out.getvalue()

  pieces, ends = [line_of(columns)], []
  for i, row in enumerate(rows):
    pieces += [b + newline for b in layout["blank"][i]]
    values = [row[c] for c in columns]
    if layout["huge"] == i:
      values[-1] = "h" * (LIMIT + 1)
    pieces.append(line_of(values))
    ends.append(sum(p.count("\n") for p in pieces))
  text, encoding = "".join(pieces), layout["encoding"]
  if encoding == "latin-1":  # what Latin-1 cannot hold becomes a letter it can
    text = "".join(c if ord(c) < 256 else "é" for c in text)
  if encoding == "utf-16":
    refusal = r"is UTF-16 text \(it starts with a UTF-16 byte-order mark\), not UTF-8: save it as"
  elif encoding == "latin-1" and not text.isascii():
    refusal = r"is not UTF-8 text \(byte 0x[89a-f][0-9a-f] on line \d+; .*\): save it as UTF-8"
  elif layout["huge"] is not None:
    refusal = rf" line {ends[layout['huge']]}: a field longer than 131,072 characters"
  else:
    refusal = None
  return text.encode(encoding), ends, refusal


def _check_refusal(error: UserError, path: str, pattern: str | None) -> None:
  """A `UserError` that names the file first and gives the expected reason (the command line
  prints it as one line: `exit_on_user_error`, and the end-to-end tests above)."""
  message = str(error)
  event(f"refused: {pattern and pattern.split(':')[0][:40]}")
  assert message.startswith(path), message
  assert pattern is not None and re.search(pattern, message), (pattern, message)


PATH_FORMS = ("plain", "dot", "dotdot", "absolute", "backslash", "missing")


@st.composite
def _manifest_case(draw):
  n = draw(st.integers(1, 5))
  rows = [{"name": f"d{i}/{draw(_value(NAME_CHARS, 8))}.png",
           "form": draw(st.sampled_from(PATH_FORMS[:-1] * 3 + PATH_FORMS[-1:])),
           "label": draw(_value()), "group": draw(_value())} for i in range(n)]
  return rows, draw(_layout(n))


@PROPERTY
@given(case=_manifest_case())
def test_generated_manifests_load_exactly_or_are_one_line(case):
  rows, layout = case
  with tempfile.TemporaryDirectory() as tmp:
    images, lists = os.path.join(tmp, "images"), os.path.join(tmp, "lists")
    os.makedirs(lists)
    for row in rows:  # the images: empty files, as reading the manifest opens none
      full = os.path.join(images, *row["name"].split("/"))
      if row["form"] != "missing":
        os.makedirs(os.path.dirname(full), exist_ok=True)
        open(full, "w").close()
      row["full"] = full
      row["path"] = {"plain": f"../images/{row['name']}", "missing": f"../images/{row['name']}",
                     "dot": f"./../images/./{row['name']}",
                     "dotdot": f"../lists/../images/{row['name']}", "absolute": full,
                     "backslash": "..\\images\\" + row["name"].replace("/", "\\")}[row["form"]]
    data, ends, refusal = _render(("path", "label", "group"), rows, layout)
    missing = [i for i, r in enumerate(rows) if r["form"] == "missing"]
    if refusal is None and missing:
      refusal = rf" line {ends[missing[0]]}: {re.escape(rows[missing[0]]['full'])} does not exist"
    elif refusal is None and len({r["label"] for r in rows}) < 2:
      refusal = r" has a single class"
    path = os.path.join(lists, "m.csv")
    with open(path, "wb") as f:
      f.write(data)
    config = data_config("unused", "", dataset="folder", manifest=path, group="group")
    try:
      table, sizes = folder.read_manifest(config)
    except UserError as e:
      _check_refusal(e, path, refusal)
      return
    assert refusal is None, f"loaded, but should be refused: {refusal}"
    event("loaded")
    assert list(table.names) == [r["full"] if r["form"] == "absolute" else
                                 f"../images/{r['name']}" for r in rows]
    assert [table.classes[i] for i in table.labels] == [r["label"] for r in rows]
    assert list(table.groups) == [r["group"] for r in rows] and sizes == [0] * len(rows)


FOLDS = {"1": 1, " 2 ": 2, "03": 3, "0": None, "-1": None, "1.0": None, "²": None, "x": None,
         "": None}
SPLITS = {"train": "train", "TEST": "test", " Train ": "train", "val": None, "": None}


@st.composite
def _folds_case(draw):
  n = draw(st.integers(1, 6))
  names = draw(st.lists(_value(NAME_CHARS, 6), min_size=1, max_size=3))
  rows = []
  for _ in range(n):
    name = draw(st.sampled_from(names))
    good = draw(st.integers(0, 9)) > 0  # most rows well formed
    form = draw(st.sampled_from(("plain", "dot", "backslash", "empty" if not good else "plain")))
    rows.append({"fold": draw(st.sampled_from([k for k, v in FOLDS.items() if v or not good])),
                 "split": draw(st.sampled_from([k for k, v in SPLITS.items() if v or not good])),
                 "name": f"a/{name}.png",
                 "path": {"plain": f"a/{name}.png", "dot": f"./a/./{name}.png",
                          "backslash": f"a\\{name}.png", "empty": ""}[form]})
  return rows, draw(_layout(n))


@PROPERTY
@given(case=_folds_case())
def test_generated_folds_csvs_load_exactly_or_are_one_line(case):
  rows, layout = case
  data, ends, refusal = _render(("fold", "split", "path"), rows, layout)
  expected, seen = {}, {}
  if refusal is None:  # the first bad row, in the order the columns are checked
    for i, r in enumerate(rows):
      if layout["huge"] == i:
        continue
      if not (r["fold"].strip() or r["split"].strip() or r["path"]):
        continue  # a blank row: skipped
      fold, side, at = FOLDS[r["fold"]], SPLITS[r["split"]], rf" line {ends[i]}: "
      if fold is None:
        refusal = at + "fold .* is not a fold number 1, 2"
      elif side is None:
        refusal = at + "split .* is neither 'train' nor 'test'"
      elif not r["path"]:
        refusal = at + "empty path"
      elif (fold, r["name"]) in seen:
        refusal = at + f"{re.escape(r['name'])} is listed again in fold {fold} \\(first on line " \
                       f"{seen[fold, r['name']]}\\)"
      if refusal:
        break
      seen[fold, r["name"]] = ends[i]
      expected.setdefault(fold, {})[r["name"]] = side
    if refusal is None and not expected:
      refusal = " has a header but no rows"
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "folds.csv")
    with open(path, "wb") as f:
      f.write(data)
    try:
      folds = labelled.read_folds_csv(path)
    except UserError as e:
      _check_refusal(e, path, refusal)
      return
  assert refusal is None, f"loaded, but should be refused: {refusal}"
  event("loaded")
  assert {k: dict(v) for k, v in folds.splits.items()} == dict(sorted(expected.items()))
