"""Attention-based multiple-instance learning over a slide's tile features: ABMIL, CLAM-SB and
TransMIL, each a Flax module over padded, masked bags.

  model = models.build_model(config.model)        # config.model.name: abmil | clam_sb | transmil
  variables = mil.init_variables(model, rng, feature_dim)
  out = model.apply(variables, x, mask)           # x [B, N, D] float, mask [B, N] bool
  out["logits"] [B, K], out["attention"] [B, N]   # padded instances get attention 0

A bag is a slide's tiles' features (`jattn features`, or CLAM's and TRIDENT's HDF5 files: the bag
source, jattn/data/bags.py); a batch holds B bags padded to one length N, `mask` True on each
bag's real instances. Padding changes nothing: a padded instance's attention score is the lowest
finite float before the softmax, so its weight is exactly 0, and no computation mixes instances
other than through those weights (TransMIL's token grid is built from the real instances alone,
below).

The modules (docs/mil.md has their equations):

- `ABMIL` (Ilse, Tomczak and Welling 2018, gated attention, their eq. 9): each instance embedded
  as h_k = ReLU(W_1 x_k + b_1), scored a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))), the
  bag z = sum_k a_k h_k, logits = W_c z + b_c. The paper's V, U and w have no biases; here they
  are Dense layers with biases (as CLAM's attention network), which the NumPy transcription in
  the tests includes.
- `CLAMSB` (Lu et al. 2021, the single-branch CLAM): the same gated attention pooling, plus one
  binary instance classifier per class on h_k. `clam_instance_loss` is its instance-level
  clustering loss: for the bag's class y, the B most attended instances are labelled 1 and the B
  least attended 0 for classifier y (and, with `subtyping`, the B most attended labelled 0 for
  every other classifier); the loss is the cross-entropy of those labels (the paper uses a smooth
  top-1 SVM loss; CLAM's code offers cross-entropy too), averaged per classifier and over the
  classifiers used. The training loss is (1 - c) * slide cross-entropy + c * instance loss,
  c = config.model.mil.instance_weight (the paper's c_2 = 0.3).
- `TransMIL` (Shao et al. 2021): h_k = ReLU(W_1 x_k + b_1); the n instances squared to s x s
  tokens (s = ceil(sqrt(n)), the first s^2 - n repeated at the end), a class token prepended, a
  Transformer layer (pre-LayerNorm multi-head self-attention, residual), the PPEG (the tokens as
  an s x s grid: identity + depthwise 7x7, 5x5 and 3x3 convolutions, zero-padded), a second
  layer, LayerNorm, and the class token's logits. The attention is EXACT softmax attention,
  masked, not the paper's Nystrom approximation: Nystrom's landmarks are means of segments of
  the padded sequence, so its output depends on the padding and on the bag's length modulo the
  landmark count, where exact attention is the function Nystrom approximates and padding leaves
  it unchanged. Its time is O(L^2) per head (L = s^2 + 1 tokens), its memory O(chunk x L): the
  queries are attended 512 at a time. Training samples large bags
  (config.data.bags.train_max_tiles); docs/mil.md says how far it goes.
  Its `attention` output is the class token's attention in the last layer (mean over heads),
  summed over each instance's copies.

Each module returns a dict: `logits` [B, K], `attention` [B, N] (0 on padding), `embedding`
[B, H] (the pooled bag), and for CLAM-SB `instance_logits` [B, K, N, 2].
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import linen as nn

from jattn.core.errors import UserError

NAMES = ("abmil", "clam_sb", "transmil")
# config.model.mil's fields and defaults (the MIL configs set them; CLAM's and TransMIL's widths).
DEFAULTS = {
    "hidden": 512,  # H: width of the instance embedding h_k = ReLU(W_1 x_k + b_1)
    "attention_dim": 256,  # L: width of the gated attention's V and U (ABMIL, CLAM-SB)
    "heads": 8,  # TransMIL's attention heads (H must be a multiple)
    "instance_weight": 0.3,  # CLAM-SB: c in (1 - c) * slide loss + c * instance loss
    "instance_k": 8,  # CLAM-SB: B, the most and least attended instances of the clustering loss
    "subtyping": False,  # CLAM-SB: the other classes' classifiers also see the top-B as negative
}
PLACEMENT: dict[str, tuple] = {}  # no C-Attn or S-Attn: the attention is the pooling
TORCHVISION: dict[str, str] = {}
LN_EPS = 1e-5  # LayerNorm's epsilon (PyTorch's, as TransMIL's code)
NEG = float(jnp.finfo(jnp.float32).min)  # the score of a padded instance: exp() of it is 0


def settings(model_config) -> dict:
  """config.model.mil with the DEFAULTS of the fields it lacks."""
  given = model_config.get("mil", None)
  given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given or {})
  return {**DEFAULTS, **given}


def _masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
  scores = jnp.where(mask, scores, NEG)
  return jax.nn.softmax(scores, axis=-1) * mask


class GatedAttention(nn.Module):
  """Ilse et al.'s gated attention: a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))."""

  dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, h, mask, train: bool = False):
    v = jnp.tanh(nn.Dense(self.dim, name="v")(h))
    u = jax.nn.sigmoid(nn.Dense(self.dim, name="u")(h))
    gated = nn.Dropout(self.dropout, deterministic=not train)(v * u)
    scores = nn.Dense(1, name="w")(gated)[..., 0]
    return jnp.where(mask, scores, NEG), _masked_softmax(scores, mask)


