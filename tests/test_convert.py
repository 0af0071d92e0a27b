"""Weight conversion from PyTorch: same logits as torch, safe loading, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs import default
from jattn import models
from jattn.cli import convert as convert_cli
from jattn.core.errors import UserError
from jattn.models import weights as convert
from tests.torch_models import TorchVGG, randomize_

NARROW = ((8, 8), (16, 16), (32,) * 4, (64,) * 4, (64,) * 4)  # width = 1/8


def _model_config(**kw):
  mc = default.get_config().model
  mc.update(dict(c_attn_blocks=(), s_attn_blocks=(), num_classes=10, classifier_width=32))
  mc.update(kw)
  return mc


def _compare(torch_model, mc, source, size, batch=2, log_softmax=False, atol=1e-4):
  x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    want = torch_model(x).numpy()
  variables = convert.torch_to_flax(torch_model.state_dict(), mc, source)
  model = models.build_model(mc)
  got = model.apply(variables, x.numpy().transpose(0, 2, 3, 1), train=False)
  if log_softmax:
    got = jax.nn.log_softmax(got)
  np.testing.assert_allclose(np.asarray(got), want, atol=atol, rtol=1e-4)
  assert np.abs(want).max() > 10 * atol  # the comparison is not between near-zero outputs
  return variables


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("size", [(224, 224), (100, 76)])  # at 100x76 the 7x7 pool is not identity
def test_torchvision_layout_same_logits(batch_norm, size):
  tm = randomize_(TorchVGG(NARROW, batch_norm=batch_norm, num_classes=10, hidden=32))
  _compare(tm, _model_config(width=0.125, batch_norm=batch_norm), "torchvision", size)


@pytest.mark.slow
def test_full_size_vgg19_same_logits():
  """The one full-size forward pass of the suite: VGG19 with its ImageNet head, at 224x224."""
  tm = randomize_(TorchVGG(batch_norm=False, num_classes=1000))
  mc = convert.torchvision_model_config("vgg19")
  variables = _compare(tm, mc, "torchvision", (224, 224), batch=1, atol=2e-4)
  n = sum(np.size(v) for v in jax.tree_util.tree_leaves(variables["params"]))
  assert n == sum(p.numel() for p in tm.parameters()) == 143_667_240  # torchvision's VGG19


def test_reference_layout_with_attention_same_log_probabilities():
  """The authors' layout: batch norm, C-Attn (7x7, stride 4, pad 3) on 1-2, S-Attn on 3-5."""
  tm = randomize_(TorchVGG(NARROW, batch_norm=True, num_classes=2, hidden=32, layout="reference",
                           c_attn_blocks=(1, 2), s_attn_blocks=(3, 4, 5)))
  mc = _model_config(width=0.125, batch_norm=True, num_classes=2, c_attn_blocks=(1, 2),
                     s_attn_blocks=(3, 4, 5), c_attn_kernel=7, c_attn_stride=4, c_attn_padding=3)
  _compare(tm, mc, "reference", (224, 224), log_softmax=True, atol=1e-5)


def test_reference_layout_both_modules_in_one_block():
  tm = randomize_(TorchVGG(NARROW, num_classes=2, hidden=32, layout="reference",
                           c_attn_blocks=(3,), s_attn_blocks=(3, 4)))
  mc = _model_config(width=0.125, num_classes=2, c_attn_blocks=(3,), s_attn_blocks=(3, 4),
                     c_attn_kernel=7, c_attn_stride=4, c_attn_padding=3)
  _compare(tm, mc, "reference", (224, 224), log_softmax=True, atol=1e-5)


def test_missing_and_misshapen_keys_are_named():
  sd = randomize_(TorchVGG(NARROW, num_classes=10, hidden=32)).state_dict()
  mc = _model_config(width=0.125)
  missing = {k: v for k, v in sd.items() if k != "features.2.bias"}
  with pytest.raises(UserError, match=r"no key 'features\.2\.bias'"):
    convert.torch_to_flax(missing, mc, "torchvision")
  with pytest.raises(UserError, match=r"'classifier\.6\.weight' has shape \(10, 32\).*expects"):
    convert.torch_to_flax(sd, _model_config(width=0.125, num_classes=2), "torchvision")
  bn = randomize_(TorchVGG(NARROW, batch_norm=True, num_classes=10, hidden=32)).state_dict()
  with pytest.raises(UserError, match=r"is a batch-norm VGG \(vgg19_bn\).*--arch vgg19_bn"):
    convert.torch_to_flax(bn, mc, "torchvision")


def test_a_state_dict_with_nans_is_refused_by_name():
  """Bug: a state dict full of NaNs converted without a word."""
  sd = randomize_(TorchVGG(NARROW, num_classes=10, hidden=32)).state_dict()
  sd["features.2.weight"] = torch.full_like(sd["features.2.weight"], float("nan"))
  with pytest.raises(UserError, match=r"'features\.2\.weight' holds NaN or infinite values"):
    convert.torch_to_flax(sd, _model_config(width=0.125), "torchvision")


