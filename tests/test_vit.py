"""The ViT presets (jattn/models/vit.py) against timm's own VisionTransformer, built with the
kwargs of each model card (written out here, independently of the presets): the same features and
logits from the same random weights converted by jattn's key map, at the native image size and at
another one (position embeddings resampled); the full-size parameter counts; the weights file's
errors; the optimiser of a frozen backbone; a small ViT trained end to end through `jattn train`."""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import traverse_util
from safetensors.numpy import save_file
from timm.layers import SwiGLUPacked

from configs import default
from jattn import models
from jattn.core.errors import UserError
from jattn.models import vit
from jattn.training import state as state_lib

# The model cards' timm calls (MahmoodLab UNI and UNI2-h, paige-ai Virchow2, bioptimus
# H-optimus-0, prov-gigapath's config.json, owkin Phikon-v2 as timm's ViT-L/16 with LayerScale).
SWIGLU = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
CARDS = {
    "dinov2_vits14_reg4": ("vit_small_patch14_reg4_dinov2", {}),
    "dinov2_vitb14_reg4": ("vit_base_patch14_reg4_dinov2", {}),
    "uni": ("vit_large_patch16_224", dict(img_size=224, patch_size=16, init_values=1e-5)),
    "uni2_h": ("vit_giant_patch14_224", dict(
        img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
        mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, **SWIGLU)),
    "virchow2": ("vit_huge_patch14_224", dict(
        img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, global_pool="", **SWIGLU)),
    "h_optimus_0": ("vit_giant_patch14_reg4_dinov2", dict(img_size=224, init_values=1e-5)),
    "gigapath": ("vit_giant_patch14_dinov2", dict(
        img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
        init_values=1e-5, mlp_ratio=5.33334)),
    "phikon_v2": ("vit_large_patch16_224", dict(init_values=1e-5)),
}
SMALL = dict(depth=2, embed_dim=96, num_heads=2)  # 96: an even SwiGLU width at every ratio


def model_config(name, num_classes=3, **fields):
  mc = default.get_config().model
  mc.name, mc.num_classes, mc.dtype = name, num_classes, "float32"
  mc.vit_c_attn_blocks, mc.vit_s_attn_blocks = (), ()
  for k, v in fields.items():
    if k in SMALL:
      mc.vit[k] = v
    else:
      mc[k] = v
  return mc


def timm_small(name, num_classes=3, seed=0):
  """timm's model of the card at SMALL size with random weights (every tensor drawn, so that
  LayerScale's 1e-5 does not hide the blocks), and its state dict as NumPy."""
  arch, kwargs = CARDS[name]
  torch.manual_seed(seed)
  m = timm.create_model(arch, pretrained=False, num_classes=num_classes, dynamic_img_size=True,
                        **{**kwargs, **SMALL}).eval()
  sd = {k: torch.randn_like(v) * 0.3 for k, v in m.state_dict().items()}
  m.load_state_dict(sd)
  return m, {k: v.numpy() for k, v in sd.items()}


def _close(ours, theirs):
  theirs = np.asarray(theirs)
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5,
                             atol=1e-5 * float(np.abs(theirs).max()))


# Between them, every option the presets use (GigaPath's and H-optimus-0's combine these).
FAMILIES = ["dinov2_vits14_reg4", "uni", "uni2_h", "virchow2", "h_optimus_0", "gigapath"]


