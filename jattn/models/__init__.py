"""jattn's models: a registry of backbones by `config.model.name`, each carrying the paper's
C-Attn and S-Attn (models/attention.py) where its config places them.

  model = models.build_model(config.model)          # e.g. VGG19 with C-Attn and S-Attn
  variables = models.init_variables(model, rng, config.image_size)

A backbone module (vgg.py: 'vgg19'; resnet.py: 'resnet18', 'resnet50') owns what only it knows:

  check(model_config, image_size)   its config fields (one UserError naming the field)
  build(model_config) -> nn.Module PLACEMENT                         {its attention placement field:
  the paper's placement} attention_sites(model_config)     [(module path, 'c_attn' | 's_attn',
  label)], in forward order without_attention(model_config)   the same backbone without attention
  modules ignored_fields(model_config)      model fields that change nothing it computes
  (jattn.training.compat) is_pretrained(path) -> bool       whether a parameter path comes from
  ImageNet (scope 'backbone') parameter_groups(params)          the rows of `jattn models`
  TORCHVISION: {arch: file}, torchvision_arch(model_config), torchvision_model_config(arch,
  state_dict), torch_key_map(model_config, source), rearrange(tensor, kind, name, model_config),
  check_state_dict(state_dict, model_config)   the conversion of PyTorch checkpoints (convert.py)
  feature_dim(model_config) -> int  D of `model.apply(..., return_features=True)`'s [B, D]: what
  head_params(model_config)         the final linear layer takes; that layer's parameter paths

The ViT presets (vit.py: 'dinov2_vits14_reg4', 'uni', 'virchow2', ...) own the same, less the
torchvision conversion (TORCHVISION is empty), plus what their published weights need:
load_weights(model_config) (config.model.weights), weights_record (the
`backbone` block of results.json), block_index(path) and num_blocks (train_last_blocks),
feature_dim and head_params (the pooled features and the final linear layer).

The MIL modules (mil.py: 'abmil', 'clam_sb', 'transmil') take bags of tile features [B, N, D]
with a mask [B, N] instead of images: `mil.init_variables` initialises them, and they own the
same hooks (no attention placement, no pretrained parameters, no torchvision conversion).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn
from flax import traverse_util

from jattn.core.errors import UserError

BACKBONES = {"vgg19": "jattn.models.vgg", "resnet18": "jattn.models.resnet",
             "resnet50": "jattn.models.resnet",
             # The ViT presets (jattn/models/vit.py, PRESETS): pathology foundation models.
             **{name: "jattn.models.vit" for name in (
                 "dinov2_vits14_reg4", "dinov2_vitb14_reg4", "uni", "uni2_h", "virchow2",
                 "h_optimus_0", "gigapath", "phikon_v2")},
             # Multiple-instance learning over a slide's tile features (jattn/models/mil.py).
             **{name: "jattn.models.mil" for name in ("abmil", "clam_sb", "transmil")}}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPES = ("auto", *_DTYPES)  # config.model.dtype
PRETRAINED_SCOPES = ("backbone", "all")  # what config.pretrained provides: the paper's, or all
S_ATTN_IMPLS = ("auto", "explicit", "fused")


def get(name: str) -> ModuleType:
  """The backbone module of `config.model.name`; an unknown name is one line with the choices."""
  if name not in BACKBONES:
    close = difflib.get_close_matches(str(name), BACKBONES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UserError(f"--config.model.name={name!r} is not a model: use one of "
                    f"{', '.join(BACKBONES)}{hint}")
  return importlib.import_module(BACKBONES[name])


def name_of(model_config: Mapping[str, Any]) -> str:
  """`model.name` (VGG19 for configs that predate it)."""
  return model_config.get("name", "vgg19")


def of(model_config: ml_collections.ConfigDict) -> ModuleType:
  """The backbone module a model config names."""
  return get(name_of(model_config))


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
  """'auto' is bfloat16 on accelerators (GPU, TPU) and float32 on CPU; other names stay."""
  if dtype != "auto":
    return dtype
  return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"


def resolve_s_attn_impl(impl: str) -> str:
  """'auto' is the explicit einsums everywhere (why: docs/performance.md, fused S-Attn)."""
  return "explicit" if impl == "auto" else impl


def check(model_config: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  """The fields every backbone shares, then the backbone's own."""
  mc = model_config
  if mc.dtype not in DTYPES:
    raise UserError(f"config.model.dtype={mc.dtype!r}: use one of {', '.join(DTYPES)}")
  s_attn_impl = mc.get("s_attn_impl", "auto")
  if s_attn_impl not in S_ATTN_IMPLS:
    raise UserError(f"config.model.s_attn_impl={s_attn_impl!r}: use one of "
                    f"{', '.join(S_ATTN_IMPLS)}")
  if mc.width <= 0 or mc.num_classes < 1:
    raise UserError("config.model.width and config.model.num_classes must be positive")
  backbone = of(mc)
  _check_foreign_placement(mc, backbone)
  _check_training_mode(mc, backbone)
  backbone.check(mc, image_size)


