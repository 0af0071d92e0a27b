"""C-Attn and S-Attn against a NumPy transcription of the paper's equations; VGG19 structure."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from jattn import models
from jattn.core.errors import UserError
from jattn.models.attention import ChannelAttention, SpatialAttention
from jattn.training import state as state_lib


def conv2d_chw(x, w, stride=1, pad=0):
  """Plain convolution of x [C, H, W] with a Flax kernel w [kh, kw, C_in, C_out], no bias."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
  kh, kw, _, c_out = w.shape
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((c_out, ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum("chw,co->ohw", patch, w[i, j])
  return out


def softmax_columns(z):
  """Eqs. (4) and (10): z'_ij = exp(z_ij) / sum_i exp(z_ij)."""
  e = np.exp(z - z.max(axis=0, keepdims=True))
  return e / e.sum(axis=0, keepdims=True)


def c_attn_numpy(f, p, kernel, stride, padding):
  """Eqs. (1)-(6) for one feature map F [C, H, W], in the paper's matrix notation."""
  c, h, w = f.shape
  m_q = conv2d_chw(f, p["m_q"]["kernel"], stride, padding).reshape(c, -1)  # (1): C x N'
  m_k = conv2d_chw(f, p["m_k"]["kernel"], stride, padding).reshape(c, -1)
  m_v = conv2d_chw(f, p["m_v"]["kernel"]).reshape(c, -1)  # C x N
  d = m_q @ m_k.T  # (2)
  d_prime = softmax_columns(d)  # (3), (4)
  a_c = d_prime.T @ m_v  # (5)
  return f + a_c.reshape(c, h, w), d_prime  # (6)


def s_attn_numpy(f, p):
  """Eqs. (7)-(12) for one feature map F [C, H, W]."""
  c, h, w = f.shape
  s_q = conv2d_chw(f, p["s_q"]["kernel"]).reshape(-1, h * w)  # (7): C' x N
  s_k = conv2d_chw(f, p["s_k"]["kernel"]).reshape(-1, h * w)
  s_v = conv2d_chw(f, p["s_v"]["kernel"]).reshape(c, h * w)
  e = s_q.T @ s_k  # (8): N x N
  e_prime = softmax_columns(e)  # (9), (10)
  a_s = s_v @ e_prime  # (11)
  return f + a_s.reshape(c, h, w), e_prime  # (12)


def _init(module, x, qk_names, scale=0.1):
  variables = module.init(jax.random.key(1), x)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  for name in qk_names:  # keep the logits O(1) so that the test sees the softmax, not saturation
    params[name]["kernel"] = params[name]["kernel"] * scale
  return {"params": params}


@pytest.mark.parametrize("kernel,stride,padding", [(4, 4, 0), (7, 4, 3)])
def test_channel_attention_matches_equations(kernel, stride, padding):
  b, h, w, c = 3, 12, 20, 8  # batch > 1, H != W
  x = jax.random.normal(jax.random.key(0), (b, h, w, c))
  module = ChannelAttention(kernel, stride, padding)
  variables = _init(module, x, ("m_q", "m_k"))
  y, state = module.apply(variables, x, mutable=["intermediates"])
  d_prime = state["intermediates"]["d_prime"][0]
  for i in range(b):
    want, want_d = c_attn_numpy(np.asarray(x[i], np.float64).transpose(2, 0, 1),
                                variables["params"], kernel, stride, padding)
    np.testing.assert_allclose(np.asarray(y[i]).transpose(2, 0, 1), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(d_prime[i], want_d, atol=1e-5)
  # Eq. (4): each column of D' sums to 1 over the row index; rows do not.
  np.testing.assert_allclose(d_prime.sum(axis=1), 1.0, atol=1e-5)
  assert np.abs(np.asarray(d_prime.sum(axis=2)) - 1.0).max() > 1e-2


def test_spatial_attention_matches_equations():
  b, h, w, c = 2, 6, 9, 16
  x = jax.random.normal(jax.random.key(0), (b, h, w, c))
  module = SpatialAttention(reduction=8)
  variables = _init(module, x, ("s_q", "s_k"), scale=0.5)
  y, state = module.apply(variables, x, mutable=["intermediates"])
  e_prime = state["intermediates"]["e_prime"][0]
  assert variables["params"]["s_q"]["kernel"].shape == (1, 1, c, c // 8)
  assert variables["params"]["s_v"]["kernel"].shape == (1, 1, c, c)
  for i in range(b):
    want, want_e = s_attn_numpy(np.asarray(x[i], np.float64).transpose(2, 0, 1),
                                variables["params"])
    np.testing.assert_allclose(np.asarray(y[i]).transpose(2, 0, 1), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(e_prime[i], want_e, atol=1e-5)
  # Eq. (10): columns of E' (over positions m) sum to 1.
  np.testing.assert_allclose(e_prime.sum(axis=1), 1.0, atol=1e-5)
  assert np.abs(np.asarray(e_prime.sum(axis=2)) - 1.0).max() > 1e-2


def test_attention_weights_are_sown_only_when_asked():
  x = jnp.ones((1, 8, 8, 16))
  module = SpatialAttention(8)
  variables = module.init(jax.random.key(0), x)
  assert set(variables) == {"params"}  # nothing recorded unless 'intermediates' is mutable
  _, state = module.apply(variables, x, mutable=["intermediates"])
  assert state["intermediates"]["e_prime"][0].shape == (1, 64, 64)


def _model_config(**kw):
  mc = default.get_config().model
  mc.update(kw)
  return mc


def _num_params(mc: ml_collections.ConfigDict) -> int:
  model = models.build_model(mc)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))


# Parameter counts, derived by hand for 2 classes and the paper's settings (C-Attn kernel 4,
# S-Attn r = 8). VGG19 convs (3x3, weights + biases), per block:
#   block 1:  3*64*9+64 + 64*64*9+64                       =     38,720
#   block 2:  64*128*9+128 + 128*128*9+128                 =    221,440
#   block 3:  128*256*9+256 + 3*(256*256*9+256)            =  2,065,408
#   block 4:  256*512*9+512 + 3*(512*512*9+512)            =  8,259,584
#   block 5:  4*(512*512*9+512)                            =  9,439,232   -> convs 20,024,384
# classifier: 25088*4096+4096 + 4096*4096+4096 + 4096*2+2 = 119,554,050   -> VGG19 139,578,434
# C-Attn on C channels: two 4x4 convs C->C and a 1x1 C->C, no bias: 33*C^2
#   block 1 (C=64): 135,168; block 2 (C=128): 540,672                      -> C      675,840
# S-Attn on C channels: two 1x1 C->C/8 and one 1x1 C->C, no bias: C^2/4 + C^2 = 5*C^2/4
#   block 3 (C=256): 81,920; blocks 4, 5 (C=512): 327,680 each              -> S      737,280
@pytest.mark.parametrize("c_blocks,s_blocks,expected", [
    ((), (), 139_578_434),
    ((1, 2), (), 140_254_274),
    ((), (3, 4, 5), 140_315_714),
    ((1, 2), (3, 4, 5), 140_991_554),
])
def test_parameter_counts(c_blocks, s_blocks, expected):
  assert _num_params(_model_config(c_attn_blocks=c_blocks, s_attn_blocks=s_blocks)) == expected


def test_structure_and_placement():
  mc = _model_config(width=0.125, classifier_width=32, batch_norm=True)
  model = models.build_model(mc)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  params = variables["params"]
  assert [len([k for k in params[f"block{b}"] if k.startswith("conv")]) for b in range(1, 6)] == [
      2, 2, 4, 4, 4]
  assert [b for b in range(1, 6) if "c_attn" in params[f"block{b}"]] == [1, 2]
  assert [b for b in range(1, 6) if "s_attn" in params[f"block{b}"]] == [3, 4, 5]
  assert set(variables["batch_stats"]["block1"]) == {"bn1", "bn2"}
  assert params["classifier"]["fc1"]["kernel"].shape == (7 * 7 * 64, 32)


@pytest.fixture(scope="module")
def narrow_model():
  """A model of width 1/8 and its initial variables (for 40x40 inputs; shapes do not depend on
  the size), initialised once for the tests below."""
  model = models.build_model(_model_config(width=0.125, classifier_width=32))
  return model, models.init_variables(model, jax.random.key(1), 40)


def test_forward_shapes_and_dropout(narrow_model):
  model, variables = narrow_model
  x = jax.random.normal(jax.random.key(0), (3, 40, 56, 3))
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (3, 2) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(logits, model.apply(variables, x, train=False))
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(a, b)  # dropout is active in training only


def test_bfloat16_keeps_attention_softmax_in_float32():
  mc = _model_config(width=0.125, classifier_width=32, dtype="bfloat16")
  model = models.build_model(mc)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = models.init_variables(model, jax.random.key(1), 64)
  logits, state = model.apply(variables, x, mutable=["intermediates"])
  assert logits.dtype == jnp.float32
  assert state["intermediates"]["block1"]["c_attn"]["d_prime"][0].dtype == jnp.float32
  assert state["intermediates"]["block3"]["s_attn"]["e_prime"][0].dtype == jnp.float32
  assert jax.tree_util.tree_leaves(variables["params"])[0].dtype == jnp.float32


@pytest.mark.parametrize("field,value,match", [
    ("c_attn_blocks", (0, 1), "blocks are numbered 1 to 5"),
    ("s_attn_blocks", (6,), "blocks are numbered 1 to 5"),
    ("dtype", "float64", "config.model.dtype"),
    ("s_attn_impl", "flash", "config.model.s_attn_impl"),
])
def test_bad_model_config(field, value, match):
  with pytest.raises(UserError, match=match):
    models.build_model(_model_config(**{field: value}))


def test_initialisers_are_he_normal_fan_out_convs_and_normal_0_01_linear_layers(narrow_model):
  """Guards against a wrong initialisation of whatever is not loaded from ImageNet (fan-in instead
  of fan-out, a truncated or uniform draw, non-zero biases): torchvision's VGG draws conv kernels
  from N(0, 2 / (k * k * C_out)) and linear weights from N(0, 0.01^2). Checked by mean, standard
  deviation and kurtosis (3 for a normal draw, ~2.4 truncated at 2 std, 1.8 uniform), with
  tolerances of about 10 standard errors, on layers with C_in != C_out so fan-in and fan-out
  differ."""
  p = narrow_model[1]["params"]

  def check(kernel, std, std_tolerance, kurtosis_tolerance):
    x = np.asarray(kernel, np.float64).ravel()
    z = (x - x.mean()) / x.std()
    assert abs(x.mean()) < 5 * std / np.sqrt(x.size), (kernel.shape, x.mean())
    assert x.std() == pytest.approx(std, rel=std_tolerance), kernel.shape
    assert np.mean(z ** 4) == pytest.approx(3.0, abs=kurtosis_tolerance), kernel.shape

  check(p["block4"]["conv1"]["kernel"], np.sqrt(2 / (9 * 64)), 0.05, 0.4)  # 3x3, 32 -> 64
  check(p["block3"]["s_attn"]["s_q"]["kernel"], np.sqrt(2 / 4), 0.7, 3)  # 1x1, 32 -> 4, 128 draws
  check(p["classifier"]["fc1"]["kernel"], 0.01, 0.02, 0.15)  # 3,136 x 32
  # All 16 convs together, each in units of its own He fan-out std: one normal draw.
  z = np.concatenate([np.ravel(p[f"block{b}"][name]["kernel"]) / np.sqrt(
      2 / (9 * p[f"block{b}"][name]["kernel"].shape[-1]))
      for b in range(1, 6) for name in p[f"block{b}"] if name.startswith("conv")])
  assert z.size > 300_000 and z.std() == pytest.approx(1, rel=0.01)
  assert np.mean(z ** 4) / z.var() ** 2 == pytest.approx(3.0, abs=0.1)
  biases = [v for path, v in jax.tree_util.tree_leaves_with_path(p) if path[-1].key == "bias"]
  assert len(biases) == 16 + 3 and all(np.all(np.asarray(b) == 0) for b in biases)


# `jattn models` at width 1/8 (8-8, 16-16, 32 x4, 64 x4, 64 x4 channels), 2 classes,
# classifier width 32, pool 7, C-Attn (kernel 4) on blocks 1-2, S-Attn (r = 8) on blocks 3-5:
#   block 1 convs: 3*8*9+8 + 8*8*9+8                   =     808;  C-Attn 33 * 8^2   =  2,112
#   block 2 convs: 8*16*9+16 + 16*16*9+16              =   3,488;  C-Attn 33 * 16^2  =  8,448
#   block 3 convs: 16*32*9+32 + 3*(32*32*9+32)         =  32,384;  S-Attn 5/4 * 32^2 =  1,280
#   block 4 convs: 32*64*9+64 + 3*(64*64*9+64)         = 129,280;  S-Attn 5/4 * 64^2 =  5,120
#   block 5 convs: 4*(64*64*9+64)                      = 147,712;  S-Attn 5/4 * 64^2 =  5,120
#   classifier:    64*49*32+32 + 32*32+32 + 32*2+2     = 101,506
#   convs 313,672 + classifier 101,506 + attention 22,080 = 437,258
def test_models_command_counts_parameters(capsys):
  """Guards against `jattn models` reporting wrong parameter counts (modules missed,
  attention attributed to the wrong block): its table against the count derived by hand."""
  from jattn.cli import models as models_cli

  models_cli.main(["--config", "configs/ours.py", "--config.model.width=0.125",
                   "--config.model.classifier_width=32", "--image-size", "32"])
  out = capsys.readouterr().out
  rows = dict(re.findall(r"^(\w[\w -]*?)\s+([\d,]+)$", out, re.MULTILINE))
  counts = {name: int(n.replace(",", "")) for name, n in rows.items()}
  assert counts == {
      "block1 convs": 808, "block1 C-Attn": 2_112, "block2 convs": 3_488, "block2 C-Attn": 8_448,
      "block3 convs": 32_384, "block3 S-Attn": 1_280, "block4 convs": 129_280,
      "block4 S-Attn": 5_120, "block5 convs": 147_712, "block5 S-Attn": 5_120,
      "classifier": 101_506, "total": 437_258}
  assert "attention overhead: 22,080 parameters" in out


def test_fused_spatial_attention_equals_explicit():
  """The fused S-Attn (one dot_product_attention, r heads sharing S_Q and S_K) computes eqs.
  (8)-(12) as the explicit einsums do, gradients included, and still records E' when asked.
  Guards against swapped query/key (a row-wise softmax), a 1/sqrt(d) scale or mixed-up heads."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 9, 32))
  explicit, fused = SpatialAttention(8), SpatialAttention(8, impl="fused")
  variables = _init(explicit, x, ("s_q", "s_k"), scale=0.5)
  want = explicit.apply(variables, x)
  np.testing.assert_allclose(fused.apply(variables, x), want, atol=1e-5, rtol=1e-5)
  loss = lambda m: lambda v: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
  for a, b in zip(jax.tree_util.tree_leaves(jax.grad(loss(explicit))(variables)),
                  jax.tree_util.tree_leaves(jax.grad(loss(fused))(variables)), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)
  y, state = fused.apply(variables, x, mutable=["intermediates"])  # inspection: E' materialised
  np.testing.assert_allclose(y, want, atol=1e-6)
  assert state["intermediates"]["e_prime"][0].shape == (2, 54, 54)


def test_fused_model_equals_explicit_model():
  """config.model.s_attn_impl reaches every S-Attn of the network: same logits either way."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  explicit = models.build_model(_model_config(width=0.125, classifier_width=16, pool_size=1,
                                              s_attn_impl="explicit"))
  fused = models.build_model(_model_config(width=0.125, classifier_width=16, pool_size=1,
                                           s_attn_impl="fused"))
  assert fused.s_attn_impl == "fused"
  variables = models.init_variables(explicit, jax.random.key(1), 32)
  np.testing.assert_allclose(fused.apply(variables, x), explicit.apply(variables, x),
                             atol=1e-4, rtol=1e-4)


def test_auto_dtype_and_s_attn_impl():
  """'auto' computes in float32 on CPU and bfloat16 on GPU/TPU; the S-Attn default is the
  explicit path (the fused one was measured no faster)."""
  assert [models.resolve_dtype("auto", b) for b in ("cpu", "gpu", "tpu")] == [
      "float32", "bfloat16", "bfloat16"]
  assert models.resolve_dtype("float32", "gpu") == "float32"
  assert default.get_config().model.dtype == "auto"
  model = models.build_model(_model_config())
  assert model.dtype == (jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
  assert model.s_attn_impl == "explicit"
  with pytest.raises(UserError, match=r"config.model.s_attn_impl='flash': use one of auto, "):
    models.build_model(_model_config(s_attn_impl="flash"))


def test_bfloat16_stays_close_to_float32():
  """bfloat16 compute with float32 parameters, logits and softmax: on a small model the logits
  differ from float32 by at most 5% of their scale plus 0.02, and one training step's loss (and
  the next step's, after a bfloat16 update) by at most 0.02; parameters and Adam's moments stay
  float32. Guards against casting the parameters or optimiser state, or a softmax in bfloat16."""
  from jattn.training import train

  config = default.get_config()
  config.model.update(width=0.125, classifier_width=32, pool_size=1, batch_norm=True)
  config.augment.update(flip="none", rotation="none")
  images = jax.random.randint(jax.random.key(0), (8, 32, 32, 3), 0, 256).astype(jnp.uint8)
  batch = {"image": images, "label": jnp.arange(8) % 2}
  out = {}
  for dtype in ("float32", "bfloat16"):
    config.model.dtype = dtype
    model = models.build_model(config.model)
    variables = models.init_variables(model, jax.random.key(1), 32)
    state = state_lib.make_state(config, model, variables, np.full(3, 120.0), np.full(3, 60.0), 10)
    logits = state_lib.eval_step(state, batch)["probs"]
    raw = model.apply(variables, state_lib.preprocess(state, images), train=False)
    losses = []
    for step in range(2):
      state, metrics = train.train_step(state, batch, jax.random.key(step),
                                        augment=config.augment.to_dict())
      losses.append(float(metrics["loss"]))
    dtypes = {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state))
              if hasattr(x, "dtype") and x.ndim > 0}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
    assert logits.dtype == raw.dtype == jnp.float32
    out[dtype] = np.asarray(raw), np.array(losses)
  (raw32, loss32), (raw16, loss16) = out["float32"], out["bfloat16"]
  assert np.abs(raw16 - raw32).max() <= 0.05 * np.abs(raw32).max() + 0.02
  np.testing.assert_allclose(loss16, loss32, atol=0.02)
  assert not np.array_equal(raw16, raw32)  # bfloat16 really computed in bfloat16