@pytest.mark.parametrize("name", FAMILIES)
def test_features_and_logits_equal_timms_at_native_and_another_size(name):
  """Registers or none, position embeddings over the patches only or over the class token too,
  GELU or packed SwiGLU, patch 14 or 16, native 518 or 224, token or token+avg pooling
  (Virchow2: timm returns the tokens, pooled here as its card pools them; the head applied to
  them by torch)."""
  m, sd = timm_small(name)
  mc = model_config(name, **SMALL)
  if name == "virchow2":  # timm has no head on concatenated features: one drawn here
    sd["head.weight"] = np.random.default_rng(0).standard_normal((3, 192)).astype(np.float32)
  variables = vit.convert({k: v for k, v in sd.items() if not k.startswith("head.")}, mc)
  variables["params"]["head"] = {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]}
  model = models.build_model(mc)
  both = jax.jit(lambda v, x: (model.apply(v, x, return_features=True), model.apply(v, x)))
  native = vit.PRESETS[name].native_size
  for size in (native, 112 if native == 224 else 224):
    x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      xt = torch.from_numpy(x).permute(0, 3, 1, 2)
      tokens = m.forward_features(xt)
      if name == "virchow2":
        feats = torch.cat([tokens[:, 0], tokens[:, m.num_prefix_tokens:].mean(1)], -1)
        logits = torch.nn.functional.linear(feats, torch.from_numpy(sd["head.weight"]),
                                            torch.from_numpy(sd["head.bias"]))
      else:
        feats = m.forward_head(tokens, pre_logits=True)
        logits = m.forward_head(tokens)
    ours_feats, ours_logits = both(variables, x)
    assert ours_feats.shape == (2, models.feature_dim(mc))  # Virchow2's: 2 x 96
    _close(ours_feats, feats.numpy())
    _close(ours_logits, logits.numpy())


