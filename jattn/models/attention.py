"""The two attention modules of Wu et al. (ISBI 2019), section 2, on NHWC feature maps.

The paper writes a feature map as F in R^{C x H x W} and its reshaped forms as matrices whose
columns are positions (M in R^{C x N}, S in R^{C' x N}). Here a feature map is NHWC, so each
reshaped matrix is held transposed, positions first: `m_q` of shape [B, N', C] is M_Q^T. Every
einsum below is written against the paper's matrices, with the equation it implements.

Neither module scales the logits by 1/sqrt(d) (the paper and the authors' code do not), and both
add their output to F with weight 1 (eqs. 6 and 12). Logits and softmax are computed in float32
whatever the computation dtype. The attention weights D' and E' are recorded with `sow` in the
'intermediates' collection; they cost nothing unless that collection is made mutable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jattn.models import conv as conv_lib
from jattn.models import cpu_paths

# The authors' code initialises every conv, attention included, with He (fan-out) normal weights.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def float32_einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """`jnp.einsum` with float32 sums and result, for the attention logits.

  With jattn's CPU flags (jattn/xla_cpu.py) XLA's CPU dot has no kernel for 16-bit operands
  with a float32 result, so on CPU such operands are widened to float32 first: a product of two
  bfloat16 (or float16) numbers is exact in float32, so the sums are the same (not inside
  `cpu_paths.off()`, which lowers the program as a GPU runs it).
  """
  if cpu_paths.active() and (x.dtype, y.dtype) != (jnp.float32, jnp.float32):
    return jnp.einsum(spec, x.astype(jnp.float32), y.astype(jnp.float32))
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


class ChannelAttention(nn.Module):
  """C-Attn, eqs. (1)-(6): each output channel is a softmax-weighted sum of all input channels.

  M_Q and M_K come from bias-free convs of `kernel` x `kernel`, stride `stride` (the paper: 4, 4,
  no padding; the authors' code: 7, 4, padding 3), so channel affinities are computed on a
  downsampled map of N' positions; M_V from a bias-free 1 x 1 conv at full resolution.
  """

  kernel: int = 4
  stride: int = 4
  padding: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    b, h, w, c = f.shape
    pad = ((self.padding, self.padding), (self.padding, self.padding))
    conv = lambda k, s, p, name: nn.Conv(  # noqa: E731
        c, (k, k), strides=(s, s), padding=p, use_bias=False, kernel_init=conv_init,
        dtype=self.dtype, conv_general_dilated=conv_lib.conv_general_dilated, name=name)
    m_q = conv(self.kernel, self.stride, pad, "m_q")(f).reshape(b, -1, c)  # M_Q^T [B,N',C], eq. 1
    m_k = conv(self.kernel, self.stride, pad, "m_k")(f).reshape(b, -1, c)  # M_K^T [B,N',C], eq. 1
    m_v = conv(1, 1, "VALID", "m_v")(f).reshape(b, h * w, c)  # M_V^T [B,N,C], 1x1 conv
    # D = M_Q M_K^T: D[i, j] = sum_n M_Q[i, n] M_K[j, n], a C x C matrix.      (2)
    d = float32_einsum("bni,bnj->bij", m_q, m_k)
    # D' = softmax(D), column-wise: normalised over the row index i.          (3), (4)
    d_prime = jax.nn.softmax(d, axis=1)
    self.sow("intermediates", "d_prime", d_prime)
    # A_c = D'^T M_V: A_c[j, n] = sum_i D'[i, j] M_V[i, n].                    (5)
    a_c = jnp.einsum("bij,bni->bnj", d_prime.astype(m_v.dtype), m_v)
    self.sow("intermediates", "a_c", a_c.reshape(b, h, w, c))
    return f + a_c.reshape(b, h, w, c).astype(f.dtype)  # F_new = F + R'(A_c)      (6)


class SpatialAttention(nn.Module):
  """S-Attn, eqs. (7)-(12): each output position is a softmax-weighted sum of all positions.

  S_Q and S_K come from bias-free 1 x 1 convs to C / r channels (r = `reduction`, 8 in the
  paper), S_V from a bias-free 1 x 1 conv that keeps C channels (r = 1).
  """

  reduction: int = 8
  dtype: Any = jnp.float32
  impl: str = "explicit"  # 'fused': eqs. (8)-(11) as one jax.nn.dot_product_attention (GPU)

  @nn.compact
  def __call__(self, f: jax.Array) -> jax.Array:
    b, h, w, c = f.shape
    if c % self.reduction:
      raise ValueError(f"S-Attn: {c} channels do not divide by its reduction r={self.reduction}")
    conv = lambda out, name: nn.Conv(  # noqa: E731
        out, (1, 1), use_bias=False, kernel_init=conv_init, dtype=self.dtype, name=name)
    s_q = conv(c // self.reduction, "s_q")(f).reshape(b, h * w, -1)  # S_Q^T [B,N,C/r], eq. 7
    s_k = conv(c // self.reduction, "s_k")(f).reshape(b, h * w, -1)  # S_K^T [B,N,C/r], eq. 7
    s_v = conv(c, "s_v")(f).reshape(b, h * w, c)  # S_V^T [B,N,C], eq. 7 with r = 1
    if self.impl == "fused" and not self.is_mutable_collection("intermediates"):
      a_s = fused_spatial_attention(s_q, s_k, s_v)  # (8)-(11) without materialising E'
      return f + a_s.reshape(b, h, w, c).astype(f.dtype)  # (12)
    # E = S_Q^T S_K: E[m, n] = sum_k S_Q[k, m] S_K[k, n], an N x N matrix.       (8)
    e = float32_einsum("bmk,bnk->bmn", s_q, s_k)
    # E' = softmax(E), column-wise: normalised over the row index m.          (9), (10)
    e_prime = jax.nn.softmax(e, axis=1)
    self.sow("intermediates", "e_prime", e_prime)
    # A_s = S_V E': A_s[c, n] = sum_m S_V[c, m] E'[m, n].                        (11)
    a_s = jnp.einsum("bmc,bmn->bnc", s_v, e_prime.astype(s_v.dtype))
    return f + a_s.reshape(b, h, w, c).astype(f.dtype)  # F_new = F + R'(A_s)      (12)


def fused_spatial_attention(s_q: jax.Array, s_k: jax.Array, s_v: jax.Array) -> jax.Array:
  """A_s^T = (S_V E')^T of eqs. (8)-(11) through `jax.nn.dot_product_attention`, E' never stored.

  Output position n attends over positions m with logits E[m, n] = S_Q[:, m] . S_K[:, n] and
  weights softmax over m, which is E'[:, n] (column-wise, eq. 10): attention with query = S_K,
  key = S_Q, value = S_V and scale 1. That API wants one head dim for all three, while S_V has C
  channels and S_Q, S_K have C / r: S_V's channels are split into r heads of C / r that all share
  S_Q and S_K. s_q, s_k: [B, N, C/r]; s_v: [B, N, C]; returns A_s^T [B, N, C].
  """
  b, n, d = s_q.shape
  heads = s_v.shape[-1] // d
  shared = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, n, heads, d))  # noqa: E731
  # cuDNN's kernel takes 16-bit inputs and head dims that are multiples of 8; otherwise XLA's.
  cudnn = (jax.default_backend() == "gpu" and s_v.dtype in (jnp.bfloat16, jnp.float16)
           and d % 8 == 0 and d <= 128)
  a_s = jax.nn.dot_product_attention(shared(s_k), shared(s_q), s_v.reshape(b, n, heads, d),
                                     scale=1.0, implementation="cudnn" if cudnn else "xla")
  return a_s.reshape(b, n, heads * d)
