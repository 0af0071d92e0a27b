"""Configs load, validate, enumerate the paper's rows, and take typed command-line overrides."""

from __future__ import annotations

import glob
import os

import pytest

from jattn import config_lib, train
from jattn.errors import UserError
from tests.runs import REPO

CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_validates_and_shows_its_command(path):
  config = config_lib.load_config(path)
  train.validate_config(config)
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
  for row in ("vgg19", "vgg19_c", "vgg19_s", "ours"):
    demo = config_lib.load_config(os.path.join(REPO, "configs", "demo.py") + f":{row}")
    paper = config_lib.load_config(os.path.join(REPO, "configs", f"{row}.py"))
    assert demo.name == f"demo_{row}" and demo.paper_row == paper.paper_row
    assert demo.model.c_attn_blocks == paper.model.c_attn_blocks
    assert demo.model.s_attn_blocks == paper.model.s_attn_blocks
    assert demo.synthetic.enabled and not demo.pretrained


def test_overrides_are_parsed_by_the_type_of_the_field():
  config = config_lib.load_config(os.path.join(REPO, "configs", "ours.py"))
  overrides, rest = config_lib.split_argv(
      ["--workdir", "w", "--config.fold=3", "--config.learning_rate", "1e-3",
       "--config.skip_corrupt=yes", "--config.model.c_attn_blocks=1,3", "--config.lr_milestones=()",
       "--config.pretrained=", "--config.model.dtype=bfloat16"])
  assert rest == ["--workdir", "w"]
  config_lib.apply_overrides(config, overrides)
  assert config.fold == 3 and config.learning_rate == 1e-3 and config.skip_corrupt is True
  assert config.model.c_attn_blocks == (1, 3) and config.lr_milestones == ()
  assert config.pretrained == "" and config.model.dtype == "bfloat16"


@pytest.mark.parametrize("override,message", [
    ("fodl=1", "unknown config field 'fodl'.*did you mean 'fold'"),
    ("model.c_atn_blocks=1", "no 'c_atn_blocks' in model.*did you mean 'model.c_attn_blocks'"),
    ("fold=one", "--config.fold='one': expected a value of type int"),
    ("skip_corrupt=maybe", "expected a value of type bool"),
    ("model=1", "config.model is a group of fields"),
    ("fold", "give a value"),
])
def test_bad_overrides_name_the_field(override, message):
  config = config_lib.load_config(os.path.join(REPO, "configs", "ours.py"))
  with pytest.raises(UserError, match=message):
    config_lib.apply_overrides(config, [override])


def test_bad_config_argument():
  with pytest.raises(UserError, match="No module named 'configs.vgg20'"):
    config_lib.load_config(os.path.join(REPO, "configs", "demo.py") + ":vgg20")