def test_avg_pooling_is_timms_mean_of_the_normed_patch_tokens():
  """vit.pool='avg': timm's global_pool='avg' with the final norm on every token (fc_norm=False),
  the layout of a model trained with a class token and pooled by the mean."""
  arch, kwargs = CARDS["uni"]
  torch.manual_seed(0)
  m = timm.create_model(arch, pretrained=False, num_classes=3, global_pool="avg", fc_norm=False,
                        **{**kwargs, **SMALL}).eval()
  sd = {k: torch.randn_like(v) * 0.3 for k, v in m.state_dict().items()}
  m.load_state_dict(sd)
  sd = {k: v.numpy() for k, v in sd.items()}
  mc = model_config("uni", **SMALL)
  mc.vit.pool = "avg"
  variables = vit.convert({k: v for k, v in sd.items() if not k.startswith("head.")}, mc)
  variables["params"]["head"] = {"kernel": sd["head.weight"].T, "bias": sd["head.bias"]}
  x = np.random.default_rng(0).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = m(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  _close(jax.jit(models.build_model(mc).apply)(variables, x), theirs)


def test_bfloat16_computes_and_returns_float32_logits_near_float32s():
  """bfloat16 on this CPU (the attention's operands widened: no 16-bit dot with float32 logits
  here), with both modules, against the float32 model of the same variables."""
  mc = model_config("virchow2", **SMALL, vit_c_attn_blocks=(-2,), vit_s_attn_blocks=(-2,))
  x = np.random.default_rng(0).standard_normal((2, 56, 56, 3)).astype(np.float32)
  full = models.build_model(mc)
  variables = models.init_variables(full, jax.random.key(0), 56)
  mc.dtype = "bfloat16"
  half = jax.jit(models.build_model(mc).apply)(variables, x)
  assert half.dtype == jnp.float32
  ref = np.asarray(jax.jit(full.apply)(variables, x))
  np.testing.assert_allclose(half, ref, atol=0.05 * np.abs(ref).max())


def test_position_embeddings_resample_as_timms_function():
  """Down (37 -> 16, DINOv2 at 224) and up (14 -> 20): timm's resample_abs_pos_embed itself."""
  from timm.layers import resample_abs_pos_embed
  rng = np.random.default_rng(0)
  for old, new in ((37, 16), (14, 20)):
    pos = rng.standard_normal((1, old * old, 8)).astype(np.float32)
    theirs = resample_abs_pos_embed(torch.from_numpy(pos), [new, new], num_prefix_tokens=0)
    _close(vit.resample_pos_embed(jnp.asarray(pos), (new, new)), theirs.numpy())


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("name", sorted(CARDS))
def test_full_size_parameter_counts_equal_timms(name):
  """Counted without weights: timm on torch's meta device, ours by jax.eval_shape; the backbone
  only (timm with num_classes=0, our head and attention modules left out)."""
  arch, kwargs = CARDS[name]
  with torch.device("meta"):
    m = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
  ours = vit.backbone_shapes(model_config(name))
  assert sum(int(np.prod(s)) for s in ours.values()) == sum(p.numel() for p in m.parameters())


def test_hugging_face_dinov2_gives_transformers_features():
  """Phikon-v2 is published as a Hugging Face Dinov2Model: query, key and value as three linears
  (filled into the fused qkv), LayerScale's lambda1, `layernorm`. Transformers' own Dinov2Model
  at SMALL size with random weights: the same class-token features (its last_hidden_state[:, 0])
  from its state dict (transformers 5 names; the files on the hub have transformers 4's, which
  jattn reads too)."""
  from transformers import Dinov2Config, Dinov2Model

  cfg = Dinov2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=2, patch_size=16,
                     image_size=224, layerscale_value=1e-5, mlp_ratio=4, use_swiglu_ffn=False,
                     layer_norm_eps=1e-6, hidden_act="gelu")
  torch.manual_seed(0)
  m = Dinov2Model(cfg).eval()
  sd = {k: torch.randn_like(v) * 0.3 for k, v in m.state_dict().items()}
  m.load_state_dict(sd)
  mc = model_config("phikon_v2", **SMALL)
  variables = vit.convert({k: v.numpy() for k, v in sd.items()}, mc)
  variables["params"]["head"] = {"kernel": np.zeros((96, 3), np.float32),
                                 "bias": np.zeros(3, np.float32)}
  x = np.random.default_rng(1).standard_normal((2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = m(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state[:, 0]
  model = models.build_model(mc)
  _close(jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x),
         theirs.numpy())


def test_weights_file_errors_are_one_line_naming_the_key_or_shape(tmp_path):
  mc = model_config("uni", **SMALL)
  _, sd = timm_small("uni")
  missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.qkv.weight"}
  with pytest.raises(UserError, match=r"no key 'blocks\.1\.attn\.qkv\.weight'.*vit"):
    vit.convert(missing, mc)
  bad = {**sd, "pos_embed": sd["pos_embed"][:, :50]}
  with pytest.raises(UserError, match=r"'pos_embed' has shape \(1, 50, 96\).*needs \(1, 197, 96\)"):
    vit.convert(bad, mc)
  with pytest.raises(UserError, match=r"no place for: blocks\.2\.norm1\.weight"):
    vit.convert({**sd, "blocks.2.norm1.weight": np.ones(96, np.float32)}, mc)
  with pytest.raises(UserError, match="huggingface.co/MahmoodLab/UNI .*gated.*never downloads"):
    vit.read_state_dict(str(tmp_path / "nope.safetensors"), mc)
  (tmp_path / "x.safetensors").write_bytes(b"not a file")
  with pytest.raises(UserError, match="not a readable safetensors"):
    vit.read_state_dict(str(tmp_path / "x.safetensors"), mc)


def _config(name="dinov2_vits14_reg4", weights="", **model_fields):
  config = default.get_config()
  config.pretrained = ""
  config.image_size = 56
  config.model = model_config(name, 2, **SMALL)
  config.model.weights = weights
  for k, v in model_fields.items():
    config.model[k] = v
  return config


def test_safetensors_and_pth_files_give_the_files_parameters(tmp_path):
  """Both file kinds give the same parameters, equal to the file's (the conv transposed)."""
  _, sd = timm_small("dinov2_vits14_reg4", num_classes=0)
  st, pth = str(tmp_path / "w.safetensors"), str(tmp_path / "w.pth")
  save_file(sd, st)
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pth)
  for w in (st, pth):
    params = vit.load_weights(_config(weights=w).model)["params"]
    np.testing.assert_array_equal(params["pos_embed"], sd["pos_embed"])
    np.testing.assert_array_equal(params["patch_embed"]["kernel"],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["blocks_1"]["mlp"]["fc2"]["kernel"],
                                  sd["blocks.1.mlp.fc2.weight"].T)


@pytest.mark.parametrize("last, trained_blocks", [(0, ()), (1, ("blocks_1",))])
def test_a_frozen_backbone_has_optimiser_state_only_for_what_it_trains(last, trained_blocks):
  config = _config(freeze=True, train_last_blocks=last, vit_s_attn_blocks=(-2,))
  model, variables = state_lib.initial_variables(config, jax.random.key(0))
  state = state_lib.make_state(config, model, variables, np.zeros(3), np.ones(3), 4)
  params = traverse_util.flatten_dict(state.params)
  trained = {k for k in params if k[0] in ("head", "blocks_0_s_attn", *trained_blocks)}
  # Adam's two moments hold exactly the trained parameters (the rest are masked out)
  moments = [traverse_util.flatten_dict(s.mu, keep_empty_nodes=False)
             for s in jax.tree_util.tree_leaves(
                 state.opt_state, is_leaf=lambda s: hasattr(s, "mu"))
             if hasattr(s, "mu")]
  assert len(moments) == 1
  kept = {k for k, v in moments[0].items() if not isinstance(v, type(None))
          and hasattr(v, "shape")}
  assert kept == trained
  grads = jax.tree_util.tree_map(jnp.ones_like, state.params)
  after = traverse_util.flatten_dict(
      jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads).params)
  for k, v in params.items():
    changed = not np.array_equal(np.asarray(v), np.asarray(after[k]))
    assert changed == (k in trained), k


