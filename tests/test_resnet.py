"""ResNet-18/50 against PyTorch: torchvision's layout and parameter counts, converted weights give
torch's logits, attention placement, one training step, batch norm as PyTorch trains it."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn
from flax import traverse_util

from configs import default
from jattn import models
from jattn.cli import convert as convert_cli
from jattn.cli import inspect as inspect_cli
from jattn.cli import models as models_cli
from jattn.cli import sweep as sweep_cli
from jattn.core.errors import UserError
from jattn.evaluation import report
from jattn.models import norm, resnet
from jattn.models import weights as convert
from jattn.training import compat, train
from jattn.training import state as state_lib
from tests.test_download import server  # noqa: F401 -- the local HTTP server fixture
from tests.torch_models import (
  RefCAttn,
  RefSAttn,
  TorchResNet,
  TorchVGG,
  randomize_,
  resnet_from_config,
)

# torchvision's published parameter counts (1000 classes), ResNet18/50_Weights meta "num_params".
PUBLISHED = {"resnet18": 11_689_512, "resnet50": 25_557_032}
NARROW = 0.125  # width of the narrow models: planes 8-16-32-64
NO_AUGMENT = dict(flip="none", rotation="none")


def _mc(arch, num_classes=1000, width=1.0, c=(), s=(), **kw):
  mc = convert.torchvision_model_config(arch, num_classes)
  mc.update(width=width, c_attn_stages=c, s_attn_stages=s, **kw)
  return mc


def _torch(mc, seed=0):
  return randomize_(resnet_from_config(mc, resnet.stage_planes(mc.width)), seed)


def _soften_attention_(model, x, train=False, target=2.0):
  """Scales each attention module's query and key weights so that its logits have standard
  deviation `target` on `x`. In a randomised network the activations grow with depth, so one
  fixed scale leaves the softmax of deep sites saturated (where float rounding alone moves the
  output) and of shallow ones uniform (where a softmax over the wrong axis goes unseen)."""
  def calibrate(module, args):
    f = args[0]
    q, k = module.conv1(f).flatten(2), module.conv2(f).flatten(2)
    logits = q @ k.transpose(1, 2) if isinstance(module, RefCAttn) else q.transpose(1, 2) @ k
    a = (target / logits.std()) ** 0.5
    module.conv1.weight.mul_(a)
    module.conv2.weight.mul_(a)

  kept = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
  hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
           if isinstance(m, (RefCAttn, RefSAttn))]
  with torch.no_grad():
    model.train(train)(x)
  for hook in hooks:
    hook.remove()
  model.load_state_dict({**model.state_dict(), **kept})  # the forward pass changed nothing else
  return model.eval()


def _assert_soft(intermediates, sites):
  """Each attention's weights are far from uniform and from one-hot (mean largest weight of a
  column between 1.5 / N and 0.9)."""
  for site, kind, _ in sites:
    node = intermediates
    for part in site if isinstance(site, tuple) else (site,):  # a module path
      node = node[part]
    w = np.asarray(node["d_prime" if kind == "c_attn" else "e_prime"][0])
    top = w.max(axis=1).mean()
    assert 1.5 / w.shape[1] < top < 0.9, (site, top, w.shape)


def _max_pool_margin(model, x):
  """The smallest gap, over every max-pool window of `model` (in training mode, on `x`) whose
  maximum is positive, between its largest and second-largest input, relative to the largest
  input of that pool. Where two inputs tie to float rounding, which one receives the gradient
  is decided by rounding alone, in either framework, and the weight gradients then differ by a
  whole position's contribution; a training-step comparison needs a batch without such ties."""
  gaps = []

  def hook(pool, args, _):
    f = args[0].detach().double()
    k, stride, pad = (v if isinstance(v, int) else v[0] for v in (pool.kernel_size, pool.stride,
                                                                  pool.padding))
    f = F.pad(f, (pad,) * 4, value=-np.inf)
    windows = F.unfold(f.flatten(0, 1)[:, None], k, stride=stride)  # [B*C, k*k, L]
    top2 = windows.topk(2, dim=1).values
    live = top2[:, 0] > 0  # not an all-zero window after a ReLU (its gradient is 0 anyway)
    gaps.append(float((top2[:, 0] - top2[:, 1])[live].min() / f[f.isfinite()].abs().max()))

  model = copy.deepcopy(model).train()
  hooks = [m.register_forward_hook(hook) for m in model.modules()
           if isinstance(m, torch.nn.MaxPool2d)]
  with torch.no_grad():
    model(x)
  for h in hooks:
    h.remove()
  return min(gaps)


