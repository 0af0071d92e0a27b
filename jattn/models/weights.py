r"""Exact import of PyTorch weights: torchvision's ImageNet models, the authors' checkpoints.

Two key layouts are understood, each backbone (``jattn.models``) giving its key map:

* ``"torchvision"``: the state dict of ``torchvision.models.vgg19``, ``vgg19_bn``
  (``features.<i>.*``, ``classifier.{0,3,6}.*``), ``resnet18`` or ``resnet50`` (``conv1``, ``bn1``,
  ``layer1``..``layer4``, ``fc``). Attention modules are not in it; the ImageNet head is kept, so
  a converted model with ``num_classes=1000`` and no attention gives torchvision's logits.
* ``"reference"``: a state dict saved by the authors' code (github.com/pxiangwu/attn-hist-classify)
  for its VGG with attention, where the attention modules are extra entries of ``features``. Its
  class names are swapped relative to the paper: its ``SpatialAttention`` (conv1, conv2, conv3) is
  the paper's C-Attn (M_Q, M_K, M_V) and its ``ChannelAttention`` is the paper's S-Attn (S_Q, S_K,
  S_V). When a block has both, the code runs S-Attn first, and so do we. For a ResNet, the same
  modules after its stages as ``jattn.perf.torch_reference.TorchResNet`` holds them
  (``<site>.conv1``..).

Conv weights go from torch's (out, in, kh, kw) to Flax's (kh, kw, in, out); linear weights are
transposed; the first classifier layer's inputs are permuted from torch's (c, h, w) flattening to
our NHWC (h, w, c) one. Checkpoints are read with ``torch.load(weights_only=True)``: a file
that needs arbitrary code to unpickle is refused.

Command line (writes weights that a config's ``pretrained`` field points at)::

  jattn convert --download vgg19      # fetch, check and convert into pretrained/vgg19
  jattn convert --source torchvision --arch vgg19 --pth vgg19-dcbb9e9d.pth \
      --out pretrained/vgg19
  jattn convert --source torchvision --arch vgg19_bn --pth vgg19_bn-c79401a0.pth \
      --out pretrained/vgg19_bn
  jattn convert --download resnet50   # torchvision's IMAGENET1K_V2 (resnet18: V1)
  jattn convert --source torchvision --arch resnet50 --pth resnet50-11ad3fa6.pth \
      --out pretrained/resnet50
  jattn convert --source reference --config configs/reference.py \
      --pth cls_model_125.pth --out pretrained/reference
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from jattn import models
from jattn.core import config_lib, download, files
from jattn.core.errors import UserError

SOURCES = ("torchvision", "reference")
WEIGHTS_SUBDIR = "weights"
INFO_FILE = "info.json"


def archs() -> dict[str, str]:
  """{torchvision architecture: the backbone (config.model.name) that converts it}."""
  # getattr: a backbone without torchvision weights (the ViTs) may still be importing this module
  return {arch: name for name in models.BACKBONES
          for arch in getattr(models.get(name), "TORCHVISION", {})}


def _backbone(arch: str):
  if arch not in archs():
    raise UserError(f"--arch {arch!r}: use one of {sorted(archs())}")
  return models.get(archs()[arch])


def expected_shapes(model) -> dict[str, Any]:
  """Shapes of the model's variables (no computation)."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def torch_to_flax(state_dict: Mapping[str, Any], model_config: ml_collections.ConfigDict,
                  source: str) -> dict[str, Any]:
  """Flax variables ({'params', ['batch_stats']}, NumPy float32) from a PyTorch state dict.

  `model_config` is a config's `model` field; its backbone (`model.name`) gives the key map and
  fixes the widths, batch norm and, for `source="reference"`, where the attention modules sit.
  For `source="torchvision"` the result holds the backbone and the classifier only (the attention
  modules are not in such a file). Raises UserError naming any key that is missing, unexpected or
  misshapen.
  """
  backbone = models.of(model_config)
  shapes = traverse_util.flatten_dict(expected_shapes(models.build_model(model_config)))
  state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()
                if not k.endswith("num_batches_tracked")}
  backbone.check_state_dict(state_dict, model_config)
  flat: dict[tuple[str, ...], np.ndarray] = {}
  key_map = backbone.torch_key_map(model_config, source)
  for torch_key, path, kind in key_map:
    if torch_key not in state_dict:
      raise UserError(f"the {source} state dict has no key {torch_key!r} (needed for "
                      f"{'/'.join(path)}); check --arch / config.model against the checkpoint")
    t = np.asarray(_to_numpy(state_dict[torch_key]), np.float32)
    if not np.isfinite(t).all():
      raise UserError(f"the {source} state dict's {torch_key!r} holds NaN or infinite values: the "
                      f"checkpoint is damaged or from a diverged training; use another one")
    value = backbone.rearrange(t, kind, path[-1], model_config)
    want = shapes[path].shape
    if value.shape != want:
      raise UserError(
          f"key {torch_key!r} has shape {tuple(t.shape)}, which gives {value.shape} for "
          f"{'/'.join(path)}, but the config expects {tuple(want)}; check --arch (e.g. vgg19 vs "
          f"vgg19_bn), config.model (width, num_classes, the attention's fields) against the "
          f"checkpoint")
    flat[path] = value
  unexpected = sorted(set(state_dict) - {key for key, _, _ in key_map})
  if unexpected:
    raise UserError(f"the {source} state dict has keys this config does not use: "
                    f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}; "
                    f"check the attention placement and --source")
  return traverse_util.unflatten_dict(flat)


