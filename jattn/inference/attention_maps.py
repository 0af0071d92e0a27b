r"""What the attention modules attend to, for a trained run and a few images.

For each S-Attn module (eqs. 7-12) the attention matrix E' is N x N over the N = H x W positions of
its feature map, and column n of E' holds the weights with which position n gathers all positions
(eq. 11: A_s[:, n] = sum_m S_V[:, m] E'[m, n]); each column sums to 1 (eq. 10). Shown here:
* the *query map* of a chosen position n: column n of E' reshaped to H x W, i.e. where n looks;
* the *received attention*: the row sums of E', how much attention each position receives in total.

For each C-Attn module (eqs. 1-6) the channel affinity D' is C x C, each column summing to 1
(eq. 4), and A_c = D'^T M_V is added to the features; shown are D' itself and the spatial map of
the norm of A_c over channels (where the channel attention changes the features most).

  jattn inspect --workdir runs/demo_ours/fold1 IMAGE_OR_FOLDER... --out attention/ \
      [--position 0.5,0.5]

writes one PNG per image with the input, the maps overlaid on it and the affinity matrices:
OUT/<name>_attention.png, <name> the image's file name without its extension; images whose names
would clash (the same name in different folders) get their parent folders in front, as many as
tell them apart (`figure_names`). Folders are read as by `jattn.inference.predict`.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Sequence

import jax
import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from jattn import models
from jattn.core import files
from jattn.core.errors import UserError
from jattn.evaluation import calibration
from jattn.inference import runs
from jattn.inference.predict import image_paths, load_images
from jattn.training import state as state_lib


@jax.jit
def _forward(state: state_lib.TrainState, images: jax.Array):
  """Class probabilities and the attention weights the modules sow."""
  logits, state_out = state.apply_fn(
      {"params": state.params, "batch_stats": state.batch_stats},
      state_lib.preprocess(state, state_lib.normalize_stains(state, images)), train=False,
      mutable=["intermediates"])
  return jax.nn.softmax(logits), state_out.get("intermediates", {})


def attention_maps(state: state_lib.TrainState, images: np.ndarray,
                   sites: Sequence[tuple[str, str, str]]
                   ) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
  """Runs the model on uint8 images [B, S, S, 3]: class probabilities [B, classes] and the
  attention of every module in `sites` (`models.attention_sites(config.model)`: module path, kind,
  label), in that order.

  The maps are keyed by module path (VGG: 'block3/s_attn'); each holds its 'kind' ('s_attn' or
  'c_attn'), its 'label' (where it sits, e.g. 'S-Attn after block 3') and 'grid' (H, W); S-Attn
  entries hold 'e_prime' [B, N, N]; C-Attn entries hold 'd_prime' [B, C, C] and 'a_c_norm'
  [B, H, W].
  """
  probs, inter = jax.device_get(_forward(state, images))
  out = {}
  for path, kind, where in sites:
    values = inter
    for part in path.split("/"):
      values = values[part]
    entry = {"kind": kind, "label": f"{KIND_NAMES[kind]} {where}"}
    if kind == "s_attn":
      e_prime = np.asarray(values["e_prime"][0])
      entry.update(e_prime=e_prime, grid=_grid(e_prime.shape[-1], images.shape[1:3]))
    else:
      a_c = np.asarray(values["a_c"][0], np.float32)
      entry.update(d_prime=np.asarray(values["d_prime"][0]),
                   a_c_norm=np.linalg.norm(a_c, axis=-1), grid=a_c.shape[1:3])
    out[path] = entry
  return np.asarray(probs), out


KIND_NAMES = {"s_attn": "S-Attn", "c_attn": "C-Attn"}


def _grid(n: int, image_hw: Sequence[int]) -> tuple[int, int]:
  """The H x W of a feature map with n positions, for an input of the given aspect."""
  h, w = image_hw
  for fh in range(1, n + 1):
    if n % fh == 0 and fh * w == (n // fh) * h:
      return fh, n // fh
  raise ValueError(f"cannot lay out {n} positions for an image of {h}x{w}")


def query_map(e_prime: np.ndarray, grid: tuple[int, int],
              position: tuple[float, float]) -> np.ndarray:
  """Column n of E' as an H x W map, n the feature position nearest the relative (row, col)."""
  h, w = grid
  r = min(int(position[0] * h), h - 1)
  c = min(int(position[1] * w), w - 1)
  return e_prime[..., :, r * w + c].reshape(*e_prime.shape[:-2], h, w)


