"""What BreakHis is: its classes, subtypes, magnifications, patients and file-name convention.

This module is the one place that knows BreakHis' naming (see the data set's paper, Spanhol et al.,
IEEE TBME 2016). A file is named `SOB_<class>_<type>-<year>-<slide>-<mag>-<seq>.png`, for example
`SOB_B_TA-14-4659-40-001.png`; the patient id is `<type>-<year>-<slide>` (`TA-14-4659`), and
ids that share digits (`A-14-22549AB`, `A-14-22549CD`) are different patients.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.resources
import re

__all__ = ["ARCHIVE", "ARCHIVE_URL", "CLASSES", "COUNTS", "DOWNLOAD_URL", "MAGNIFICATIONS",
           "NUM_IMAGES", "ROOT", "SLIDES", "SUBTYPES", "SUBTYPE_CODES", "TASKS", "ParsedName",
           "Patient", "Record", "image_path", "parse_file_name", "patient_folder", "patients",
           "record"]

CLASSES = ("benign", "malignant")  # label 0 and 1
MAGNIFICATIONS = ("40X", "100X", "200X", "400X")
# Subtype code -> (folder name in the archive, class).
SUBTYPES = {
    "A": ("adenosis", "benign"),
    "F": ("fibroadenoma", "benign"),
    "PT": ("phyllodes_tumor", "benign"),
    "TA": ("tubular_adenoma", "benign"),
    "DC": ("ductal_carcinoma", "malignant"),
    "LC": ("lobular_carcinoma", "malignant"),
    "MC": ("mucinous_carcinoma", "malignant"),
    "PC": ("papillary_carcinoma", "malignant"),
}
SUBTYPE_CODES = tuple(SUBTYPES)
# What a model is trained to tell (config.data.breakhis.task) -> its class names, in label order.
TASKS = {"binary": CLASSES, "subtype": SUBTYPE_CODES}
ROOT = "BreaKHis_v1"  # the folder the official archive unpacks to
SLIDES = "BreaKHis_v1/histology_slides/breast"  # its image tree, relative to the data dir
ARCHIVE = "BreaKHis_v1.tar.gz"
DOWNLOAD_URL = (  # the data set's home page, which links the archive
    "https://web.inf.ufpr.br/vri/databases/breast-cancer-histopathological-database-breakhis/"
)
ARCHIVE_URL = "http://www.inf.ufpr.br/vri/databases/BreaKHis_v1.tar.gz"  # the archive itself
NUM_IMAGES = 7909  # in the official release

# SOB_<class>_<type>-<year>-<slide>-<mag>-<seq>.png; the slide part may carry letters.
_NAME = re.compile(
    r"^SOB_(?P<cls>[BM])_(?P<type>[A-Z]{1,2})-(?P<year>\d{2})-(?P<slide>[0-9A-Z]+)"
    r"-(?P<mag>40|100|200|400)-(?P<seq>\d{3})\.png$"
)


@dataclasses.dataclass(frozen=True)
class Record:
  """One BreakHis image, as its path and file name describe it."""

  path: str  # relative to the data dir (the folder that holds BreaKHis_v1), '/'-separated
  file_name: str  # unique within the data set
  label: int  # 0 benign, 1 malignant
  subtype: str  # one of SUBTYPE_CODES
  patient_id: str  # e.g. 'A-14-22549AB'
  magnification: str  # one of MAGNIFICATIONS
  sequence: int


@dataclasses.dataclass(frozen=True)
class ParsedName:
  file_name: str
  label: int
  subtype: str
  patient_id: str
  magnification: str
  sequence: int


def parse_file_name(file_name: str) -> ParsedName:
  """Parses a BreakHis file name; raises ValueError that names it when it breaks the convention."""
  m = _NAME.match(file_name)
  if m is None:
    raise ValueError(
        f"{file_name!r} does not follow BreakHis' naming "
        "SOB_<B|M>_<type>-<year>-<slide>-<mag>-<seq>.png"
    )
  subtype = m["type"]
  if subtype not in SUBTYPES:
    raise ValueError(
        f"{file_name!r} has unknown subtype {subtype!r}; expected one of {SUBTYPE_CODES}"
    )
  label = CLASSES.index(SUBTYPES[subtype][1])
  if m["cls"] != "BM"[label]:
    raise ValueError(f"{file_name!r}: class {m['cls']!r} contradicts subtype {subtype!r}")
  return ParsedName(
      file_name=file_name,
      label=label,
      subtype=subtype,
      patient_id=f"{subtype}-{m['year']}-{m['slide']}",
      magnification=f"{m['mag']}X",
      sequence=int(m["seq"]),
  )


def patient_folder(patient_id: str) -> str:
  """The archive's folder name for a patient: `A-14-22549AB` -> `SOB_B_A_14-22549AB`."""
  subtype, rest = patient_id.split("-", 1)
  cls = "BM"[CLASSES.index(SUBTYPES[subtype][1])]
  return f"SOB_{cls}_{subtype}_{rest}"


def image_path(patient_id: str, magnification: str, sequence: int) -> str:
  """Path of an image relative to the data dir, exactly as in the official archive."""
  subtype = patient_id.split("-", 1)[0]
  folder, cls = SUBTYPES[subtype]
  mag = magnification.removesuffix("X")
  name = f"SOB_{'BM'[CLASSES.index(cls)]}_{patient_id}-{mag}-{sequence:03d}.png"
  return f"{SLIDES}/{cls}/SOB/{folder}/{patient_folder(patient_id)}/{magnification}/{name}"


@dataclasses.dataclass(frozen=True)
class Patient:
  patient_id: str
  subtype: str
  label: int


@functools.cache
def patients() -> tuple[Patient, ...]:
  """The 82 patients of the official release, from patients.tsv beside this module."""
  text = importlib.resources.files("jattn.data.breakhis").joinpath("patients.tsv").read_text()
  rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
  return tuple(
      Patient(r["patient_id"], r["subtype"], CLASSES.index(r["label"])) for r in rows
  )


# Images per subtype and magnification in the official release (Spanhol et al. 2016, Table 1),
# in the order of MAGNIFICATIONS; they sum to NUM_IMAGES. The synthesizer's counts='real' uses it.
COUNTS = {
    "A": (114, 113, 111, 106),
    "F": (253, 260, 264, 237),
    "PT": (109, 121, 108, 115),
    "TA": (149, 150, 140, 130),
    "DC": (864, 903, 896, 788),
    "LC": (156, 170, 163, 137),
    "MC": (205, 222, 196, 169),
    "PC": (145, 142, 135, 138),
}


def record(path: str) -> Record:
  """The `Record` of an image from its path relative to the data dir; ValueError for a bad name."""
  parsed = parse_file_name(path.rsplit("/", 1)[-1])
  return Record(path=path, **vars(parsed))