def test_training_mode_and_placement_errors():
  with pytest.raises(UserError, match="train_last_blocks=1.*freeze=True"):
    models.check(_config(train_last_blocks=1).model)
  with pytest.raises(UserError, match="train_last_blocks=3: use 0 to 2"):
    models.check(_config(freeze=True, train_last_blocks=3).model)
  with pytest.raises(UserError, match=r"vit_c_attn_blocks=\(3,\).*blocks 1 to 2"):
    models.check(_config(vit_c_attn_blocks=(3,)).model)
  with pytest.raises(UserError, match="4x4 patch grid .* smaller than C-Attn's 7x7"):
    models.check(_config(vit_c_attn_blocks=(1,), c_attn_kernel=7).model, 56)
  from jattn.training import validate
  with pytest.raises(UserError, match="not config.pretrained: set --config.pretrained=''"):
    config = _config()
    config.pretrained = "pretrained/vgg19"
    validate.validate_config(config)
  vgg = default.get_config().model
  vgg.weights = "w.safetensors"
  with pytest.raises(UserError, match="vgg19 takes ImageNet weights from config.pretrained"):
    models.check(vgg)


def test_attention_sits_on_the_patch_grid_and_reaches_the_class_token():
  """S-Attn and C-Attn after block 1 of 2 see the 4x4 grid of patch tokens (16, not 21 with the
  class and register tokens) and change the class token's features through the last block."""
  mc = model_config("dinov2_vits14_reg4", **SMALL, vit_c_attn_blocks=(-2,),
                    vit_s_attn_blocks=(-2,))
  model = models.build_model(mc)
  x = np.random.default_rng(0).standard_normal((1, 56, 56, 3)).astype(np.float32)
  variables = models.init_variables(model, jax.random.key(0), 56)
  apply = jax.jit(lambda v, x: model.apply(v, x, return_features=True, mutable=["intermediates"]))
  with_attn, inter = apply(variables, x)
  assert inter["intermediates"]["blocks_0_s_attn"]["e_prime"][0].shape == (1, 16, 16)
  assert inter["intermediates"]["blocks_0_c_attn"]["d_prime"][0].shape == (1, 96, 96)
  assert [s[0] for s in vit.attention_sites(mc)] == ["blocks_0_s_attn", "blocks_0_c_attn"]
  assert models.feature_dim(mc) == with_attn.shape[-1] == 96
  assert vit.head_params(mc) == (("head",),) and variables["params"]["head"]["kernel"].shape == (
      96, 3)
  # Zeroed, both modules are the identity (S_V = M_V = 0: F + 0, eqs. 6 and 12).
  zero = {k: (jax.tree_util.tree_map(jnp.zeros_like, v) if k.endswith("_attn") else v)
          for k, v in variables["params"].items()}
  without, _ = apply({"params": zero}, x)
  assert not np.allclose(with_attn, without)