@pytest.mark.parametrize("kernel,stride,padding", [(4, 4, 0), (2, 2, 0), (7, 4, 3), (1, 1, 0)])
def test_patch_matmul_conv_equals_lax(kernel, stride, padding):
  """jattn.models.conv (C-Attn's query/key convs: kernel = stride, no padding, as one matmul on
  CPU) gives lax's outputs and gradients with the same parameters; other convs go to lax.
  Guards against a window read in the wrong order (kernel rows and columns swapped)."""
  from flax import linen as nn

  from jattn.models import conv as conv_lib

  x = jax.random.normal(jax.random.key(0), (2, 12, 8, 5))
  pad = ((padding, padding), (padding, padding))
  plain = nn.Conv(6, (kernel, kernel), strides=stride, padding=pad, use_bias=False)
  ours = nn.Conv(6, (kernel, kernel), strides=stride, padding=pad, use_bias=False,
                 conv_general_dilated=conv_lib.conv_general_dilated)
  variables = plain.init(jax.random.key(1), x)
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x), atol=1e-5)
  grad = lambda m: jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))  # noqa: E731
  for a, b in zip(jax.tree_util.tree_leaves(grad(plain)(variables, x)),
                  jax.tree_util.tree_leaves(grad(ours)(variables, x)), strict=True):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_2x2_equals_flax_max_pool_with_ties(dtype):
  """jattn.models.pooling (VGG's max-pool, with an element-wise gradient on CPU) gives
  nn.max_pool's outputs and gradients bit for bit. The input is a ReLU'd map with whole windows
  of 0 and windows with the maximum repeated, so a gradient sent to a later tied position (or
  to every tied position) fails. Guards against a wrong tie rule or a window read transposed."""
  from flax import linen as nn

  from jattn.models.pooling import max_pool_2x2

  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (3, 8, 6, 5)))
  x = jnp.round(x * 2) / 2  # few distinct values: many tied maxima besides the zeros
  x = x.astype(dtype)
  assert int(jnp.sum(jnp.max(x.reshape(3, 4, 2, 3, 2, 5), axis=(2, 4)) == 0)) > 5
  cotangent = jax.random.normal(jax.random.key(1), (3, 4, 3, 5)).astype(dtype)
  plain = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))  # noqa: E731
  for f in (plain, max_pool_2x2):
    assert f(x).dtype == dtype
  np.testing.assert_array_equal(max_pool_2x2(x), plain(x))
  grad = lambda f: jax.grad(lambda x: jnp.sum(f(x) * cotangent))(x)  # noqa: E731
  expected = grad(plain)
  assert int(jnp.sum(expected != 0)) <= x.size // 4  # one position per window, at most
  np.testing.assert_array_equal(grad(max_pool_2x2), expected)
  # Under jit and vmap (parallel folds stack states on a leading axis), and for an odd side
  # (nn.max_pool's own path).
  stacked_grad = jax.jit(jax.vmap(jax.grad(lambda x, g: jnp.sum(max_pool_2x2(x) * g))))
  np.testing.assert_array_equal(stacked_grad(x[None], cotangent[None])[0], expected)
  odd = x[:, :7, :5]
  np.testing.assert_array_equal(max_pool_2x2(odd), plain(odd))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(3, 8, 6, 5), (2, 7, 9, 4)])