def _check_training_mode(mc: ml_collections.ConfigDict, backbone: ModuleType) -> None:
  """config.model.freeze and train_last_blocks (the last k blocks trained with a frozen backbone,
  for a backbone made of blocks), and config.model.weights (a backbone that reads such a file)."""
  k = mc.get("train_last_blocks", 0)
  if not isinstance(mc.get("freeze", False), bool):
    raise UserError(f"config.model.freeze={mc.freeze!r}: use True or False")
  if k and not mc.get("freeze", False):
    raise UserError(f"config.model.train_last_blocks={k} trains the last blocks of a frozen "
                    f"backbone: set --config.model.freeze=True too (without it every parameter "
                    f"is trained)")
  if k and not hasattr(backbone, "block_index"):
    raise UserError(f"config.model.train_last_blocks={k}: {name_of(mc)} is not made of "
                    f"numbered blocks; use it with a ViT preset, or 0")
  if mc.get("weights", "") and not hasattr(backbone, "load_weights"):
    raise UserError(f"config.model.weights={mc.weights!r}: {name_of(mc)} takes ImageNet weights "
                    f"from config.pretrained (jattn convert); config.model.weights is for the "
                    f"ViT presets")


def trainable(model_config: ml_collections.ConfigDict, path: tuple[str, ...]) -> bool:
  """Whether training updates the parameter at `path` (without the collection): all of them,
  unless config.model.freeze; then the backbone's pretrained parameters (`is_pretrained`) are
  frozen but for those of its last config.model.train_last_blocks blocks."""
  if not model_config.get("freeze", False):
    return True
  backbone = of(model_config)
  if not backbone.is_pretrained(path):
    return True
  k = model_config.get("train_last_blocks", 0)
  if not k:
    return False
  block = backbone.block_index(path)
  return block is not None and block >= backbone.num_blocks(model_config) - k


def weights_record(model_config: ml_collections.ConfigDict) -> dict | None:
  """What results.json records of a backbone's published weights (its preset, licence, file and
  sha256: `backbone` there), or None for a backbone without (VGG, ResNets: config.pretrained)."""
  record = getattr(of(model_config), "weights_record", None)
  return record(model_config) if record else None


def _check_foreign_placement(mc: ml_collections.ConfigDict, backbone: ModuleType) -> None:
  """Another backbone's placement fields must hold its paper placement or none: a config that
  moves them expects attention there, but this backbone never reads them."""
  others: dict[ModuleType, list[str]] = {}
  for name in BACKBONES:
    if get(name) is not backbone:
      others.setdefault(get(name), []).append(name)
  for other, names in others.items():
    for field, paper in other.PLACEMENT.items():
      value = tuple(mc.get(field, paper))
      if value not in ((), tuple(paper)):
        raise UserError(
            f"config.model.{field}={value} places attention in a {' or '.join(names)}, but "
            f"config.model.name={name_of(mc)!r} does not read it; place its attention with "
            f"config.model.{' and config.model.'.join(backbone.PLACEMENT)}")


