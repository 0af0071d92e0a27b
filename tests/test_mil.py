"""The MIL modules (jattn/models/mil.py) against NumPy transcriptions of their papers' equations,
written here from the papers (Ilse et al. 2018 eq. 9; Lu et al. 2021; Shao et al. 2021), on
small bags padded with garbage: padding changes nothing."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from jattn import models
from jattn.core.errors import UserError
from jattn.models import mil

D, H, L, K = 6, 8, 5, 3
LN_EPS = 1e-5


def _np(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), tree)


def _dense(p, x):
  return x @ p["kernel"] + (p["bias"] if "bias" in p else 0.0)


def _softmax(s, axis=-1):
  e = np.exp(s - s.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_gated(p, x):
  """Ilse et al. eq. 9 after h_k = ReLU(W_1 x_k + b_1): a_k, z = sum a_k h_k, logits."""
  h = np.maximum(_dense(p["fc"], x), 0.0)
  a_p = p["attention"]
  s = _dense(a_p["w"], np.tanh(_dense(a_p["v"], h)) * _sigmoid(_dense(a_p["u"], h)))[:, 0]
  a = _softmax(s)
  z = a @ h
  return h, a, _dense(p["classifier"], z)


def np_clam_instance_loss(p, h, a, label, k, subtyping):
  """CLAM's clustering loss: classifier `label` learns top-k attended -> 1, bottom-k -> 0;
  with subtyping, every other classifier learns top-k -> 0; cross-entropy, averaged."""
  order = np.argsort(-a)
  top, bottom = order[:k], order[::-1][:k]

  def ce(c, idx, target):
    logp = np.log(_softmax(_dense(p[f"instance_{c}"], h[idx])))
    return -logp[:, target]

  losses = [np.concatenate([ce(label, top, 1), ce(label, bottom, 0)]).mean()]
  if subtyping:
    losses += [ce(c, top, 0).mean() for c in range(K) if c != label]
  return float(np.mean(losses))


def _layer_norm(p, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + LN_EPS) * p["scale"] + p["bias"]


def _mhsa(p, x, heads):
  n, dim = x.shape
  d = dim // heads
  qkv = x @ p["qkv"]["kernel"]
  q, k, v = (qkv[:, i * dim:(i + 1) * dim].reshape(n, heads, d).transpose(1, 0, 2)
             for i in range(3))
  w = _softmax(q @ k.transpose(0, 2, 1) / math.sqrt(d))  # [heads, n, n]
  y = (w @ v).transpose(1, 0, 2).reshape(n, dim)
  return _dense(p["out"], y), w


def _depthwise(p, grid):
  """A depthwise 'same' convolution with zero padding, by its definition."""
  k = p["kernel"].shape[0]
  pad = k // 2
  s = grid.shape[0]
  padded = np.zeros((s + 2 * pad, s + 2 * pad, grid.shape[2]))
  padded[pad:pad + s, pad:pad + s] = grid
  out = np.zeros_like(grid)
  for i in range(k):
    for j in range(k):
      out += padded[i:i + s, j:j + s] * p["kernel"][i, j, 0]
  return out + p["bias"]


def np_transmil(p, x, heads):
  """Shao et al.: square the tokens (repeat the first s^2 - n), class token, layer, PPEG on the
  s x s grid, layer, LayerNorm, the class token's logits; exact softmax attention."""
  h = np.maximum(_dense(p["fc"], x), 0.0)
  n = len(h)
  s = math.ceil(math.sqrt(n))
  h = np.concatenate([h, h[:s * s - n]])
  t = np.concatenate([p["cls_token"][0], h])
  t = t + _mhsa(p["layer1"], _layer_norm(p["norm1"], t), heads)[0]
  grid = t[1:].reshape(s, s, -1)
  grid = grid + sum(_depthwise(p["ppeg"][f"conv{k}"], grid) for k in (7, 5, 3))
  t = np.concatenate([t[:1], grid.reshape(s * s, -1)])
  y, w = _mhsa(p["layer2"], _layer_norm(p["norm2"], t), heads)
  t = t + y
  logits = _dense(p["classifier"], _layer_norm(p["norm"], t[0]))
  to_tokens = w[:, 0, 1:].mean(0)
  attention = to_tokens[:n].copy()
  attention[:s * s - n] += to_tokens[n:]  # the copies of the first instances
  return attention, logits


def _padded_batch(bags, length, rng, scattered=False):
  """The bags padded to `length` with garbage; the real instances in order, at the front or
  (scattered) at random positions."""
  x = rng.normal(size=(len(bags), length, D)) * 50.0
  mask = np.zeros((len(bags), length), bool)
  places = []
  for b, bag in enumerate(bags):
    where = (np.sort(rng.choice(length, len(bag), replace=False)) if scattered
             else np.arange(len(bag)))
    x[b, where] = bag
    mask[b, where] = True
    places.append(where)
  return jnp.asarray(x, jnp.float32), jnp.asarray(mask), places