def _to_numpy(t: Any) -> np.ndarray:
  return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def load_state_dict(path: str) -> dict[str, Any]:
  """Reads a .pth state dict safely (weights_only=True); refuses files that carry code."""
  try:
    import torch
  except ImportError:
    raise UserError("reading .pth files needs PyTorch: pip install -e '.[convert]'") from None
  if not os.path.isfile(path):
    raise UserError(f"{path}: no such file; download it first (see the README)")
  try:
    with warnings.catch_warnings():  # the errors below say all there is to say
      warnings.simplefilter("ignore")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    code = re.search(r"GLOBAL (\S+)", str(e))
    what = f" (it calls {code.group(1)})" if code else ""
    raise UserError(
        f"{path}: refused, because unpickling it would run code{what}; jattn reads only plain "
        f"state dicts (torch.save(model.state_dict(), path)): convert only checkpoints from a "
        f"trusted source") from None
  except Exception as e:  # noqa: BLE001 -- a file that is not a checkpoint fails in many ways
    raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:200]})") from None
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not all(hasattr(v, "shape") for v in obj.values()):
    raise UserError(f"{path}: expected a state dict (a mapping of names to tensors)")
  return dict(obj)


def torchvision_model_config(arch: str, num_classes: int = 1000) -> ml_collections.ConfigDict:
  """The model config of torchvision's `arch` (full size, no attention) with `num_classes`."""
  mc = _backbone(arch).torchvision_model_config(arch)
  mc.num_classes = num_classes
  return mc


def save_weights(variables: Mapping[str, Any], out_dir: str, info: Mapping[str, Any]) -> None:
  """Writes converted variables (Orbax) and a small info.json into out_dir."""
  out_dir = os.path.abspath(out_dir)
  target = os.path.join(out_dir, WEIGHTS_SUBDIR)
  if os.path.exists(target):
    raise UserError(f"{out_dir} already holds converted weights; choose another --out or remove it")
  os.makedirs(out_dir, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.tree_util.tree_map(np.asarray, dict(variables)))
  files.atomic_write_text(os.path.join(out_dir, INFO_FILE), json.dumps(dict(info), indent=2))


def load_weights(path: str, model_config: ml_collections.ConfigDict | None = None
                 ) -> dict[str, Any]:
  """Reads weights written by `save_weights` (a config's `pretrained` points at the folder).

  With `model_config`, a missing folder names the command that converts weights for its backbone,
  and weights converted for another backbone (their info.json) are refused in one line.
  """
  arch = "vgg19" if model_config is None else models.of(model_config).torchvision_arch(
      model_config)
  target = os.path.join(os.path.abspath(path), WEIGHTS_SUBDIR)
  if not os.path.isdir(target):
    name = TORCHVISION_FILES[arch]
    raise UserError(
        f"pretrained={path!r}: no converted weights there. Run jattn convert "
        f"--download {arch} --out {path}, or download torchvision's {arch} weights "
        f"({TORCHVISION_URL}{name}) and run: jattn convert --source torchvision "
        f"--arch {arch} --pth {name} --out {path} (or set --config.pretrained='' to train from "
        f"scratch)")
  info_path = os.path.join(os.path.abspath(path), INFO_FILE)
  if model_config is not None and os.path.exists(info_path):
    info = files.read_json(info_path, "it describes the converted weights: convert them again")
    stored = info.get("model") if isinstance(info, dict) and isinstance(info.get("model"),
                                                                        dict) else {}
    if models.name_of(stored) != models.name_of(model_config):
      raise UserError(
          f"pretrained={path!r} holds weights converted for a {models.name_of(stored)} "
          f"({INFO_FILE}), but config.model.name={models.name_of(model_config)!r}; convert "
          f"{arch}'s: jattn convert --download {arch} --out OTHER_FOLDER, and point "
          f"--config.pretrained at it")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(target)