def _close(got, want, rel=1e-5, what=""):
  """|got - want| <= rel * max|want| everywhere: equal to `rel` relative to the array's scale."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, what
  err, scale = np.abs(got - want).max(), np.abs(want).max()
  assert err <= rel * scale, f"{what}: max error {err:.3g} is {err / scale:.3g} of the scale"


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _shapes(model, size=224):
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def _torchvision_keys(arch):
  """torchvision's state-dict keys, written from its documented layout: conv1, bn1, layer1-4 of
  BasicBlock (conv1-2, bn1-2) or Bottleneck (conv1-3, bn1-3) blocks, the first block of a stage
  with `downsample` (0: 1x1 conv, 1: batch norm) where the stride or width changes (stages 2-4;
  ResNet-50's stage 1 too, 64 -> 256 channels), fc."""
  convs, sizes = {"resnet18": (2, (2, 2, 2, 2)), "resnet50": (3, (3, 4, 6, 3))}[arch]
  bn = lambda p: [f"{p}.{k}" for k in ("weight", "bias", "running_mean", "running_var",  # noqa: E731
                                       "num_batches_tracked")]
  keys = ["conv1.weight", *bn("bn1")]
  for stage, n in enumerate(sizes, start=1):
    for i in range(n):
      for c in range(1, convs + 1):
        keys += [f"layer{stage}.{i}.conv{c}.weight", *bn(f"layer{stage}.{i}.bn{c}")]
      if i == 0 and (stage > 1 or arch == "resnet50"):
        keys += [f"layer{stage}.{i}.downsample.0.weight", *bn(f"layer{stage}.{i}.downsample.1")]
  return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("arch,num_keys", [("resnet18", 122), ("resnet50", 320)])
def test_torch_transcription_has_torchvision_layout(arch, num_keys):
  """The PyTorch transcription the other tests compare against is torchvision's model: its
  published parameter count, its key list (in order), the v1.5 stride on the 3x3 conv."""
  tm = TorchResNet(arch)
  sd = tm.state_dict()
  assert list(sd) == _torchvision_keys(arch) and len(sd) == num_keys
  assert sum(p.numel() for p in tm.parameters()) == PUBLISHED[arch]
  assert tuple(sd["fc.weight"].shape) == ((1000, 512) if arch == "resnet18" else (1000, 2048))
  if arch == "resnet50":
    assert tuple(sd["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(sd["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert (tm.layer2[0].conv1.stride, tm.layer2[0].conv2.stride) == ((1, 1), (2, 2))
  else:
    assert tuple(sd["layer2.0.conv1.weight"].shape) == (128, 64, 3, 3)
    assert tm.layer2[0].conv1.stride == tm.layer2[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_flax_model_has_torchvision_parameters_and_the_key_map_covers_them(arch):
  mc = _mc(arch)
  variables = traverse_util.flatten_dict(_shapes(models.build_model(mc)))
  assert _count([variables[k] for k in variables if k[0] == "params"]) == PUBLISHED[arch]
  key_map = resnet.torch_key_map(mc, "torchvision")
  assert [k for k, _, _ in key_map] == [k for k in _torchvision_keys(arch)
                                        if not k.endswith("num_batches_tracked")]
  assert sorted(path for _, path, _ in key_map) == sorted(variables)  # each variable once
  # ImageNet provides everything but the head.
  pretrained = [k for k in variables if k[0] == "params" and resnet.is_pretrained(k[1:])]
  fc = 512 * 1000 + 1000 if arch == "resnet18" else 2048 * 1000 + 1000
  assert _count([variables[k] for k in pretrained]) == PUBLISHED[arch] - fc


# Attention parameters, from jattn/models/attention.py (bias-free convs, C channels in and out):
#   C-Attn, kernel k: M_Q, M_K k x k C -> C; M_V 1 x 1 C -> C:        2 k^2 C^2 + C^2 (33 C^2, k=4)
#   S-Attn, reduction r: S_Q, S_K 1 x 1 C -> C/r; S_V 1 x 1 C -> C:   2 C^2 / r + C^2 (5/4 C^2, r=8)
# Channels at the sites (stem, stages 1-4): ResNet-18 64, 64, 128, 256, 512;
#                                            ResNet-50 64, 256, 512, 1024, 2048.
#   ResNet-18: stem C 33*64^2 = 135,168; stage 1 C 135,168; stage 2 S 5/4*128^2 = 20,480;
#              stage 3 S 81,920; stage 4 S 327,680                          -> 700,416
#   ResNet-50: stem C 135,168; stage 1 C 33*256^2 = 2,162,688; stage 2 S 5/4*512^2 = 327,680;
#              stage 3 S 1,310,720; stage 4 S 5/4*2048^2 = 5,242,880           -> 9,179,136
#   C-Attn of the authors' code (kernel 7) after stage 4 of ResNet-18: 99*512^2 = 25,952,256
# With 2 classes the head is 512*2+2 = 1,026 (ResNet-18) or 2048*2+2 = 4,098 (ResNet-50).
@pytest.mark.parametrize("arch,c,s,kernel,sites,total", [
    ("resnet18", (), (), 4, {}, 11_689_512 - 513_000 + 1_026),
    ("resnet18", (0, 1), (2, 3, 4), 4,
     {"stem_c_attn": 135_168, "layer1_c_attn": 135_168, "layer2_s_attn": 20_480,
      "layer3_s_attn": 81_920, "layer4_s_attn": 327_680}, 11_177_538 + 700_416),
    ("resnet18", (4,), (), 7, {"layer4_c_attn": 25_952_256}, 11_177_538 + 25_952_256),
    ("resnet50", (0, 1), (2, 3, 4), 4,
     {"stem_c_attn": 135_168, "layer1_c_attn": 2_162_688, "layer2_s_attn": 327_680,
      "layer3_s_attn": 1_310_720, "layer4_s_attn": 5_242_880},
     25_557_032 - 2_049_000 + 4_098 + 9_179_136),
])
def test_attention_parameter_counts(arch, c, s, kernel, sites, total):
  mc = _mc(arch, 2, c=c, s=s, c_attn_kernel=kernel)
  params = _shapes(models.build_model(mc))["params"]
  assert {k: _count(v) for k, v in params.items() if k.endswith("_attn")} == sites
  assert _count(params) == total


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_full_size_converted_state_dict_gives_torch_logits(arch):
  """The suite's one full-size forward pass of each: torchvision's layout with random weights and
  batch-norm statistics, 1000 classes, 224x224, eval mode; logits equal to 1e-5 of their scale."""
  mc = _mc(arch)
  tm = _torch(mc)
  x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    want = tm(x).numpy()
  variables = convert.torch_to_flax(tm.state_dict(), mc, "torchvision")
  got = jax.jit(models.build_model(mc).apply)(variables, x.numpy().transpose(0, 2, 3, 1))
  _close(got, want)
  assert np.abs(want[0] - want[1]).max() > 1e-3 * np.abs(want).max()  # inputs are told apart


@pytest.mark.parametrize("arch,c,s,c_attn", [
    ("resnet50", (0, 1), (2, 3, 4), (4, 4, 0)),  # the default placement (ResNet-18's: below)
    ("resnet50", (2,), (0, 2), (7, 4, 3)),  # both on one stage, S-Attn on the stem; the code's
    ("resnet18", (), (), (4, 4, 0)),
])
def test_narrow_models_with_attention_give_torch_logits_where_pooling_is_not_exact(arch, c, s,
                                                                                     c_attn):
  """At 200x176 the strided convs and the stem's max-pool meet odd sides (stage 2 is 25x22,
  stage 3 13x11) and the pool pads; the TorchResNet with RefCAttn/RefSAttn, converted with its
  attention weights, gives jattn's logits to 1e-5 of their scale."""
  k, stride, pad = c_attn
  mc = _mc(arch, 5, NARROW, c, s, c_attn_kernel=k, c_attn_stride=stride, c_attn_padding=pad)
  x = torch.randn(2, 3, 200, 176, generator=torch.Generator().manual_seed(3))
  tm = _soften_attention_(_torch(mc, seed=2), x)
  with torch.no_grad():
    want = tm(x).numpy()
  variables = convert.torch_to_flax(tm.state_dict(), mc, "reference")
  sites = resnet.attention_sites(mc)
  assert {k for k in variables["params"] if k.endswith("_attn")} == {site for site, _, _ in sites}
  got, state = jax.jit(lambda v, x: models.build_model(mc).apply(v, x, mutable=["intermediates"]))(
      variables, x.numpy().transpose(0, 2, 3, 1))
  _close(got, want)
  _assert_soft(state.get("intermediates", {}), sites)


def _attention_inputs(model, size):
  """(attention modules in the order they run, the input each receives, the 'intermediates'
  they sow) for one random image through `model`'s initialisation (one forward pass), compiled
  without backend optimisation as models.init_variables."""
  order = []

  def run(key, x):
    seen = {}

    def record(next_fun, args, kwargs, context):
      name = context.module.name or ""
      if context.method_name == "__call__" and name.endswith("_attn"):
        order.append(name)
        seen[name] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      variables = model.init(key, x, mutable=True)
    return seen, variables["intermediates"]

  x = jax.random.normal(jax.random.key(1), (1, size, size, 3))
  options = {"xla_backend_optimization_level": 0}
  seen, state = jax.jit(run).lower(jax.random.key(0), x).compile(compiler_options=options)(
      jax.random.key(0), x)
  return order, seen, state


def test_attention_sits_by_resolution_after_the_last_residual_addition():
  """Default placement at 224x224: C-Attn after the stem (56x56) and stage 1 (56x56), S-Attn
  after stages 2-4 (28, 14, 7), in that order; each module sees its stage's output, the ReLU'd
  sum of the last block (non-negative), with the stage's channels."""
  mc = _mc("resnet50", 2, NARROW, (0, 1), (2, 3, 4))
  assert resnet.attention_sites(mc) == [
      ("stem_c_attn", "c_attn", "after the stem"), ("layer1_c_attn", "c_attn", "after stage 1"),
      ("layer2_s_attn", "s_attn", "after stage 2"), ("layer3_s_attn", "s_attn", "after stage 3"),
      ("layer4_s_attn", "s_attn", "after stage 4")]
  order, seen, state = _attention_inputs(models.build_model(mc), 224)
  assert order == [site for site, _, _ in resnet.attention_sites(mc)]  # the order they run
  assert {k: v.shape for k, v in seen.items()} == {
      "stem_c_attn": (1, 56, 56, 8), "layer1_c_attn": (1, 56, 56, 32),
      "layer2_s_attn": (1, 28, 28, 64), "layer3_s_attn": (1, 14, 14, 128),
      "layer4_s_attn": (1, 7, 7, 256)}
  assert all(float(v.min()) >= 0 for v in seen.values())  # after the ReLU
  assert state["stem_c_attn"]["d_prime"][0].shape == (1, 8, 8)  # C x C
  assert state["layer2_s_attn"]["e_prime"][0].shape == (1, 784, 784)  # N x N
  # Both on one stage: S-Attn first, as on VGG (and as TorchResNet runs them: the logits test
  # with this placement checks the order).
  both = _mc("resnet50", 2, NARROW, (2,), (0, 2))
  assert resnet.attention_sites(both) == [
      ("stem_s_attn", "s_attn", "after the stem"), ("layer2_s_attn", "s_attn", "after stage 2"),
      ("layer2_c_attn", "c_attn", "after stage 2")]
  assert resnet.stage_sizes_at(224) == (56, 56, 28, 14, 7)
  assert resnet.stage_sizes_at(200) == (50, 50, 25, 13, 7)


def _torch_step(tm, x, labels, make_optimizer):
  """One PyTorch training step: (loss, state dict after it, gradients)."""
  tm = copy.deepcopy(tm).train()
  optimizer = make_optimizer(tm.parameters())
  loss = F.cross_entropy(tm(x), torch.as_tensor(labels, dtype=torch.long))
  optimizer.zero_grad()
  loss.backward()
  grads = {name: p.grad.clone() for name, p in tm.named_parameters()}
  optimizer.step()
  return loss.item(), {k: v.clone() for k, v in tm.state_dict().items()}, grads


def _compare_train_steps(tm, mc, model, to_flax, sites, size, seed, lr_sgd=1e-3, lr_adam=1e-3,
                         weight_decay=0.1):
  """jattn's train step (train.train_step, uint8 images normalised on device) with SGD and with
  the run's Adam (optim.make_optimizer: L2 added to the gradient, as torch.optim.Adam's
  weight_decay), against PyTorch's from the same weights on the same batch."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, mc.num_classes, 8).astype(np.int32)
  mean, std = np.array([120.0, 110.0, 100.0]), np.array([50.0, 60.0, 55.0])
  x = torch.tensor(((images - mean) / std).astype(np.float32)).permute(0, 3, 1, 2).contiguous()
  tm = _soften_attention_(tm, x, train=True)
  assert _max_pool_margin(tm, x) > 1e-5  # a batch (seed) without near-ties in the max-pools
  torch_sgd = _torch_step(tm, x, labels, lambda p: torch.optim.SGD(p, lr=lr_sgd))
  torch_adam = _torch_step(tm, x, labels, lambda p: torch.optim.Adam(
      p, lr=lr_adam, weight_decay=weight_decay))

  config = default.get_config()
  config.update(learning_rate=lr_adam, weight_decay=weight_decay)
  start = jax.tree_util.tree_map(np.array, to_flax(tm.state_dict()))
  adam = state_lib.make_state(config, model, start, mean, std, steps_per_epoch=10)
  sgd = adam.replace(tx=optax.with_extra_args_support(optax.sgd(lr_sgd)),
                     opt_state=optax.sgd(lr_sgd).init(adam.params))
  step = jax.jit(lambda a, b, batch: tuple(
      train.train_step(s, batch, jax.random.key(0), augment=NO_AUGMENT) for s in (a, b)))
  (sgd, sgd_metrics), (adam, adam_metrics) = step(sgd, adam, {"image": images, "label": labels})
  _, state = model.apply(start, jnp.asarray((images - mean) / std, jnp.float32), train=True,
                         mutable=["intermediates", "batch_stats"])
  _assert_soft(state["intermediates"], sites)

  initial = traverse_util.flatten_dict(start)
  # The gradient Adam sees, torch's loss gradient plus the L2 term, in jattn's layout.
  grads = torch_adam[2]
  total_grad = traverse_util.flatten_dict(to_flax({
      k: grads[k] + weight_decay * v if k in grads else v for k, v in tm.state_dict().items()}))
  for name, (loss, want_sd, _), state, metrics in (("sgd", torch_sgd, sgd, sgd_metrics),
                                                  ("adam", torch_adam, adam, adam_metrics)):
    assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-5), name
    want = traverse_util.flatten_dict(to_flax(want_sd))
    got = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats})
    assert set(got) == set(want)
    resolved_count = []
    for path in want:
      what = f"{name} {'/'.join(path)}"
      g, w, w0 = (np.asarray(d[path], np.float64) for d in (got, want, initial))
      if path[0] == "params" and not (name == "sgd" and path[-2].startswith("conv")
                                      and path[-1] == "bias"):  # before a batch norm: grad 0
        # The step moved every tensor by several times the tolerance.
        assert np.abs(w - w0).max() > 5 * 1e-5 * np.abs(w).max(), what
      if name == "adam" and path[0] == "params":
        # Adam's first step moves each weight by lr * g / (|g| + eps), about lr * sign(g): a
        # weight whose gradient is within float32's accuracy of 0 (both frameworks compute
        # gradients to some 5e-5 of a tensor's largest) moves by +-lr at random in either. Those
        # (below 1e-4 of the largest) are left out: under 1% of all.
        grad = np.abs(np.asarray(total_grad[path]))
        resolved = grad > 1e-4 * grad.max()
        resolved_count.append((resolved.sum(), resolved.size))
        g, w, w0 = g[resolved], w[resolved], w0[resolved]
      if path[0] == "params":
        # Weights to 1e-5 of their scale, plus the update to 1e-3 of its own: both frameworks'
        # float32 gradients are some 1e-4 of a tensor's largest from float64's (measured), and
        # a step of SGD carries that error into the weights.
        err, allowed = np.abs(g - w).max(), 1e-5 * np.abs(w).max() + 1e-3 * np.abs(w - w0).max()
        assert err <= allowed, f"{what}: max error {err:.3g}, allowed {allowed:.3g}"
      else:
        _close(g, w, what=what)  # batch stats: mean and PyTorch's unbiased running variance
    if name == "adam":
      kept, total = np.sum(resolved_count, axis=0)
      assert kept > 0.99 * total, (kept, total)


def test_resnet18_train_step_equals_torch():
  """Narrow ResNet-18 with the default attention, 48x48 (stage 4 is 2x2: n = 8 x 2 x 2 = 32
  values per channel, so the unbiased variance is 32/31 of the biased one there)."""
  mc = _mc("resnet18", 3, 0.25, (0, 1), (2, 3, 4))
  _compare_train_steps(_torch(mc, seed=4), mc, models.build_model(mc),
                       lambda sd: convert.torch_to_flax(sd, mc, "reference"),
                       resnet.attention_sites(mc), 48, seed=17)


def test_vgg19_bn_train_step_equals_torch():
  """Narrow VGG19-BN with C-Attn on blocks 1-2 and S-Attn on 3-5 (the authors' layout, whose
  head ends in log_softmax: the same cross-entropy), batch norm keeping PyTorch's statistics;
  32x32 (block 5 is 2x2: n = 32 values per channel)."""
  mc = default.get_config().model
  mc.update(width=0.125, classifier_width=32, pool_size=1, batch_norm=True, dropout_rate=0.0,
            dtype="float32")
  mc.bn_unbiased_running_var = True
  narrow = ((8, 8), (16, 16), (32,) * 4, (64,) * 4, (64,) * 4)
  tm = randomize_(TorchVGG(narrow, batch_norm=True, num_classes=2, hidden=32, layout="reference",
                           c_attn_blocks=(1, 2), s_attn_blocks=(3, 4, 5), c_attn_kernel=4,
                           c_attn_stride=4, c_attn_padding=0, pool_size=1, dropout_rate=0.0),
                  seed=5)
  model = models.build_model(mc)
  assert model.bn_torch_running_var
  sites = [(f"block{b}", kind) for b in range(1, 6)
           for kind, blocks in (("s_attn", (3, 4, 5)), ("c_attn", (1, 2))) if b in blocks]
  _compare_train_steps(tm, mc, model, lambda sd: convert.torch_to_flax(sd, mc, "reference"),
                       [((block, kind), kind, "") for block, kind in sites], 32, seed=9)


def test_batch_norm_keeps_torchs_statistics_by_default_and_old_runs_flaxs():
  """The default config keeps PyTorch's running variance (VGG and ResNet); a config written
  before the field (an old run's config.json) builds Flax's, compares equal to the default config
  with the field False, and, for a VGG without batch norm (where the field computes nothing), to
  the default config as it is: such an old run resumes under the new default."""
  config = default.get_config()
  config.model.batch_norm = True
  assert models.build_model(config.model).bn_torch_running_var
  old = json.loads(config.to_json())
  del old["model"]["bn_unbiased_running_var"], old["model"]["c_attn_stages"]
  del old["model"]["s_attn_stages"]
  assert not models.build_model(ml_collections.ConfigDict(old["model"])).bn_torch_running_var
  now = json.loads(config.to_json())
  # A batch-norm VGG computes otherwise: its old run is refused under the new default, by name.
  assert compat.differing_fields(old, now) == ["model.bn_unbiased_running_var"]
  config.model.bn_unbiased_running_var = False
  assert compat.comparable(old) == compat.comparable(json.loads(config.to_json()))
  config.model.update(batch_norm=False, bn_unbiased_running_var=True)
  old["model"]["batch_norm"] = False
  assert compat.comparable(old) == compat.comparable(json.loads(config.to_json()))
  resnet_config = _mc("resnet18")
  assert models.build_model(resnet_config).bn_torch_running_var


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_batch_norm_keeps_torch_statistics_or_exactly_flaxs(dtype):
  """norm.BatchNorm(torch_running_var=True) normalises and updates its statistics as
  torch.nn.BatchNorm2d (momentum 0.1, unbiased running variance); with False it is
  flax.linen.BatchNorm(momentum=0.9) bit for bit (old runs compute what they computed)."""
  rng = np.random.default_rng(0)
  x = (rng.normal(size=(4, 5, 3, 6)) * 3 + rng.normal(size=6) * 5).astype(np.float32)
  mean0, var0 = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, 6).astype(np.float32)
  scale, bias = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": mean0, "var": var0}}
  xj = jnp.asarray(x, dtype)
  bn = torch.nn.BatchNorm2d(6)
  with torch.no_grad():
    bn.weight.copy_(torch.tensor(scale))
    bn.bias.copy_(torch.tensor(bias))
    bn.running_mean.copy_(torch.tensor(mean0))
    bn.running_var.copy_(torch.tensor(var0))
    want = bn.train()(torch.tensor(np.asarray(xj, np.float32)).permute(0, 3, 1, 2))
  ours = norm.BatchNorm(torch_running_var=True, dtype=dtype)
  y, stats = jax.jit(lambda v, x: ours.apply(v, x, use_running_average=False,
                                             mutable=["batch_stats"]))(variables, xj)
  assert y.dtype == dtype and stats["batch_stats"]["var"].dtype == jnp.float32
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  _close(y, want.permute(0, 2, 3, 1).numpy(), tol)
  _close(stats["batch_stats"]["mean"], bn.running_mean.numpy(), 1e-6)
  _close(stats["batch_stats"]["var"], bn.running_var.numpy(), 1e-6)
  n = 4 * 5 * 3
  biased = np.asarray(xj, np.float64).var(axis=(0, 1, 2))
  np.testing.assert_allclose(stats["batch_stats"]["var"], 0.9 * var0 + 0.1 * biased * n / (n - 1),
                             rtol=1e-5)

  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=dtype)
  old = norm.BatchNorm(torch_running_var=False, dtype=dtype)

  def run(m, train_mode):
    return jax.jit(lambda v, x: m.apply(v, x, use_running_average=not train_mode,
                                        mutable=["batch_stats"]))(variables, xj)

  def grads(m):  # the order of the operations decides the gradient's bits
    cotangent = jnp.asarray(rng.normal(size=x.shape), dtype)
    loss = lambda p, x: jnp.sum(m.apply(  # noqa: E731
        {"params": p, "batch_stats": variables["batch_stats"]}, x, use_running_average=False,
        mutable=["batch_stats"])[0] * cotangent)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], xj)

  for train_mode in (True, False):
    (a, sa), (b, sb) = run(old, train_mode), run(flax_bn, train_mode)
    np.testing.assert_array_equal(a, b)
    for key in ("mean", "var"):
      np.testing.assert_array_equal(sa["batch_stats"][key], sb["batch_stats"][key])
  rng = np.random.default_rng(1)
  ours_grads = grads(old)
  rng = np.random.default_rng(1)
  for a, b in zip(jax.tree_util.tree_leaves(ours_grads), jax.tree_util.tree_leaves(grads(flax_bn)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  # Flax's running variance (biased) is not PyTorch's.
  assert not np.allclose(run(old, True)[1]["batch_stats"]["var"], stats["batch_stats"]["var"])
  init = lambda m: m.init(jax.random.key(0), xj, use_running_average=False)  # noqa: E731
  assert jax.tree_util.tree_structure(init(old)) == jax.tree_util.tree_structure(
      init(flax_bn))  # the same names: checkpoints restore either way


def test_initialisation_is_torchvisions():
  """Guards against a wrong initialisation of what ImageNet weights do not provide: convs
  N(0, 2 / (k^2 C_out)) (He, fan-out, untruncated), batch norm scale 1 and bias 0, fc weights and
  bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as torch.nn.Linear. Moments within ~10 standard errors;
  kurtosis 3 for a normal draw (2.4 truncated at 2 std), 1.8 for a uniform one."""
  mc = _mc("resnet18", 1000)
  variables = models.init_variables(models.build_model(mc), jax.random.key(0), 64)
  p = traverse_util.flatten_dict(variables["params"])
  kernels = [v for k, v in p.items() if k[-1] == "kernel" and k[0] != "fc"]
  z = np.concatenate([np.ravel(v) / np.sqrt(2 / (v.shape[0] * v.shape[1] * v.shape[3]))
                      for v in kernels])
  assert len(kernels) == 20 and z.size == 11_176_512 - 2 * 4_800  # 20 convs; bn: 4,800 channels
  assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1, rel=0.01)
  assert np.mean(z ** 4) / z.var() ** 2 == pytest.approx(3.0, abs=0.05)
  bn = [k for k in p if k[-1] in ("scale", "bias") and k[0] != "fc"]
  assert all(np.all(p[k] == (1.0 if k[-1] == "scale" else 0.0)) for k in bn)
  assert _count([p[k] for k in bn]) == 2 * 4_800
  bound = 1 / np.sqrt(512)
  for w, size in ((p["fc", "kernel"], 512_000), (p["fc", "bias"], 1000)):
    w = np.asarray(w, np.float64).ravel()
    assert w.size == size and np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert w.std() == pytest.approx(bound / np.sqrt(3), rel=0.1 if size == 1000 else 0.01)
  fc = np.asarray(p["fc", "kernel"], np.float64).ravel()
  assert np.mean((fc / fc.std()) ** 4) == pytest.approx(1.8, abs=0.02)
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert all(np.all(v == (0.0 if k[-1] == "mean" else 1.0)) for k, v in stats.items())


def test_bfloat16_computes_in_bfloat16_with_float32_logits_and_statistics():
  """With model.dtype bfloat16 the convs, batch norms and residual sums run in bfloat16, the
  attention softmax and the logits in float32; parameters and running statistics stay float32
  (as VGG). Guards against a module left in float32 or parameters cast."""
  mc = _mc("resnet18", 2, NARROW, (0, 1), (2, 3, 4), dtype="bfloat16")
  model = models.build_model(mc)
  variables = models.init_variables(model, jax.random.key(0), 32)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  logits, state = jax.jit(lambda v, x: model.apply(
      v, x, train=True, capture_intermediates=True, mutable=["intermediates", "batch_stats"]))(
          variables, x)
  outputs = traverse_util.flatten_dict(state["intermediates"])
  by_kind = {}
  for path, value in outputs.items():
    kind = ("softmax" if path[-1] in ("d_prime", "e_prime") else
            "logits" if path == ("__call__",) else
            "fc" if path[0] == "fc" else "attention" if path[0].endswith("_attn") else "backbone")
    by_kind.setdefault(kind, set()).add(jnp.dtype(value[0].dtype))
  assert by_kind == {"backbone": {jnp.dtype(jnp.bfloat16)}, "attention": {jnp.dtype(jnp.bfloat16)},
                     "softmax": {jnp.dtype(jnp.float32)}, "fc": {jnp.dtype(jnp.bfloat16)},
                     "logits": {jnp.dtype(jnp.float32)}}
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  dtypes = {v.dtype for v in jax.tree_util.tree_leaves((variables, state["batch_stats"]))}
  assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("overrides,match", [
    (["--config.model.s_attn_stages=(2, 5)"],
     r"config\.model\.s_attn_stages=\(2, 5\): resnet50 has no stage 5; stages are numbered 0 "
     r"\(the stem\) to 4$"),
    (["--config.model.name=resnet-18"],
     r"--config\.model\.name='resnet-18' is not a model: use one of vgg19, resnet18, resnet50, "
     r"dinov2_vits14_reg4, .*, phikon_v2, abmil, clam_sb, transmil; did you mean 'resnet18'\?$"),
    (["--config.model.c_attn_blocks=(3,)"],  # VGG's placement would do nothing on a ResNet
     r"config\.model\.c_attn_blocks=\(3,\) places attention in a vgg19, but "
     r"config\.model\.name='resnet50' does not read it; place its attention with "
     r"config\.model\.c_attn_stages and config\.model\.s_attn_stages$"),
    (["--config.model.name=vgg19", "--config.model.s_attn_stages=(1,)"],  # and the other way
     r"s_attn_stages=\(1,\) places attention in a resnet18 or resnet50, but "
     r"config\.model\.name='vgg19' does not read it; place its attention with "
     r"config\.model\.c_attn_blocks and config\.model\.s_attn_blocks$"),
    (["--config.model.s_attn_reduction=3"],
     r"s_attn_reduction=3 does not divide the 512 channels after stage 2 of resnet50"),
])
def test_bad_model_config_is_one_line_exit_2(overrides, match, capsys):
  with pytest.raises(SystemExit) as e:
    models_cli.main(["--config", "configs/resnet50_ours.py", *overrides])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
  assert err.startswith("jattn models: error: ") and re.search(match, err.rstrip()), err


def test_c_attn_kernel_larger_than_the_map_is_refused():
  mc = _mc("resnet18", 2, NARROW, c=(0, 1), s=(), c_attn_kernel=7)
  resnet.check(mc, 64)  # 16x16 maps after the stem and stage 1
  with pytest.raises(UserError, match=r"config\.image_size=16: the 4x4 map after the stem is "
                                      r"smaller than C-Attn's 7x7 kernel"):
    resnet.check(mc, 16)


def test_conversion_errors_name_the_key_or_the_architecture():
  mc18 = _mc("resnet18", 10, NARROW)
  sd = _torch(mc18).state_dict()

  def convert_(state_dict, mc=mc18):
    return convert.torch_to_flax(state_dict, mc, "torchvision")

  with pytest.raises(UserError, match=r"no key 'layer3\.1\.bn2\.running_var'"):
    convert_({k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"})
  with pytest.raises(UserError, match=r"'fc\.weight' has shape \(10, 64\), which gives \(64, 10\) "
                                      r"for params/fc/kernel, but the config expects \(64, 2\)"):
    convert_(sd, _mc("resnet18", 2, NARROW))
  with pytest.raises(UserError, match=r"keys this config does not use: layer2_s_attn\.conv1\."):
    convert_(_torch(_mc("resnet18", 10, NARROW, s=(2,))).state_dict())
  # A checkpoint of another architecture, either way round.
  with pytest.raises(UserError, match=r"the state dict is a resnet50 but "
                                      r"config\.model\.name='resnet18'; convert it with --arch"):
    convert_(_torch(_mc("resnet50", 10, NARROW)).state_dict())
  vgg = TorchVGG(((8,),) * 5, num_classes=10, hidden=8).state_dict()
  with pytest.raises(UserError, match=r"the state dict is a VGG \(features\.\*\), not a ResNet"):
    convert_(vgg)
  with pytest.raises(UserError, match=r"the state dict is not a VGG's \(no features\.\* keys\)"):
    convert_(sd, convert.torchvision_model_config("vgg19", 10))
  bad = dict(sd, **{"layer1.0.conv1.weight": torch.full_like(sd["layer1.0.conv1.weight"], np.inf)})
  with pytest.raises(UserError, match=r"'layer1\.0\.conv1\.weight' holds NaN or infinite values"):
    convert_(bad)
  prefixed = {f"module.{k}": v for k, v in sd.items()}  # DataParallel's prefix is accepted
  np.testing.assert_array_equal(convert_(prefixed)["params"]["fc"]["bias"], sd["fc.bias"].numpy())


# --- Weights: --download, --pth, the pretrained folder ---

def test_download_and_pth_commands_convert_a_resnet(server, tmp_path, monkeypatch):  # noqa: F811
  """`convert --download resnet50` fetches the file named with its SHA-256 prefix and converts it
  (a narrow torchvision-layout ResNet-50 stands in for the 98 MB file: its width and classes are
  read from it), `--source torchvision --arch resnet50 --pth` gives the same weights, these give
  torch's logits, and a ResNet run takes its backbone from them."""
  mc = _mc("resnet50", 10, NARROW)
  tm = _torch(mc, seed=6)
  pth = tmp_path / "resnet50.pth"
  torch.save(tm.state_dict(), pth)
  data = pth.read_bytes()
  name = f"resnet50-{hashlib.sha256(data).hexdigest()[:8]}.pth"
  server.files["/models/" + name] = data
  monkeypatch.setitem(convert.TORCHVISION_FILES, "resnet50", name)
  monkeypatch.setenv(convert.TORCHVISION_URL_ENV, server.url + "/models/")
  downloaded = tmp_path / "pretrained" / "resnet50"
  convert_cli.main(["--download", "resnet50", "--out", str(downloaded)])
  assert sorted(os.listdir(tmp_path / "pretrained")) == ["resnet50"]  # the .pth is gone
  narrow = _mc("resnet50", 10, NARROW)
  monkeypatch.setattr(convert, "torchvision_model_config",  # --pth converts at full width
                      lambda arch, classes=1000: narrow if (arch, classes) == ("resnet50", 10)
                      else None)
  converted = tmp_path / "converted"
  convert_cli.main(["--source", "torchvision", "--arch", "resnet50", "--pth", str(pth), "--out",
                str(converted)])
  got, again = (convert.load_weights(str(p), mc) for p in (downloaded, converted))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
  with torch.no_grad():
    want = tm.eval()(x).numpy()
  _close(jax.jit(models.build_model(mc).apply)(got, x.numpy().transpose(0, 2, 3, 1)), want)
  info = json.loads((downloaded / convert.INFO_FILE).read_text())
  assert (info["arch"], info["model"]["name"], info["sha256"]) == (
      "resnet50", "resnet50", hashlib.sha256(data).hexdigest())
  # A run of configs/resnet50_ours.py (narrowed) starts from them: the stem and the blocks from
  # ImageNet (the paper's scope), its attention modules and 2-class head from scratch.
  from configs import resnet50_ours

  config = resnet50_ours.get_config()
  config.update(pretrained=str(downloaded), image_size=64)
  config.model.width = NARROW
  _, variables = state_lib.initial_variables(config, jax.random.key(0))
  start, loaded = (traverse_util.flatten_dict(v) for v in (variables, got))
  copied = {k for k in start if k in loaded and np.array_equal(start[k], loaded[k])}
  assert copied == {k for k in loaded if k[0] == "batch_stats" or k[1] != "fc"}
  assert {k[1] for k in set(start) - copied} == {"fc", "stem_c_attn", "layer1_c_attn",
                                                  "layer2_s_attn", "layer3_s_attn",
                                                  "layer4_s_attn"}


def test_missing_or_foreign_pretrained_weights_name_the_backbones_conversion(tmp_path):
  """The missing-weights line names --download for the config's backbone (ResNet-50's V2 file,
  VGG19-BN's for a batch-norm VGG); weights converted for another backbone are refused."""
  r50 = default.get_config().model
  r50.name = "resnet50"
  with pytest.raises(UserError, match=r"no converted weights there\. Run jattn convert "
                                      r"--download resnet50 --out .*resnet50-11ad3fa6\.pth") as e:
    convert.load_weights(str(tmp_path / "nowhere"), r50)
  assert "\n" not in str(e.value)
  vgg_bn = default.get_config().model
  vgg_bn.batch_norm = True
  with pytest.raises(UserError, match=r"--download vgg19_bn .*vgg19_bn-c79401a0\.pth"):
    convert.load_weights(str(tmp_path / "nowhere"), vgg_bn)
  mc = convert.torchvision_model_config("vgg19", 2)
  variables = {"params": {"block1": {"conv1": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}}}}
  convert.save_weights(variables, str(tmp_path / "vgg"), {"model": mc.to_dict()})
  with pytest.raises(UserError, match=r"pretrained='.*vgg' holds weights converted for a vgg19 "
                                      r"\(info\.json\), but config\.model\.name='resnet50'; "
                                      r"convert resnet50's: jattn convert --download "
                                      r"resnet50"):
    convert.load_weights(str(tmp_path / "vgg"), r50)


# --- Configs, sweep, tables ---

def test_resnet50_rows_are_the_papers_ablation_and_tabulate_as_their_own_rows(tmp_path,
                                                                             monkeypatch):
  """configs/resnet50*.py are the paper's four rows on ResNet-50, with VGG19's recipe; `sweep.py
  --rows resnet50` runs them (`--demo`: on the demo data); their results are shown as their own
  rows, labelled with the backbone, never with the paper's VGG19 figures beside them, even where
  a config claims a paper row."""
  from configs import ours, resnet50, resnet50_c, resnet50_ours, resnet50_s
  from jattn.sweeps import sweep
  from tests.test_hostile_tools import results, write_sweep

  placements = {m.__name__: (tuple(c.model.c_attn_stages), tuple(c.model.s_attn_stages))
                for m in (resnet50, resnet50_c, resnet50_s, resnet50_ours)
                for c in [m.get_config()]}
  assert placements == {"configs.resnet50": ((), ()), "configs.resnet50_c": ((0, 1), ()),
                        "configs.resnet50_s": ((), (2, 3, 4)),
                        "configs.resnet50_ours": ((0, 1), (2, 3, 4))}
  paper, r50 = ours.get_config(), resnet50_ours.get_config()
  differ = {k for k in set(paper.to_dict()) | set(r50.to_dict())
            if k not in ("model", "name", "paper_row", "pretrained") and paper[k] != r50[k]}
  assert not differ and r50.paper_row == "" and r50.pretrained == "pretrained/resnet50"

  planned = []
  monkeypatch.setattr(sweep, "sweep", lambda configs, folds, out, *a: planned.append(
      (configs, folds, os.path.relpath(out, sweep.REPO))) or "")
  sweep_cli.main(["--rows", "resnet50"])
  sweep_cli.main(["--rows", "resnet50", "--demo"])
  names = ["resnet50", "resnet50_c", "resnet50_s", "resnet50_ours"]
  assert planned == [([f"configs/{n}.py" for n in names], [1, 2, 3, 4, 5], "sweeps/resnet50"),
                     ([f"configs/demo.py:{n}" for n in names], [1, 2], "sweeps/demo_resnet50")]
  assert [r["name"] for r in sweep.plan(planned[1][0], [1], [])] == [f"demo_{n}" for n in names]

  rng = np.random.default_rng(3)
  claimed = json.loads(r50.to_json())
  claimed["paper_row"] = "Ours"  # e.g. configs/ours.py with --config.model.name=resnet50
  runs = {**{("ours", k): results("ours", k, rng, config=json.loads(paper.to_json()))
             for k in (1, 2)},
          **{("resnet50_ours", k): results("resnet50_ours", k, rng, config=claimed)
             for k in (1, 2)}}
  write_sweep(tmp_path, runs)
  markdown = report.write(str(tmp_path))[0]
  rows = [line.split("|")[1].strip() for line in markdown.splitlines() if line.startswith("| ")]
  assert rows.count("*paper: Ours*") == 2  # Tables 1 and 2, beside the VGG19 row only
  table1 = rows[rows.index("ours"):rows.index("ours") + 3]
  assert table1 == ["ours", "*paper: Ours*", "resnet50_ours (resnet50)"]


def test_parameter_report_and_torch_peer_for_a_resnet(capsys):
  """`jattn models` on a ResNet: its rows (stem, stages, each attention module) add up
  to the hand-derived counts; the benchmark's PyTorch peer of a ResNet config is its
  TorchResNet, with as many parameters."""
  from jattn.perf import torch_reference

  models_cli.main(["--config", "configs/resnet50_ours.py", "--config.model.name=resnet18",
                   "--image-size", "64"])
  out = capsys.readouterr().out
  rows = dict(re.findall(r"^(\S.*?)\s{2,}([\d,]+)$", out, re.M))
  assert rows["stem"] == "9,536"  # 7 x 7 x 3 x 64 conv + 64 scales and biases
  assert rows["stem C-Attn"] == rows["stage 1 C-Attn"] == "135,168"  # 33 x 64^2
  assert rows["stage 4 S-Attn"] == "327,680" and rows["fc"] == "1,026"
  assert rows["total"] == "11,877,954"  # test_attention_parameter_counts' ResNet-18 row
  assert "attention overhead: 700,416 parameters" in out
  assert re.search(r"forward pass, one 64x64 image: [\d.]+ GFLOPs \(without attention", out)
  mc = _mc("resnet50", 2, NARROW, (0, 1), (2, 3, 4))
  peer = torch_reference.for_config(mc)
  assert isinstance(peer, TorchResNet) and [n for _, n in peer.sites] == [
      "stem_c_attn", "layer1_c_attn", "layer2_s_attn", "layer3_s_attn", "layer4_s_attn"]
  assert sum(p.numel() for p in peer.parameters()) == _count(
      _shapes(models.build_model(mc))["params"])


# --- A ResNet run, end to end ---

@pytest.fixture(scope="module")
def resnet_run(synthetic_tree, prepared_dir, tmp_path_factory):
  """The work dir of a tiny narrow ResNet-18 run with the default attention placement (the demo's
  ResNet-50 rows with model.name overridden), 32x32, one epoch, through the command line."""
  from jattn import main
  from tests.runs import tiny_overrides

  workdir = str(tmp_path_factory.mktemp("resnet_run"))
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, num_epochs=1,
                             **{"model.name": "resnet18"})
  main.main(["--config", "configs/demo.py:resnet50_ours", "--workdir", workdir,
             *[f"--config.{o}" for o in overrides]])
  return workdir


def test_a_resnet_run_is_inspected_and_refuses_a_checkpoint_of_another_architecture(
    resnet_run, synthetic_tree, tmp_path, capsys):
  """inspect (and the notebook, through the same attention_sites; tests/test_inspect.py draws
  them) reads every attention module of a ResNet run: labels by stage, maps at each stage's
  resolution (32x32 input: 8, 8, 4, 2, 1), columns of D' and E' summing to 1 (eqs. 4, 10). Its
  checkpoints under a config of another architecture are refused in one line, exit 2, nothing
  changed."""
  from jattn.inference import attention_maps as inspect
  from jattn.inference import runs

  with open(os.path.join(resnet_run, "results.json")) as f:
    assert json.load(f)["config"]["model"]["name"] == "resnet18"
  config, state = runs.restore(resnet_run)
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  probs, maps = inspect.attention_maps(state, images, models.attention_sites(config.model))
  assert [(m["label"], m["grid"]) for m in maps.values()] == [
      ("C-Attn after the stem", (8, 8)), ("C-Attn after stage 1", (8, 8)),
      ("S-Attn after stage 2", (4, 4)), ("S-Attn after stage 3", (2, 2)),
      ("S-Attn after stage 4", (1, 1))]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  for m in maps.values():
    weights = m["e_prime"] if m["kind"] == "s_attn" else m["d_prime"]
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
  png = next(os.path.join(root, f) for root, _, names in os.walk(synthetic_tree[0])
             for f in sorted(names) if f.endswith(".png"))
  other = tmp_path / "other"
  shutil.copytree(resnet_run, other)
  stored = json.loads((other / "config.json").read_text())
  stored["model"]["name"] = "resnet50"  # the same fields, another architecture
  (other / "config.json").write_text(json.dumps(stored))
  before = sorted(p for p in other.rglob("*"))
  with pytest.raises(SystemExit) as e:
    inspect_cli.main(["--workdir", str(other), "--out", str(tmp_path / "o"), png])
  err = capsys.readouterr().err
  assert e.value.code == 2 and err.count("\n") == 1, err
  assert re.match(r"jattn inspect: error: the checkpoints in .* do not fit the model of this "
                  r"run's config", err), err
  assert sorted(p for p in other.rglob("*")) == before