@pytest.fixture(scope="module")
def bags():
  rng = np.random.default_rng(0)
  return [rng.normal(size=(n, D)) for n in (7, 4, 10)]


def _init(model, seed=1):
  return mil.init_variables(model, jax.random.key(seed), D)


@pytest.mark.parametrize("scattered", [False, True])
def test_abmil_equals_the_gated_attention_equations_and_ignores_padding(bags, scattered):
  model = mil.ABMIL(K, H, L)
  variables = _init(model)
  p = _np(variables["params"])
  x, mask, places = _padded_batch(bags, 13, np.random.default_rng(2), scattered)
  out = jax.jit(model.apply)(variables, x, mask)
  for b, bag in enumerate(bags):
    _, a, logits = np_gated(p, bag)
    np.testing.assert_allclose(np.asarray(out["attention"][b, places[b]]), a, rtol=1e-5,
                               atol=1e-7)
    assert not np.delete(np.asarray(out["attention"][b]), places[b]).any()  # none on padding
    np.testing.assert_allclose(np.asarray(out["logits"][b]), logits, rtol=1e-5, atol=1e-5)
  alone = model.apply(variables, jnp.asarray(bags[0][None], jnp.float32),
                      jnp.ones((1, len(bags[0])), bool))
  np.testing.assert_allclose(alone["logits"][0], out["logits"][0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_sb_equals_its_equations_and_its_clustering_loss(bags, subtyping):
  model = mil.CLAMSB(K, H, L)
  variables = _init(model, seed=3)
  p = _np(variables["params"])
  x, mask, places = _padded_batch(bags, 12, np.random.default_rng(4), scattered=True)
  labels = jnp.asarray([2, 0, 1])
  out = jax.jit(model.apply)(variables, x, mask)
  loss = mil.clam_instance_loss(out, mask, labels, k=3, subtyping=subtyping)
  for b, bag in enumerate(bags):
    h, a, logits = np_gated(p, bag)
    np.testing.assert_allclose(np.asarray(out["attention"][b, places[b]]), a, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(out["logits"][b]), logits, rtol=1e-5, atol=1e-5)
    expected = np_clam_instance_loss(p, h, a, int(labels[b]), 3, subtyping)
    np.testing.assert_allclose(float(loss[b]), expected, rtol=1e-5)


@pytest.mark.slow
def test_transmil_equals_its_equations_with_exact_attention_and_ignores_padding(bags):
  model = mil.TransMIL(K, H, heads=2)
  variables = _init(model, seed=5)
  p = _np(variables["params"])
  # 13 and 17 instances give token grids of 4 x 4 and 5 x 5 around the bags' own 3x3, 2x2, 4x4;
  # the second attends its 26 tokens 5 queries at a time (the parameters are the same)
  for length, scattered, chunk in ((13, True, 512), (17, False, 5)):
    x, mask, places = _padded_batch(bags, length, np.random.default_rng(length), scattered)
    chunked = mil.TransMIL(K, H, heads=2, query_chunk=chunk)
    out = jax.jit(chunked.apply)(variables, x, mask)
    for b, bag in enumerate(bags):
      attention, logits = np_transmil(p, bag, heads=2)
      np.testing.assert_allclose(np.asarray(out["logits"][b]), logits, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(np.asarray(out["attention"][b, places[b]]), attention,
                                 rtol=1e-4, atol=1e-6)
      rest = np.delete(np.asarray(out["attention"][b]), places[b])
      assert not rest.any()


def test_grid_side_is_the_exact_ceiling_of_the_square_root():
  n = np.arange(1, 5000)
  assert np.array_equal(np.asarray(mil.grid_side(jnp.asarray(n))),
                        [math.isqrt(k - 1) + 1 for k in n])


def test_the_registry_builds_each_module_from_its_config():
  config = default.get_config()
  config.model.name = "clam_sb"
  config.model.num_classes = 2
  model = models.build_model(config.model)
  assert isinstance(model, mil.CLAMSB) and model.hidden == mil.DEFAULTS["hidden"]
  with config.model.unlocked():
    config.model.mil = ml_collections.ConfigDict({"hidden": 16, "instance_weight": 1.5})
  with pytest.raises(UserError, match=r"^config.model.mil.instance_weight=1.5: the weight"):
    models.check(config.model)
  config.model.name = "transmil"
  config.model.mil = ml_collections.ConfigDict({"hidden": 10, "heads": 4})
  with pytest.raises(UserError, match="hidden=10 is not a multiple of config.model.mil.heads=4"):
    models.check(config.model)
