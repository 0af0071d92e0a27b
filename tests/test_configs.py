"""Configs load, validate, enumerate the paper's rows, and take typed command-line overrides."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import pytest

from jattn import main
from jattn.core import config_lib
from jattn.core.errors import UserError
from jattn.training import compat, validate
from tests.runs import REPO

CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_validates_and_shows_its_command(path):
  config = config_lib.load_config(path)
  # a folder config's classes are its data's, absent here
  if config.data.name == "folder" and not config.data.folder.classes:
    config.data.folder.classes = ",".join(f"class{i}" for i in range(config.model.num_classes))
  if config.data.name == "bags":  # so is a bags config's
    config.data.bags.classes = ",".join(f"class{i}" for i in range(config.model.num_classes))
  validate.validate_config(config)
  with open(path) as f:
    source = f.read()
  if not path.endswith("default.py"):
    assert f"--config configs/{os.path.basename(path)}" in source  # the docstring's command


def test_paper_rows_differ_only_in_attention_placement():
  rows = {name: config_lib.load_config(os.path.join(REPO, "configs", f"{name}.py"))
          for name in ("vgg19", "vgg19_c", "vgg19_s", "ours")}
  placement = {n: (tuple(c.model.c_attn_blocks), tuple(c.model.s_attn_blocks))
               for n, c in rows.items()}
  assert placement == {"vgg19": ((), ()), "vgg19_c": ((1, 2), ()), "vgg19_s": ((), (3, 4, 5)),
                       "ours": ((1, 2), (3, 4, 5))}
  assert [c.paper_row for c in rows.values()] == ["VGG19", "VGG19 + C", "VGG19 + S", "Ours"]

  def rest(c):
    d = c.to_dict()
    for k in ("name", "paper_row"):
      d.pop(k)
    d["model"] = {k: v for k, v in d["model"].items() if not k.endswith("attn_blocks")}
    return d

  assert all(rest(c) == rest(rows["ours"]) for c in rows.values())
  ours = rows["ours"]  # section 3 of the paper
  assert (ours.learning_rate, ours.lr_decay_factor, ours.lr_decay_every, ours.batch_size,
          ours.weight_decay, ours.image_size) == (5e-5, 0.5, 30, 8, 1e-4, 224)
  assert (ours.model.c_attn_kernel, ours.model.c_attn_stride, ours.model.s_attn_reduction) == (
      4, 4, 8)


def test_demo_rows_follow_the_paper_rows():
  for row in ("vgg19", "vgg19_c", "vgg19_s", "ours", "resnet50", "resnet50_c", "resnet50_s",
              "resnet50_ours"):
    demo = config_lib.load_config(os.path.join(REPO, "configs", "demo.py") + f":{row}")
    paper = config_lib.load_config(os.path.join(REPO, "configs", f"{row}.py"))
    assert demo.name == f"demo_{row}" and demo.paper_row == paper.paper_row
    assert demo.model.name == paper.model.name
    for field in ("c_attn_blocks", "s_attn_blocks", "c_attn_stages", "s_attn_stages"):
      assert demo.model[field] == paper.model[field]
    assert demo.data.breakhis.synthetic.enabled and not demo.pretrained


def test_demo_resnet18_rows_and_a_run_named_after_the_model_it_trains():
  """The ResNet-18 demo rows are the ResNet-50 rows with the other backbone, named for it; and
  `--config.model.name=resnet18` on a resnet50 row renames the run (unless a name is given)."""
  demo = os.path.join(REPO, "configs", "demo.py")
  for row in ("resnet50", "resnet50_c", "resnet50_s", "resnet50_ours"):
    r50 = config_lib.load_config(f"{demo}:{row}")
    r18 = config_lib.load_config(f"{demo}:{row.replace('50', '18')}")
    assert (r18.name, r18.model.name) == (f"demo_resnet18{row[len('resnet50'):]}", "resnet18")
    a, b = json.loads(r50.to_json()), json.loads(r18.to_json())
    for d in (a, b):
      del d["name"], d["model"]["name"]
    assert a == b
    validate.validate_config(r18)
  config = config_lib.load_config(f"{demo}:resnet50_ours")
  config_lib.apply_overrides(config, ["model.name=resnet18"])
  assert (config.name, config.model.name) == ("demo_resnet18_ours", "resnet18")
  config = config_lib.load_config(f"{demo}:resnet50_ours")
  config_lib.apply_overrides(config, ["name=mine", "model.name=resnet18"])
  assert config.name == "mine"
  config = config_lib.load_config(f"{demo}:ours")  # no model in the name: left as it is
  config_lib.apply_overrides(config, ["model.name=resnet50"])
  assert config.name == "demo_ours"


def test_overrides_are_parsed_by_the_type_of_the_field():
  config = config_lib.load_config(os.path.join(REPO, "configs", "ours.py"))
  overrides, rest = config_lib.split_argv(
      ["--workdir", "w", "--config.fold=3", "--config.learning_rate", "1e-3",
       "--config.data.skip_corrupt=yes", "--config.model.c_attn_blocks=1,3",
       "--config.lr_milestones=()",
       "--config.pretrained=", "--config.model.dtype=bfloat16"])
  assert rest == ["--workdir", "w"]
  config_lib.apply_overrides(config, overrides)
  assert config.fold == 3 and config.learning_rate == 1e-3 and config.data.skip_corrupt is True
  assert config.model.c_attn_blocks == (1, 3) and config.lr_milestones == ()
  assert config.pretrained == "" and config.model.dtype == "bfloat16"


@pytest.mark.parametrize("args,message", [
    # overrides the command line cannot parse
    (["--config.fodl=1"], "unknown config field 'fodl'.*did you mean 'fold'"),
    (["--config.model.c_atn_blocks=1"],
     "no 'c_atn_blocks' in model.*did you mean 'model.c_attn_blocks'"),
    (["--config.fold=one"], "--config.fold='one': expected a value of type int"),
    (["--config.batch_size=eight"], "expected a value of type int"),
    (["--config.data.skip_corrupt=maybe"], "expected a value of type bool"),
    (["--config.model=1"], "config.model is a group of fields"),
    (["--config.fold"], "give a value"),
    (["--config", "configs/nope.py"], "config file 'configs/nope.py' not found"),
    # values validate_config refuses
    (["--config.fold=7"], "folds are numbered 1 to 5"),
    (["--config.batch_size=0"], "batch_size=0: must be a positive integer"),
    (["--config.tie_rule=coin"], "tie_rule='coin'"),
    (["--config.steps_per_dispatch=0"], "steps_per_dispatch=0: the training steps run in one "
                                        "dispatch, at least 1"),
])
def test_bad_config_gives_one_line_and_writes_nothing(args, message, tmp_path, capsys):
  """A mistyped field or value stops `jattn.main` with one line naming it (exit 2, no traceback)
  before anything is written, whether the parser or validate_config catches it."""
  workdir = tmp_path / "w"
  with pytest.raises(SystemExit) as e:
    main.main(["--config", "configs/ours.py", "--workdir", str(workdir), *args])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1, err
  assert err.startswith("jattn train: error: ") and re.search(message, err), err
  assert not workdir.exists()


def test_bad_config_argument():
  """An unknown row of the demo lists the valid ones (it was a ModuleNotFoundError)."""
  spec = os.path.join(REPO, "configs", "demo.py") + ":vgg20"
  with pytest.raises(UserError) as e:
    config_lib.load_config(spec)
  assert str(e.value) == (f"--config {spec}: no row 'vgg20'; use one of configs/demo.py:vgg19, "
                          f"configs/demo.py:vgg19_c, configs/demo.py:vgg19_s, "
                          f"configs/demo.py:ours, configs/demo.py:resnet50, "
                          f"configs/demo.py:resnet50_c, configs/demo.py:resnet50_s, "
                          f"configs/demo.py:resnet50_ours, configs/demo.py:resnet18, "
                          f"configs/demo.py:resnet18_c, configs/demo.py:resnet18_s, "
                          f"configs/demo.py:resnet18_ours, configs/demo.py:vit_s14, "
                          f"configs/demo.py:vit_s14_c, configs/demo.py:vit_s14_s, "
                          f"configs/demo.py:vit_s14_ours")


def test_data_fields_named_as_before_config_data_load_where_they_live_now(tmp_path):
  """Configs, command lines and config.json files written before the data settings nested under
  `config.data` keep loading: each old name lands on its field today, `classes` and the like in
  the group of the source the config names."""
  demo = os.path.join(REPO, "configs", "demo.py")
  config = compat.load_config(demo, ["data_dir=/x", "synthetic.enabled=false", "task=subtype",
                                     "dataset=tfds:colorectal_histology", "classes=a,b"])
  assert config.data.dir == "/x" and config.data.breakhis.synthetic.enabled is False
  assert config.data.breakhis.task == "subtype" and config.data.name == "tfds:colorectal_histology"
  assert config.data.tfds.classes == "a,b" and config.data.folder.classes == ""
  old_file = tmp_path / "mine.py"  # a user's config of before, on today's defaults
  old_file.write_text(
      "from configs import default\n\n\ndef get_config():\n  config = default.get_config()\n"
      "  config.dataset = 'folder'\n  config.data_dir = 'patches'\n  config.manifest = 'm.csv'\n"
      "  config.synthetic.enabled = True\n  return config\n")
  os.makedirs(tmp_path / "configs")
  for name in ("__init__.py", "default.py"):
    shutil.copy(os.path.join(REPO, "configs", name), tmp_path / "configs" / name)
  shutil.move(old_file, tmp_path / "configs" / "mine.py")
  # `config.synthetic` does not exist today: the old file fails on that line, naming it
  with pytest.raises(UserError, match=r"failed: AttributeError: .*synthetic.* \(the data fields "
                                      r"moved under config.data: config.synthetic is now "
                                      r"config.data.breakhis.synthetic; see configs/default.py\)"):
    compat.load_config(str(tmp_path / "configs" / "mine.py"))
  (tmp_path / "configs" / "mine.py").write_text(
      "from configs import default\n\n\ndef get_config():\n  config = default.get_config()\n"
      "  config.dataset = 'folder'\n  config.data_dir = 'patches'\n  config.manifest = 'm.csv'\n"
      "  config.group = 'patient'\n  return config\n")
  mine = compat.load_config(str(tmp_path / "configs" / "mine.py"))
  assert (mine.data.name, mine.data.dir, mine.data.folder.manifest, mine.data.folder.group) == (
      "folder", "patches", "m.csv", "patient")
  assert "dataset" not in mine and "data_dir" not in mine and "manifest" not in mine
  # An old run's config.json: flat data fields, no groups of other sources.
  stored = json.loads(config_lib.load_config(demo).to_json())
  flat = {**{k: v for k, v in stored.items() if k != "data"}, "dataset": "breakhis",
          "data_dir": stored["data"]["dir"], "prepared_dir": "", "folds": "generated",
          "folds_seed": 0, "skip_corrupt": False, "download": False,
          "synthetic": stored["data"]["breakhis"]["synthetic"]}
  assert compat.comparable(flat) == compat.comparable(stored)
  assert compat.differing_fields({**flat, "task": "subtype"}, stored) == ["data.breakhis.task"]
  # Another source's group changes nothing a BreakHis run computes.
  other = json.loads(json.dumps(stored))
  other["data"]["folder"]["classes"] = "x,y"
  assert compat.differing_fields(other, stored) == []


def test_a_mistyped_data_field_gets_a_did_you_mean():
  config = compat.load_config(os.path.join(REPO, "configs", "demo.py"))
  with pytest.raises(UserError, match=r"unknown config field 'data.dri' \(no 'dri' in data\); "
                                      r"did you mean 'data.dir'\?"):
    config_lib.apply_overrides(config, ["data.dri=/x"])
  with pytest.raises(UserError, match=r"did you mean 'data.breakhis.task'\?"):
    config_lib.apply_overrides(config, ["data.breakhis.tsak=binary"])