class ABMIL(nn.Module):
  """Gated-attention MIL (Ilse et al. 2018) over padded, masked bags."""

  num_classes: int
  hidden: int = 512
  attention_dim: int = 256
  dropout: float = 0.0
  instance_classifiers: bool = False  # CLAM-SB's one binary classifier per class (below)

  @nn.compact
  def __call__(self, x, mask, train: bool = False) -> dict[str, jax.Array]:
    mask = mask.astype(bool)
    h = nn.relu(nn.Dense(self.hidden, name="fc")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    scores, a = GatedAttention(self.attention_dim, self.dropout, name="attention")(h, mask, train)
    z = jnp.einsum("bn,bnh->bh", a, h)
    logits = nn.Dense(self.num_classes, name="classifier")(z)
    out = {"logits": logits, "attention": a, "scores": scores, "embedding": z}
    if self.instance_classifiers:
      out["instance_logits"] = jnp.stack(
          [nn.Dense(2, name=f"instance_{c}")(h) for c in range(self.num_classes)], 1)
    return out


class CLAMSB(ABMIL):
  """CLAM's single-branch model (Lu et al. 2021): ABMIL's pooling plus one binary instance
  classifier per class (`clam_instance_loss`)."""

  instance_classifiers: bool = True


def clam_instance_loss(out: Mapping[str, jax.Array], mask: jax.Array, labels: jax.Array, k: int,
                       subtyping: bool = False) -> jax.Array:
  """CLAM's instance-level clustering loss per bag [B] (module docstring). A bag with fewer than
  k real instances uses them all on each side (the most and the least attended then overlap)."""
  mask = mask.astype(bool)
  scores = out["scores"]  # padded: NEG
  inst = out["instance_logits"]  # [B, K, N, 2]
  num_classes = inst.shape[1]
  k = min(k, scores.shape[1])
  _, top = jax.lax.top_k(scores, k)  # [B, k]
  _, bottom = jax.lax.top_k(jnp.where(mask, -scores, NEG), k)
  top_ok = jnp.take_along_axis(mask, top, 1).astype(jnp.float32)
  bottom_ok = jnp.take_along_axis(mask, bottom, 1).astype(jnp.float32)

  def ce(logits_c, index, target, ok):  # logits_c [B, N, 2]
    chosen = jnp.take_along_axis(logits_c, index[..., None], 1)  # [B, k, 2]
    loss = optax.softmax_cross_entropy_with_integer_labels(
        chosen, jnp.full(index.shape, target, jnp.int32))
    return (loss * ok).sum(1), ok.sum(1)

  losses, used = [], []
  for c in range(num_classes):
    in_class = labels == c
    pos, n_pos = ce(inst[:, c], top, 1, top_ok)
    neg, n_neg = ce(inst[:, c], bottom, 0, bottom_ok)
    in_loss = (pos + neg) / jnp.maximum(n_pos + n_neg, 1.0)
    if subtyping:
      out_loss, n_out = ce(inst[:, c], top, 0, top_ok)
      out_loss = out_loss / jnp.maximum(n_out, 1.0)
    else:
      out_loss = jnp.zeros_like(in_loss)
    losses.append(jnp.where(in_class, in_loss, out_loss))
    used.append(jnp.where(in_class, 1.0, 1.0 if subtyping else 0.0))
  return jnp.stack(losses, 1).sum(1) / jnp.stack(used, 1).sum(1)


def grid_side(n: jax.Array) -> jax.Array:
  """ceil(sqrt(n)) of integers, exactly."""
  s = jnp.ceil(jnp.sqrt(n.astype(jnp.float32))).astype(jnp.int32)
  s = jnp.where(s * s < n, s + 1, s)
  return jnp.where((s - 1) * (s - 1) >= n, s - 1, s)


class MultiHeadSelfAttention(nn.Module):
  """Exact softmax multi-head self-attention over masked tokens. Queries are taken
  `query_chunk` at a time (`lax.map`), so the scores held at once are heads x chunk x L rather
  than heads x L x L; each query's row is computed as it would be whole. Also returns the first
  token's (the class token's) attention weights [B, heads, L]."""

  dim: int
  heads: int
  query_chunk: int = 512

  @nn.compact
  def __call__(self, x, mask):
    b, length, _ = x.shape
    d = self.dim // self.heads
    qkv = nn.Dense(3 * self.dim, use_bias=False, name="qkv")(x)
    q, k, v = (t.reshape(b, length, self.heads, d) for t in jnp.split(qkv, 3, axis=-1))
    q = q * d ** -0.5
    key_mask = mask[:, None, None, :]

    def attend(qc):  # [b, c, heads, d] -> [b, c, heads, d]
      w = _masked_softmax(jnp.einsum("bqhd,bkhd->bhqk", qc, k), key_mask)
      return jnp.einsum("bhqk,bkhd->bqhd", w, v)

    c = self.query_chunk
    if length <= c:
      y = attend(q)
    else:
      chunks = -(-length // c)
      padded = jnp.pad(q, ((0, 0), (0, chunks * c - length), (0, 0), (0, 0)))
      parts = jax.lax.map(attend, padded.reshape(b, chunks, c, self.heads, d).swapaxes(0, 1))
      y = parts.swapaxes(0, 1).reshape(b, chunks * c, self.heads, d)[:, :length]
    first = _masked_softmax(jnp.einsum("bhd,bkhd->bhk", q[:, 0], k), mask[:, None, :])
    return nn.Dense(self.dim, name="out")(y.reshape(b, length, self.dim)), first


class PPEG(nn.Module):
  """TransMIL's pyramid position encoding: tokens as an s x s grid (row-major), identity plus
  depthwise 7x7, 5x5 and 3x3 convolutions with zero padding. `side` [B] is each bag's s; the
  grid is laid in the top-left corner of a static S x S one whose rest is 0, which is the
  zero padding a convolution on the s x s grid sees."""

  dim: int

  @nn.compact
  def __call__(self, tokens, side):
    b, length, c = tokens.shape
    big = math.isqrt(length)
    assert big * big == length
    r = jnp.arange(big)
    pos = r[:, None] * side[:, None, None] + r[None, None, :]  # [B, S, S]
    inside = (r[None, :, None] < side[:, None, None]) & (r[None, None, :] < side[:, None, None])
    grid = jnp.take_along_axis(tokens, jnp.clip(pos, 0, length - 1).reshape(b, -1, 1), 1)
    grid = (grid.reshape(b, big, big, c) * inside[..., None])
    out = grid
    for k in (7, 5, 3):
      out = out + nn.Conv(c, (k, k), padding="SAME", feature_group_count=c, name=f"conv{k}")(grid)
    i = jnp.arange(length)
    row = i[None] // side[:, None]
    col = i[None] % side[:, None]
    valid = i[None] < (side * side)[:, None]
    flat = out.reshape(b, big * big, c)
    back = jnp.take_along_axis(flat, jnp.clip(row * big + col, 0, length - 1)[..., None], 1)
    return back * valid[..., None]


class TransMIL(nn.Module):
  """TransMIL (Shao et al. 2021) with exact attention (module docstring)."""

  num_classes: int
  hidden: int = 512
  heads: int = 8
  dropout: float = 0.0
  query_chunk: int = 512  # queries attended at a time (MultiHeadSelfAttention)

  @nn.compact
  def __call__(self, x, mask, train: bool = False) -> dict[str, jax.Array]:
    b, n_max, _ = x.shape
    mask = mask.astype(bool)
    # the real instances first, in their order (a stable sort of the mask)
    perm = jnp.argsort(~mask, axis=1, stable=True)
    h = nn.relu(nn.Dense(self.hidden, name="fc")(x))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = jnp.take_along_axis(h, perm[..., None], 1)
    n = mask.sum(1).astype(jnp.int32)
    side = grid_side(jnp.maximum(n, 1))
    big = math.isqrt(n_max - 1) + 1  # ceil(sqrt(n_max))
    length = big * big
    i = jnp.arange(length)[None]
    src = jnp.clip(jnp.where(i < n[:, None], i, i - n[:, None]), 0, n_max - 1)  # [B, L]
    valid = i < (side * side)[:, None]
    seq = jnp.take_along_axis(h, src[..., None], 1) * valid[..., None]
    cls = self.param("cls_token", nn.initializers.normal(1.0), (1, 1, self.hidden))
    tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.hidden)), seq], 1)
    tmask = jnp.concatenate([jnp.ones((b, 1), bool), valid], 1)
    y, _ = MultiHeadSelfAttention(self.hidden, self.heads, self.query_chunk, name="layer1")(
        nn.LayerNorm(LN_EPS, name="norm1")(tokens), tmask)
    tokens = tokens + y
    grid = PPEG(self.hidden, name="ppeg")(tokens[:, 1:], side)
    tokens = jnp.concatenate([tokens[:, :1], grid], 1)
    y, weights = MultiHeadSelfAttention(self.hidden, self.heads, self.query_chunk,
                                        name="layer2")(
        nn.LayerNorm(LN_EPS, name="norm2")(tokens), tmask)
    tokens = tokens + y
    z = nn.LayerNorm(LN_EPS, name="norm")(tokens[:, 0])
    logits = nn.Dense(self.num_classes, name="classifier")(z)
    # the class token's attention to each token, summed over each instance's copies
    to_tokens = weights[:, :, 1:].mean(1) * valid  # [B, L]
    sorted_att = jax.vmap(lambda w, s: jax.ops.segment_sum(w, s, n_max))(to_tokens, src)
    attention = jax.vmap(lambda a, p: jnp.zeros_like(a).at[p].set(a))(sorted_att, perm) * mask
    return {"logits": logits, "attention": attention, "embedding": z}