# torchvision's ImageNet checkpoints; the digits after '-' start the file's SHA-256.
TORCHVISION_URL = "https://download.pytorch.org/models/"
TORCHVISION_URL_ENV = "JATTN_TORCHVISION_URL"  # overrides TORCHVISION_URL (a mirror, a test)
TORCHVISION_FILES = {arch: models.get(name).TORCHVISION[arch] for arch, name in archs().items()}


def download_torchvision(arch: str, out: str | None = None, *, base_url: str | None = None,
                         keep_pth: bool = False) -> str:
  """Downloads torchvision's `arch` checkpoint, checks it, converts it into `out`; returns `out`.

  `out` defaults to pretrained/<arch>; the .pth goes next to it (resumable, `jattn.core.download`)
  and is deleted after conversion unless `keep_pth` (a .pth already there is used, and kept).
  """
  if arch not in TORCHVISION_FILES:
    raise UserError(f"--download {arch!r}: use one of {sorted(TORCHVISION_FILES)}")
  if importlib.util.find_spec("torch") is None:
    raise UserError('reading the checkpoint needs PyTorch: pip install -e ".[convert]"')
  out = os.path.abspath(out or os.path.join("pretrained", arch))
  if os.path.exists(os.path.join(out, WEIGHTS_SUBDIR)):
    raise UserError(f"{out} already holds converted weights; choose another --out or remove it")
  name = TORCHVISION_FILES[arch]
  url = (base_url or os.environ.get(TORCHVISION_URL_ENV) or TORCHVISION_URL).rstrip("/") + "/"
  url += name
  pth = os.path.join(os.path.dirname(out), name)
  prefix = name.rsplit("-", 1)[1].removesuffix(".pth")
  hint = (f"download {url} by hand and run jattn convert --source torchvision --arch "
          f"{arch} --pth {name} --out {out}")
  fetched = not os.path.exists(pth)
  if fetched:
    digest = download.fetch(url, pth, sha256_prefix=prefix, hint=hint, desc=name)
  else:
    digest = files.sha256(pth)
    if not digest.startswith(prefix):
      raise UserError(f"{pth}: its SHA-256 starts {digest[:8]}, not {prefix} as its name says; "
                      f"delete it and run again")
  state_dict = load_state_dict(pth)
  # The classes and widths of the file: narrower copies of the layout (tests, mirrors) convert too.
  model_config = _backbone(arch).torchvision_model_config(arch, state_dict)
  variables = torch_to_flax(state_dict, model_config, "torchvision")
  n = sum(np.size(x) for x in jax.tree_util.tree_leaves(variables["params"]))
  save_weights(variables, out, {"source": "torchvision", "arch": arch, "url": url,
                                "sha256": digest, "num_params": int(n),
                                "model": model_config.to_dict()})
  if fetched and not keep_pth:
    os.remove(pth)
  print(f"wrote {n:,} parameters of {url} to {out}")
  return out


def convert(source: str, pth: str, out: str, *, arch: str | None = None,
            config: str | None = None) -> int:
  """Converts the PyTorch state dict `pth` (torchvision's `arch`, or the authors' model of the
  config file `config`) into `out` (`save_weights`); returns the number of parameters."""
  files.require_folder(out, "--out")
  state_dict = load_state_dict(pth)
  if source == "torchvision":
    if not arch:
      raise UserError(f"--source torchvision needs --arch (one of {', '.join(sorted(archs()))})")
    classes = _backbone(arch).torchvision_model_config(arch, state_dict).num_classes
    model_config = torchvision_model_config(arch, classes)
  else:
    if not config:
      raise UserError("--source reference needs --config (e.g. configs/reference.py)")
    model_config = config_lib.load_config(config).model
  variables = torch_to_flax(state_dict, model_config, source)
  n = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(variables.get("params", {}))))
  save_weights(variables, out, {
      "source": source, "arch": arch, "config": config, "pth": os.path.abspath(pth),
      "sha256": files.sha256(pth), "num_params": n, "model": model_config.to_dict(),
  })
  return n
