"""Parameters per module and forward FLOPs of a config's model, with and without its attention.

  jattn models --config configs/ours.py [--config.model.width=0.5] [--image-size 224]

FLOPs come from XLA's cost analysis of the jitted forward pass (one image, before compilation);
the attention overhead is measured against the same network with the attention modules removed.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jattn import models
from jattn.core import config_lib
from jattn.core.errors import exit_on_user_error
from jattn.training import compat

PROG = "jattn models"


def parameter_table(model_config, params) -> list[tuple[str, int]]:
  """(module, parameter count) rows, as the backbone groups them (VGG: each block's convs and
  attention, then the classifier)."""
  return [(name, _count(tree)) for name, tree in models.of(model_config).parameter_groups(params)]


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def forward_flops(model, image_size: int) -> float:
  """FLOPs of one forward pass on one image_size x image_size image, from XLA's cost analysis."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def report(config, image_size: int) -> str:
  model = models.build_model(config.model)
  plain = models.build_model(models.without_attention(config.model))
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)["params"]
  rows = parameter_table(config.model, params)
  total = sum(n for _, n in rows)
  attention = sum(n for name, n in rows if name.endswith("Attn"))
  flops, plain_flops = forward_flops(model, image_size), forward_flops(plain, image_size)
  lines = [f"{config.name}: {config.paper_row or 'no paper row'}", f"{'module':<20}{'params':>14}"]
  lines += [f"{name:<20}{n:>14,}" for name, n in rows]
  lines += [
      f"{'total':<20}{total:>14,}",
      f"attention overhead: {attention:,} parameters = {100 * attention / (total - attention):.2f}%"
      f" of the network without attention ({total - attention:,})",
      f"forward pass, one {image_size}x{image_size} image: {flops / 1e9:.2f} GFLOPs "
      f"(without attention {plain_flops / 1e9:.2f} GFLOPs, overhead "
      f"{100 * (flops - plain_flops) / plain_flops:.2f}%)",
  ]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = config_lib.split_argv(argv)
  parser = argparse.ArgumentParser(prog=PROG,
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/ours.py", help="config file[:arg]")
  parser.add_argument("--image-size", type=int, default=None,
                      help="input size for the FLOPs (default: the config's image_size)")
  args = parser.parse_args(rest)
  with exit_on_user_error(PROG):
    config = compat.load_config(args.config, overrides)
    print(report(config, args.image_size or config.image_size))