def test_stem_max_pool_3x3_stride2_equals_flax_max_pool_with_ties(shape, dtype):
  """The ResNets' stem pool (3x3 windows overlapping at stride 2, padding 1), with its
  element-wise gradient on CPU, gives nn.max_pool's outputs and gradients bit for bit, in float32
  and bfloat16, for even and odd sides, under jit and vmap: each window's gradient to its first
  maximum (row-major) and the up to four windows sharing a position summed in select-and-
  scatter's order. Guards against a wrong tie rule, a misplaced tap or another summation order."""
  from flax import linen as nn

  from jattn.models.pooling import max_pool_3x3_stride2

  plain = lambda x: nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # noqa: E731
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
  x = (jnp.round(x * 2) / 2).astype(dtype)  # ReLU zeros and repeated maxima: ties everywhere
  y = plain(x)
  assert y.shape[1:3] == ((shape[1] + 1) // 2, (shape[2] + 1) // 2)
  np.testing.assert_array_equal(max_pool_3x3_stride2(x), y)
  cotangent = jax.random.normal(jax.random.key(1), y.shape).astype(dtype)
  grad = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(f(x) * cotangent)))(x)  # noqa: E731
  expected = grad(plain)
  # Overlapping windows: some positions take two or more windows' gradients, summed.
  hits = jax.grad(lambda x: jnp.sum(plain(x)))(x.astype(jnp.float32))
  assert int(jnp.sum(hits >= 2)) > 0
  np.testing.assert_array_equal(grad(max_pool_3x3_stride2), expected)
  stacked = jax.jit(jax.vmap(jax.grad(lambda x, g: jnp.sum(max_pool_3x3_stride2(x) * g))))
  np.testing.assert_array_equal(stacked(x[None], cotangent[None])[0], expected)