def received(e_prime: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Total attention each position receives: the row sums of E', as an H x W map."""
  return e_prime.sum(axis=-1).reshape(*e_prime.shape[:-2], *grid)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """A heat map (any size) upsampled onto a uint8 RGB image, with matplotlib's 'jet' colours."""
  heat = np.asarray(heat, np.float64)
  span = heat.max() - heat.min()
  heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
  big = Image.fromarray(np.uint8(255 * heat)).resize(image.shape[1::-1], Image.Resampling.BILINEAR)
  colour = colormaps["jet"](np.asarray(big) / 255.0)[..., :3]
  return np.uint8((1 - alpha) * image + alpha * 255 * colour)


def figure(image: np.ndarray, maps: dict, index: int, position: tuple[float, float], title: str):
  """One matplotlib figure: the image, each module's maps over it, and each C-Attn's D'.

  Made without pyplot (no global backend switched, e.g. in a notebook; Agg when saved)."""
  panels = [("input", image, None)]
  for m in maps.values():
    key = m["label"]
    if m["kind"] == "s_attn":
      panels.append((f"{key}: received", overlay(image, received(m["e_prime"][index], m["grid"])),
                     None))
      panels.append((f"{key}: query ({position[0]:.2f}, {position[1]:.2f})",
                     overlay(image, query_map(m["e_prime"][index], m["grid"], position)), position))
    else:
      panels.append((f"{key}: |A_c|", overlay(image, m["a_c_norm"][index]), None))
      panels.append((f"{key}: D'", m["d_prime"][index], "matrix"))
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(3.2 * cols, 3.2 * rows))
  axes = fig.subplots(rows, cols, squeeze=False)
  for ax, (name, img, extra) in zip(axes.flat, panels, strict=False):
    if isinstance(extra, str):
      ax.imshow(img, cmap="viridis")
      ax.set_xlabel("j")
      ax.set_ylabel("i")
    else:
      ax.imshow(img)
      ax.set_xticks([])
      ax.set_yticks([])
      if extra is not None:
        ax.plot(extra[1] * image.shape[1], extra[0] * image.shape[0], "w+", ms=14, mew=2)
    ax.set_title(name, fontsize=8)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def figure_names(paths: Sequence[str]) -> list[str]:
  """A distinct output file name per image path: `<distinct_names>_attention.png`."""
  return [f"{n}_attention.png" for n in distinct_names(paths)]


def distinct_names(paths: Sequence[str]) -> list[str]:
  """A distinct name per path, never one for two files (compared ignoring case, for file systems
  that do): the file's stem; files whose stems clash get the fewest parent folders in front that
  tell them apart (`a_x_img`, `b_x_img`); files of one folder, their extension (`img_jpg`);
  anything still clashing, a number in input order (`img-2`)."""
  parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
  names = [""] * len(parts)

  def label(i: int, depth: int, extension: bool = False) -> str:
    *dirs, file = parts[i]
    stem, suffix = os.path.splitext(file)
    prefix = [d for d in dirs[max(len(dirs) - depth, 0):] if d]
    return "_".join([*prefix, stem + (f"_{suffix.lstrip('.')}" if extension else "")])

  def settle(group: list[int], depth: int) -> None:
    for clash in _clashes({i: label(i, depth) for i in group}, keep_single=True):
      if len(clash) == 1:
        names[clash[0]] = label(clash[0], depth)
      elif len({tuple(parts[i][:-1]) for i in clash}) > 1:  # different folders: one level up
        settle(clash, depth + 1)
      else:  # one folder: the extension tells them apart
        for i in clash:
          names[i] = label(i, depth, extension=True)

  settle(list(range(len(parts))), 0)
  for clash in _clashes(dict(enumerate(names))):  # the same name in one folder, or a prefixed
    for k, i in enumerate(clash[1:], 2):          # name that another file has
      names[i] = f"{names[i]}-{k}"
  return names


def _clashes(names: dict[int, str], keep_single: bool = False) -> list[list[int]]:
  """The indices of `names` grouped by name (ignoring case), in order; groups of one only with
  `keep_single`."""
  groups = collections.defaultdict(list)
  for i, name in names.items():
    groups[name.casefold()].append(i)
  return [g for g in groups.values() if keep_single or len(g) > 1]


def inspect_images(workdir: str, paths: Sequence[str], out_dir: str,
                   position: tuple[float, float] = (0.5, 0.5)) -> list[str]:
  """Writes one PNG per image (or per image in a folder) into out_dir; returns their paths."""
  files.require_folder(out_dir, "--out")
  unique = {}
  for path in image_paths(list(paths)):  # an image given twice is drawn once
    unique.setdefault(os.path.realpath(path), path)
  paths = list(unique.values())
  config = runs.load_config(workdir)
  sites = models.attention_sites(config.model)
  if not sites:
    raise UserError(f"{workdir}: this model ({config.name}) has no attention modules to inspect")
  config, state = runs.restore(workdir)
  images = load_images(list(paths), config.image_size)
  probs, maps = attention_maps(state, images, sites)
  probs = calibration.apply_temperature(probs, runs.temperature(workdir))  # as predict gives them
  os.makedirs(out_dir, exist_ok=True)
  written = []
  outputs = runs.outputs(config)
  for i, (path, name) in enumerate(zip(paths, figure_names(paths), strict=True)):
    if outputs.binary is not None:
      score = (f"P({outputs.binary.positive_name}) = "
               f"{outputs.binary.positive_probability(probs[i]):.3f}")
    else:
      k = int(np.argmax(probs[i]))
      score = f"{outputs.classes[k]} ({probs[i][k]:.3f})"
    fig = figure(images[i], maps, i, position,
                 f"{os.path.basename(path)}  {score}  ({config.name})")
    target = os.path.join(out_dir, name)
    with files.atomic_path(target) as tmp:
      fig.savefig(tmp, format="png", dpi=100)
    written.append(target)
  return written
