"""Loading configs (Python files returning an ml_collections.ConfigDict) and command-line overrides.

A config is named as `path` or `path:arg` (big_vision style): `configs/demo.py:vgg19_s` calls
`get_config("vgg19_s")`. Overrides are `field.sub=value` strings, the command line's
`--config.field.sub=value`; a value is parsed by the type of the field it replaces, and an unknown
field, a wrong type or an out-of-range value is a `UserError` that names it.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from jattn.core.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Runs the config file `path[:arg]` and returns its `get_config([arg])`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise UserError(f"config file {path!r} not found; the configs live in the repository's "
                    f"configs/ folder (e.g. --config configs/demo.py)")
  path = os.path.abspath(path)
  # Configs import their defaults as `from configs import default`: make that package importable.
  folder = os.path.dirname(path)
  if os.path.isfile(os.path.join(folder, "__init__.py")):
    root = os.path.dirname(folder)
    if root not in sys.path:
      sys.path.insert(0, root)
  name = "jattn_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {path}, line {e.lineno}: {e.msg}; fix the file") from None
  except (ImportError, NameError) as e:
    raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} defines no get_config()")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # a config's own refusal of its argument: its message says it all
    raise UserError(f"--config {spec}: {e}") from None
  except (ImportError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"config {spec!r} failed: {type(e).__name__}: {e}") from None
  config.lock()  # a typo in an override is an error, never a new field
  return config


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies `a.b=value` overrides in place, parsing each value by the type of `a.b`. A changed
  `model.name` renames the run where its name spells the old model (demo_resnet50_ours with
  resnet18 becomes demo_resnet18_ours), unless `name` is given too."""
  model_before = _model_name(config)
  given = set()
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise UserError(f"--config.{item}: give a value, as in --config.{key}=VALUE")
    parent, field = _resolve(config, key)
    current = parent[field]
    if isinstance(current, ml_collections.ConfigDict):
      raise UserError(f"config.{key} is a group of fields; set one of them, e.g. "
                      f"--config.{key}.{next(iter(current.keys()))}=...")
    with parent.unlocked():
      parent[field] = _parse(key, raw, current)
    given.add(key)
  model_after = _model_name(config)
  if model_before and model_after and model_after != model_before and "name" not in given and (
      isinstance(config.get("name"), str)):
    parts = config.name.split("_")
    if model_before in parts:
      config.name = "_".join(model_after if p == model_before else p for p in parts)
  return config


def _model_name(config: ml_collections.ConfigDict) -> str | None:
  model = config.get("model")
  return model.get("name") if isinstance(model, ml_collections.ConfigDict) else None


def _resolve(config: ml_collections.ConfigDict, key: str):
  parts = key.split(".")
  node = config
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, options, n=1)
      hint = f"; did you mean {'.'.join(parts[:i] + close[:1])!r}?" if close else ""
      raise UserError(f"unknown config field {key!r} (no {part!r} in {where}){hint}")
    if i == len(parts) - 1:
      return node, part
    node = node[part]
  raise AssertionError


def _parse(key: str, raw: str, current: Any) -> Any:
  try:
    if isinstance(current, bool):
      if raw.lower() in _TRUE | _FALSE:
        return raw.lower() in _TRUE
      raise ValueError
    if isinstance(current, int):
      return int(raw)
    if isinstance(current, float):
      return float(raw)
    if isinstance(current, (tuple, list)):
      text = raw.strip()
      if text in ("", "()", "[]"):
        return ()
      if current and all(isinstance(v, str) for v in current) and text[0] not in "([":
        return tuple(v.strip().strip("'\"") for v in text.split(",") if v.strip())  # 100X,200X
      value = ast.literal_eval(text if text[0] in "([" else f"({text},)")
      return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if isinstance(current, str) or current is None:
      return raw
  except (ValueError, SyntaxError):
    pass
  raise UserError(f"--config.{key}={raw!r}: expected a value of type {type(current).__name__} "
                  f"(like {current!r})")


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` (and `--config.a.b v`) overrides from the other arguments."""
  overrides, rest = [], []
  args = list(argv)
  while args:
    a = args.pop(0)
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body and args and not args[0].startswith("--"):
        body = f"{body}={args.pop(0)}"
      overrides.append(body)
    else:
      rest.append(a)
  return overrides, rest