# ---------------------------------------------------------------------------------------------
# The registry's hooks (jattn/models/__init__.py).


def check(model_config: ml_collections.ConfigDict, image_size: int | None = None) -> None:
  name = model_config.get("name")
  s = settings(model_config)
  unknown = sorted(set(s) - set(DEFAULTS))
  if unknown:
    raise UserError(f"config.model.mil.{unknown[0]} is not a MIL field: use "
                    f"{', '.join(DEFAULTS)}")
  for field in ("hidden", "attention_dim", "heads", "instance_k"):
    if not (isinstance(s[field], int) and not isinstance(s[field], bool) and s[field] >= 1):
      raise UserError(f"config.model.mil.{field}={s[field]!r}: a positive integer")
  if not 0 <= s["instance_weight"] <= 1:
    raise UserError(f"config.model.mil.instance_weight={s['instance_weight']!r}: the weight c "
                    f"of CLAM's instance loss in (1 - c) * slide loss + c * instance loss, in "
                    f"[0, 1]")
  if name == "transmil" and s["hidden"] % s["heads"]:
    raise UserError(f"config.model.mil.hidden={s['hidden']} is not a multiple of "
                    f"config.model.mil.heads={s['heads']}")
  if not 0 <= model_config.get("dropout_rate", 0.0) < 1:
    raise UserError(f"config.model.dropout_rate={model_config.dropout_rate}: in [0, 1)")