def build_model(model_config: ml_collections.ConfigDict) -> nn.Module:
  """The model `config.model` describes; apply it as `model.apply(variables, x, train=False)`."""
  check(model_config)
  return of(model_config).build(model_config)


def compute_dtype(model_config: ml_collections.ConfigDict) -> Any:
  return _DTYPES[resolve_dtype(model_config.dtype)]


def bn_unbiased_running_var(model_config: ml_collections.ConfigDict) -> bool:
  """Whether batch norm keeps PyTorch's unbiased running variance (`jattn.models.norm`); configs
  written before `model.bn_unbiased_running_var` kept Flax's biased one."""
  return bool(model_config.get("bn_unbiased_running_var", False))


def attention_sites(model_config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
  """[(module path, 'c_attn' | 's_attn', label)] of the model's attention modules, in order."""
  return of(model_config).attention_sites(model_config)


def without_attention(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same backbone with no attention module (the baseline of the attention overhead)."""
  return of(model_config).without_attention(model_config)


def feature_dim(model_config: ml_collections.ConfigDict) -> int:
  """D of the features [B, D] that `model.apply(..., return_features=True)` returns: what the
  backbone's final linear layer takes."""
  return of(model_config).feature_dim(model_config)


def head_params(model_config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """The parameter-path prefixes (without the collection) of the final linear layer."""
  return of(model_config).head_params(model_config)


INIT_SIZE = 64  # the input side the variables are initialised at (`init_variables`)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int) -> dict:
  """The model's initial variables for image_size x image_size inputs.

  The variables do not depend on the input's size (an adaptive pool precedes the classifier) and
  Flax draws each from its module's path, so they are initialised at INIT_SIZE pixels (or less):
  the same values, without allocating a huge input (an absurd --config.image_size is then refused
  by the data checks, not by an out-of-memory). On CPU, XLA spends most of a minute optimising the
  ~40 random-number generators of an initialisation that runs once; compiling it without backend
  optimisation gives the same values in a few seconds.
  """
  size = min(image_size, INIT_SIZE)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  lowered = jax.jit(lambda rng, x: model.init(rng, x, train=False)).lower(rng, x)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(rng, jnp.zeros(x.shape, x.dtype))


def merge_pretrained(model_config: ml_collections.ConfigDict, variables: Mapping[str, Any],
                     pretrained: Mapping[str, Any], scope: str,
                     source: str = "pretrained") -> dict[str, Any]:
  """Copies pretrained weights into `variables`: the backbone's (scope 'backbone', the paper:
  every variable the backbone's `is_pretrained` names must be present with the right shape;
  attention modules and the head keep their initialisation) or all that match (scope 'all')."""
  if scope not in PRETRAINED_SCOPES:
    raise UserError(f"config.pretrained_scope={scope!r}: use one of {PRETRAINED_SCOPES}")
  is_pretrained = of(model_config).is_pretrained
  flat = traverse_util.flatten_dict(variables)
  given = traverse_util.flatten_dict(pretrained)
  copied = 0
  for key, value in flat.items():
    if scope == "backbone" and not is_pretrained(key[1:]):
      continue
    if key not in given:
      if scope == "backbone":
        raise UserError(f"{source}: no weights for {'/'.join(key)}; were they converted for "
                        f"this architecture (config.model.name={name_of(model_config)}, "
                        f"batch norm, model.width)?")
      continue
    if tuple(given[key].shape) != tuple(value.shape):
      raise UserError(f"{source}: {'/'.join(key)} has shape {tuple(given[key].shape)}, the model "
                      f"needs {tuple(value.shape)}; convert weights for this architecture")
    flat[key] = jnp.asarray(given[key], value.dtype)
    copied += 1
  if not copied:
    raise UserError(f"{source}: none of its weights fit this model")
  return traverse_util.unflatten_dict(flat)