def test_winograd_conv_equals_lax_and_is_used_where_it_pays():
  """jattn.models.conv's Winograd F(2x2, 3x3) (VGG's 3x3 convs of blocks 3-4 on CPU, forward
  pass) gives lax's outputs to float rounding and lax's gradients, with the same parameters,
  through nn.Conv; other convs stay lax's. Guards against a wrong transform matrix, a tile read
  off by one, output pixels interleaved in the wrong order, or Winograd taking a shape it does
  not handle (odd sides, strides, other dtypes)."""
  from flax import linen as nn

  from jattn.models import conv as conv_lib

  x = jax.random.normal(jax.random.key(0), (2, 28, 30, 256))
  plain = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
  ours = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)),
                 conv_general_dilated=conv_lib.conv_general_dilated)
  variables = plain.init(jax.random.key(1), x)
  kernel = variables["params"]["kernel"]
  no_bias = {"params": {"kernel": kernel, "bias": jnp.zeros(8)}}
  np.testing.assert_allclose(conv_lib.winograd_conv3x3(x, kernel), plain.apply(no_bias, x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours.apply(variables, x), plain.apply(variables, x), rtol=1e-5,
                             atol=1e-5)
  grad = lambda m: jax.grad(lambda v, x: jnp.sum(jnp.sin(m.apply(v, x))), argnums=(0, 1))  # noqa: E731
  for a, b in zip(jax.tree_util.tree_leaves(grad(plain)(variables, x)),
                  jax.tree_util.tree_leaves(grad(ours)(variables, x)), strict=True):
    # Sums over all positions, largely cancelling: compared at the scale of the largest one.
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(jnp.abs(a).max()))
  pays = lambda shape, dtype=jnp.float32, stride=(1, 1): conv_lib._winograd_pays(  # noqa: E731
      jnp.zeros(shape, dtype), jnp.zeros((3, 3, shape[-1], 8), dtype), stride, ((1, 1), (1, 1)),
      None)
  assert pays((8, 56, 56, 256)) and pays((8, 28, 28, 512)) and pays((2, 28, 30, 256))
  assert not pays((8, 14, 14, 512))  # block 5: slower there
  assert not pays((8, 112, 112, 128)) and not pays((8, 56, 56, 128))
  assert not pays((8, 29, 28, 256)) and not pays((8, 28, 28, 256), jnp.bfloat16)
  assert not pays((8, 28, 28, 256), stride=(2, 2))


def test_initial_variables_do_not_depend_on_the_input_size():
  """Guards `init_variables`' small input: initialising at INIT_SIZE gives exactly the variables
  an initialisation at the run's image size gives, compiled the same way (batch norm and
  attention included)."""
  mc = _model_config(width=0.125, classifier_width=16, batch_norm=True)
  model = models.build_model(mc)
  size = 96
  assert size > models.INIT_SIZE
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)  # the run's size, compiled alike
  lowered = jax.jit(lambda rng, x: model.init(rng, x, train=False)).lower(jax.random.key(3), x)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  want = lowered.compile(compiler_options=options)(jax.random.key(3), jnp.zeros(x.shape))
  got = models.init_variables(model, jax.random.key(3), size)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                          jax.tree_util.tree_leaves(got), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