@pytest.mark.slow
def test_a_small_vit_fine_tuned_from_a_weights_file_through_jattn_train(
    synthetic_tree, prepared_dir, tmp_path):
  """configs/demo.py:vit_s14_ours (ViT-S/14 reg4, 2 blocks of 96 channels, 56x56, C-Attn and S-Attn
  after block 1) with weights from a .safetensors file, its last block, attention and head
  fine-tuned (freeze, train_last_blocks=1), one epoch, through the command line. The restored
  checkpoint (its partitioned optimiser state included) holds the file's block 1 unchanged and a
  trained block 2; results.json records the preset, its licence and the file's sha256 (hashlib's,
  here); the tables label the row by its backbone and mode."""
  from jattn import main
  from jattn.data.breakhis import published
  from jattn.inference import runs
  from tests.runs import tiny_overrides

  _, sd = timm_small("dinov2_vits14_reg4", num_classes=0)
  weights = str(tmp_path / "vit.safetensors")
  save_file(sd, weights)
  workdir = str(tmp_path / "run")
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, num_epochs=1, image_size=56,
                             **{"model.vit.depth": 2, "model.vit.num_heads": 2,
                                "model.weights": weights, "model.freeze": True,
                                "model.train_last_blocks": 1, "bootstrap_resamples": 0})
  main.main(["--config", "configs/demo.py:vit_s14_ours", "--workdir", workdir,
             *[f"--config.{o}" for o in overrides]])
  _, state = runs.restore(workdir)
  p = state.params
  np.testing.assert_array_equal(p["blocks_0"]["attn"]["qkv"]["kernel"],
                                sd["blocks.0.attn.qkv.weight"].T)
  np.testing.assert_array_equal(p["pos_embed"], sd["pos_embed"])
  assert not np.array_equal(p["blocks_1"]["attn"]["qkv"]["kernel"],
                            sd["blocks.1.attn.qkv.weight"].T)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(weights, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert results["backbone"]["weights_sha256"] == digest
  assert results["backbone"]["preset"] == "dinov2_vits14_reg4"
  assert results["backbone"]["licence"] == "Apache-2.0"
  assert published.setting(results).startswith("dinov2_vits14_reg4")
  assert "frozen but the last block" in published.setting(results)
  assert "from scratch" not in published.setting(results)


@pytest.mark.slow
def test_a_vit_probe_and_a_fine_tuned_vit_on_a_folder_source_are_tabulated_and_compared(
    tmp_path):
  """On a folder source (a folder per class and a manifest grouping images by patient), the demo's
  small ViT-S/14 without attention modules twice through `jattn train`: frozen with augmentation
  off (the linear probe on features computed once, scikit-learn's solver) and fine-tuned end to
  end; `jattn tables` lists both rows and compares them fold by fold."""
  from jattn import cli, main
  from jattn.data.breakhis import export
  from tests.conftest import small_tree
  from tests.runs import tiny_overrides

  tree = small_tree(tmp_path / "tree", junk=False, folds_csv=False, mkfold=False)
  folder = tmp_path / "folder"
  export.to_folder(tree, str(folder))
  overrides = [f"--config.{o}" for o in tiny_overrides(
      str(folder), str(tmp_path / "prepared"), num_epochs=1, image_size=28,
      **{"data.name": "folder", "data.folder.manifest": str(folder / "manifest.csv"),
         "data.folder.group": "patient", "data.folder.strata": "magnification",
         "data.folder.positive_class": "malignant", "data.num_folds": 2,
         "model.vit.depth": 1, "model.vit.num_heads": 2, "bootstrap_resamples": 0,
         "augment.flip": "none", "augment.rotation": "none"})]
  sweep = tmp_path / "sweep"
  rows = {"vit_probe": ["--config.model.freeze=True", "--config.probe.solver=logistic"],
          "vit_finetuned": []}
  for row, extra in rows.items():
    main.main(["--config", "configs/demo.py:vit_s14", "--workdir", str(sweep / row / "fold1"),
               *overrides, *extra])
  results = {}
  for row in rows:
    with open(sweep / row / "fold1" / "results.json") as f:
      results[row] = json.load(f)
  assert results["vit_probe"]["probe"]["solver"] == "logistic"
  assert "probe" not in results["vit_finetuned"]
  for r in results.values():
    assert r["backbone"]["preset"] == "dinov2_vits14_reg4" and r["data"]["num_test_images"] > 0
  cli.main(["tables", str(sweep), "--compare", "vit_probe:vit_finetuned"])
  tables = (sweep / "tables.md").read_text()
  assert "vit_probe" in tables and "vit_finetuned" in tables
  assert "vit_probe − vit_finetuned" in (sweep / "compare.md").read_text()