def build(model_config: ml_collections.ConfigDict) -> nn.Module:
  s = settings(model_config)
  name, k = model_config.name, model_config.num_classes
  dropout = float(model_config.get("dropout_rate", 0.0))
  if name == "abmil":
    return ABMIL(k, s["hidden"], s["attention_dim"], dropout)
  if name == "clam_sb":
    return CLAMSB(k, s["hidden"], s["attention_dim"], dropout)
  if name == "transmil":
    return TransMIL(k, s["hidden"], s["heads"], dropout)
  raise AssertionError(name)


def init_variables(model: nn.Module, rng: jax.Array, feature_dim: int, length: int = 4) -> dict:
  """The module's variables for bags of `feature_dim` features (they do not depend on N),
  compiled without XLA's backend optimisation on CPU as `models.init_variables` (the same
  values, sooner)."""
  x = jax.ShapeDtypeStruct((1, length, feature_dim), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  lowered = jax.jit(model.init).lower(rng, x, mask)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return lowered.compile(compiler_options=options)(
      rng, jnp.zeros(x.shape, x.dtype), jnp.ones(mask.shape, bool))


def is_mil(model_config: Mapping[str, Any]) -> bool:
  return model_config.get("name") in NAMES


def attention_sites(model_config) -> list[tuple[str, str, str]]:
  return []  # no C-Attn or S-Attn


def without_attention(model_config):
  return model_config


def ignored_fields(model_config) -> tuple[str, ...]:
  """The image backbones' fields, which change nothing a MIL module computes."""
  return ("batch_norm", "classifier_width", "pool_size", "width", "bn_unbiased_running_var",
          "c_attn_blocks", "s_attn_blocks", "c_attn_stages", "s_attn_stages",
          "vit_c_attn_blocks", "vit_s_attn_blocks", "vit", "weights", "freeze",
          "train_last_blocks", "c_attn_kernel", "c_attn_stride", "c_attn_padding",
          "s_attn_reduction", "s_attn_impl")


def is_pretrained(path: Sequence[str]) -> bool:
  return False  # trained from scratch on frozen features


def feature_dim(model_config) -> int:
  """The pooled bag's width, what the classifier takes."""
  return settings(model_config)["hidden"]


def head_params(model_config) -> tuple[tuple[str, ...], ...]:
  return (("classifier",),)


def parameter_groups(params: Mapping[str, Any]) -> list[tuple[str, Any]]:
  return [(name, params[name]) for name in params]


def torchvision_arch(model_config) -> str:
  raise UserError(f"config.model.name={model_config.name!r} is a MIL module trained on tile "
                  f"features; it takes no torchvision weights: set --config.pretrained=''")