def test_module_prefix_and_wrapped_state_dicts(tmp_path):
  tm = randomize_(TorchVGG(NARROW, num_classes=10, hidden=32))
  path = tmp_path / "wrapped.pth"
  torch.save({"state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()}}, path)
  sd = convert.load_state_dict(str(path))
  variables = convert.torch_to_flax(sd, _model_config(width=0.125), "torchvision")
  np.testing.assert_array_equal(variables["params"]["block1"]["conv1"]["bias"],
                                tm.features[0].bias.detach().numpy())


class Payload:
  def __reduce__(self):
    return (os.system, ("echo pwned",))


def test_pickle_carrying_code_is_refused(tmp_path):
  path = tmp_path / "evil.pth"
  torch.save({"features.0.weight": torch.zeros(1), "x": Payload()}, path)
  with pytest.raises(UserError, match="refused, because unpickling it would run code"):
    convert.load_state_dict(str(path))
  whole_model = tmp_path / "model.pth"
  torch.save(torch.nn.Linear(2, 2), whole_model)  # a pickled module, not a state dict
  with pytest.raises(UserError, match="refused"):
    convert.load_state_dict(str(whole_model))


def test_cli_writes_weights_that_load_back(tmp_path):
  tm = randomize_(TorchVGG(NARROW, batch_norm=True, num_classes=2, hidden=32, layout="reference",
                           c_attn_blocks=(1, 2), s_attn_blocks=(3, 4, 5)))
  pth = tmp_path / "ref.pth"
  torch.save(tm.state_dict(), pth)
  cfg = tmp_path / "cfg.py"
  cfg.write_text(
      "from configs import reference\n"
      "def get_config():\n"
      "  c = reference.get_config()\n"
      "  c.model.width = 0.125\n"
      "  c.model.classifier_width = 32\n"
      "  return c\n")
  out = tmp_path / "weights"
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  run = subprocess.run(
      [sys.executable, "-m", "jattn", "convert", "--source", "reference", "--config", str(cfg),
       "--pth", str(pth), "--out", str(out)], capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr
  loaded = convert.load_weights(str(out))
  np.testing.assert_allclose(loaded["params"]["block1"]["c_attn"]["m_v"]["kernel"][0, 0],
                             tm.features[6].conv3.weight.detach().numpy()[:, :, 0, 0].T)
  np.testing.assert_allclose(loaded["batch_stats"]["block1"]["bn1"]["var"],
                             tm.features[1].running_var.numpy())
  again = subprocess.run(
      [sys.executable, "-m", "jattn", "convert", "--source", "reference", "--config", str(cfg),
       "--pth", str(pth), "--out", str(out)], capture_output=True, text=True, env=env)
  assert again.returncode == 2 and again.stderr.count("\n") == 1
  assert "already holds converted weights" in again.stderr and "Traceback" not in again.stderr


def test_missing_pretrained_folder_tells_the_convert_command(tmp_path):
  with pytest.raises(UserError, match="jattn convert --source torchvision"):
    convert.load_weights(str(tmp_path / "nowhere"))


def test_torchvision_command_converts_a_checkpoint(tmp_path, monkeypatch, capsys):
  """Guards against a broken `jattn convert --source torchvision --arch vgg19`, the
  command the README gives for the ImageNet weights: a torchvision-layout checkpoint (narrowed to
  1/8 width: the command's full-size model is swapped for the narrow one) becomes weights that
  give torch's logits, with the class count read from the checkpoint."""
  tm = randomize_(TorchVGG(NARROW, num_classes=10, hidden=32))
  pth = tmp_path / "vgg19.pth"
  torch.save(tm.state_dict(), pth)
  full_size = convert.torchvision_model_config

  def narrow(arch, num_classes=1000):
    mc = full_size(arch, num_classes)
    mc.update(width=0.125, classifier_width=32)
    return mc

  monkeypatch.setattr(convert, "torchvision_model_config", narrow)
  out = tmp_path / "weights"
  convert_cli.main(["--source", "torchvision", "--arch", "vgg19", "--pth", str(pth),
                "--out", str(out)])
  n = sum(p.numel() for p in tm.parameters())
  assert capsys.readouterr().out == f"wrote {n:,} parameters from {pth} to {out}\n"
  variables = convert.load_weights(str(out))
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = tm(x).numpy()
  got = models.build_model(narrow("vgg19", 10)).apply(variables, x.numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  with open(out / convert.INFO_FILE) as f:
    info = json.load(f)
  assert (info["arch"], info["num_params"], info["model"]["num_classes"]) == ("vgg19", n, 10)
