"""Backbone features: `return_features` against the logits by hand, `jattn features`' HDF5 files
read back with h5py against the model's own forward on images read independently (PIL,
OpenSlide), the real slide's tiles against the slide command's tiler, resuming, and the linear
probe through `jattn train` against scikit-learn's LogisticRegression fitted here on the written
features."""

from __future__ import annotations

import csv
import json
import os

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import openslide
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import StandardScaler

from jattn import cli, main, models
from jattn.inference import features as features_lib
from jattn.inference import runs
from jattn.slides import pipeline
from tests.runs import DEMO, tiny_overrides

SLIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                     "data", "slides", "CMU-1-Small-Region.svs")
if not os.path.exists(SLIDE):
  SLIDE = "/work/shared/data/slides/CMU-1-Small-Region.svs"


def _model_config(name: str, **kw) -> ml_collections.ConfigDict:
  from configs import default
  mc = default.get_config().model
  mc.name, mc.width, mc.classifier_width, mc.pool_size, mc.dtype = name, 1 / 16, 16, 1, "float32"
  mc.batch_norm = True
  for k, v in kw.items():
    mc[k] = v
  return mc


@pytest.mark.slow
def test_resnet_features_are_what_the_head_takes():
  """logits == features @ kernel + bias with `fc`'s own parameters; the parameter tree is the
  same whatever is returned; the features are the mean of the last block's map. (VGG19's logits
  by hand from its features: the data set's test below, on the trained demo run.)"""
  mc = _model_config("resnet18", c_attn_stages=(), s_attn_stages=())
  model = models.build_model(mc)
  variables = models.init_variables(model, jax.random.key(0), 32)
  x = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3))

  @jax.jit
  def both(variables, x):
    logits = model.apply(variables, x, train=False)
    feats, state = model.apply(variables, x, train=False, return_features=True,
                               capture_intermediates=True, mutable=["intermediates"])
    return logits, feats, state["intermediates"]

  logits, feats, intermediates = both(variables, x)
  assert feats.shape == (3, models.feature_dim(mc)) and feats.dtype == jnp.float32
  (prefix,) = models.head_params(mc)
  head = variables["params"]
  for key in prefix:
    head = head[key]
  np.testing.assert_allclose(np.asarray(feats) @ np.asarray(head["kernel"])
                             + np.asarray(head["bias"]), logits, rtol=1e-5, atol=1e-6)
  init_features = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False,
                                                    return_features=True))
  assert jax.tree.structure(init_features) == jax.tree.structure(variables)
  last = intermediates["layer4_1"]["__call__"][0]  # the last block, after its ReLU
  np.testing.assert_allclose(feats, np.mean(np.asarray(last), axis=(1, 2)), rtol=1e-6)


def _h5(path):
  return h5py.File(path, "r")


def _forward_features(state, images: np.ndarray) -> np.ndarray:
  """The run's model on uint8 images, normalised here by its statistics."""
  x = (images.astype(np.float32) - np.asarray(state.image_mean)) / np.asarray(state.image_std)
  return np.asarray(state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                                   jnp.asarray(x), train=False, return_features=True))


@pytest.mark.slow
def test_a_data_sets_features(trained_run, synthetic_tree, tmp_path):
  """HDF5 layout read back with h5py; a few images read with PIL give the same features through
  the run's model, and their logits by hand the probabilities `jattn predict` gives."""
  out = str(tmp_path / "features")
  cli.main(["features", "--workdir", trained_run, "--out", out, "--dtype", "float16"])
  (name,) = os.listdir(out)
  assert name == "breakhis.h5"
  config, state = runs.restore(trained_run)
  with _h5(os.path.join(out, name)) as f:
    feats, names = f["features"][:], [n.decode() for n in f["names"][:]]
    split = [s.decode() for s in f["split"][:]]
    attrs = dict(f.attrs)
    assert f["features"].attrs["name"] == "breakhis"
    labels = f["labels"][:]
  dim = models.feature_dim(config.model)
  assert feats.dtype == np.float16 and feats.shape == (len(names), dim) and len(set(names)) > 100
  assert attrs["backbone"] == "vgg19" and attrs["feature_dim"] == dim
  assert len(attrs["weights_sha256"]) == 64 and attrs["kind"] == "dataset"
  assert json.loads(attrs["mpp"])["40X"] == pytest.approx(0.4924) and attrs["dtype"] == "float16"
  assert set(split) == {"train", "test"} and labels.dtype == np.int64
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    tested = {row["file_name"] for row in csv.DictReader(f)}
  assert {n for n, s in zip(names, split, strict=True) if s == "test"} == tested
  found = {fn: os.path.join(d, fn) for d, _, fs in os.walk(synthetic_tree[0]) for fn in fs}
  pick = [i for i, s in enumerate(split) if s == "test"][:3]
  size = config.image_size
  images = np.stack([np.asarray(Image.open(found[names[i]]).convert("RGB").resize(
      (size, size), Image.Resampling.BILINEAR)) for i in pick])
  expected = _forward_features(state, images)
  np.testing.assert_allclose(feats[pick].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
  # VGG19's logits by hand from the features: the probabilities of the run's predictions.csv.
  head = state.params["classifier"]["head"]
  logits = expected @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  with open(os.path.join(trained_run, "predictions.csv")) as f:
    given = {row["file_name"]: float(row["prob_malignant"]) for row in csv.DictReader(f)}
  np.testing.assert_allclose(probs[:, 1], [given[names[i]] for i in pick], atol=2e-6)


@pytest.mark.slow
def test_a_slides_tiles_features_and_resuming(trained_run, tmp_path, capsys, monkeypatch):
  """On the real slide: the coords are the slide command's tissue tiles (its own planning and
  tiler), inside the slide as OpenSlide reads it; a tile read by OpenSlide here gives the same
  features; a second call skips the slide; other settings are refused in one line; a write that
  fails half-way leaves no file."""
  out = str(tmp_path / "slides")
  args = ["features", "--workdir", trained_run, "--out", out, "--slides", SLIDE,
          "--stratum", "40X"]
  cli.main(args)
  path = os.path.join(out, "CMU-1-Small-Region.h5")
  assert os.listdir(out) == ["CMU-1-Small-Region.h5"]
  options = pipeline.Options(stratum="40X")
  run = pipeline.load_run(trained_run, options)
  plan = pipeline.plan_slide(run, SLIDE, "x", options)
  tiles = pipeline.locate(plan, options)[4]
  slide = openslide.OpenSlide(SLIDE)
  with _h5(path) as f:
    coords, feats = f["coords"][:], f["features"][:]
    c = dict(f["coords"].attrs)
    attrs = dict(f.attrs)
  assert coords.dtype == np.int64 and feats.dtype == np.float32 and len(coords) >= 3
  np.testing.assert_array_equal(coords, np.stack([tiles.xs, tiles.ys], 1))
  w, h = slide.dimensions
  tw, th = c["patch_size_level0_wh"]
  assert (coords >= 0).all() and (coords[:, 0] + tw <= w).all() and (coords[:, 1] + th <= h).all()
  assert c["patch_size_level0"] == tw and c["patch_level"] == 0
  assert c["level0_magnification"] == float(slide.properties["openslide.objective-power"])
  assert c["level0_width"] == w and c["level0_height"] == h
  assert attrs["mpp"] == pytest.approx(0.4924) and json.loads(attrs["stratum"])["value"] == "40X"
  config, state = runs.restore(trained_run)
  x, y = coords[-1]
  region = slide.read_region((int(x), int(y)), 0, (int(tw), int(th))).convert("RGB")
  tile = np.asarray(region.resize((config.image_size,) * 2, Image.Resampling.BILINEAR))
  np.testing.assert_allclose(feats[-1:], _forward_features(state, tile[None]), rtol=1e-4,
                             atol=1e-5)
  slide.close()
  stamp = os.stat(path).st_mtime_ns
  capsys.readouterr()
  cli.main(args)
  assert "skipped" in capsys.readouterr().out and os.stat(path).st_mtime_ns == stamp
  with pytest.raises(SystemExit) as e:
    cli.main(args + ["--min-tissue", "0.9"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--overwrite" in err
  original = h5py.Group.create_dataset

  def failing(self, name, *a, **kw):
    if name == "coords":
      raise OSError("disk full (simulated)")
    return original(self, name, *a, **kw)

  monkeypatch.setattr(h5py.Group, "create_dataset", failing)
  with pytest.raises(OSError):
    features_lib.write_h5(str(tmp_path / "failed" / "x.h5"), feats, attrs, {"coords": coords})
  assert os.listdir(tmp_path / "failed") == []  # no file, whole or half, and no temporary


def test_bad_inputs_are_one_line(tmp_path, capsys):
  for argv in (["features", "--out", str(tmp_path)],
               ["features", "--config", DEMO, "--out", str(tmp_path), "--slides", SLIDE]):
    with pytest.raises(SystemExit) as e:
      cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jattn features: error:"), err


@pytest.mark.slow
def test_the_linear_probe_through_jattn_train(synthetic_tree, prepared_dir, tmp_path, capsys,
                                              monkeypatch):
  """A frozen ResNet-18 of the demo, augmentation off: its features are computed once per
  training image, the head fitted by the JAX solver and by scikit-learn; tables and a paired
  comparison read both; LogisticRegression fitted here on `jattn features`' file of the probe run
  (C chosen on a validation split cut here with scikit-learn) predicts the test images as the run
  does."""
  from jattn.training import features as compute_lib
  from jattn.training import probe

  seen = []
  compute = compute_lib.compute
  monkeypatch.setattr(probe.features, "compute",
                      lambda state, images, *a: seen.append(len(images)) or compute(
                          state, images, *a))
  sweep = tmp_path / "sweep"
  overrides = tiny_overrides(synthetic_tree[0], prepared_dir, **{
      "model.freeze": True, "augment.flip": "none", "augment.rotation": "none",
      "num_epochs": 3, "probe.c_values": "(0.01,0.1,1.0)"})
  for row, solver in (("probe_jax", "jax"), ("probe_lr", "logistic")):
    main.main(["--config", f"{DEMO}:resnet18", "--workdir", str(sweep / row / "fold1"),
               f"--config.probe.solver={solver}"] + [f"--config.{o}" for o in overrides])
  results = json.load(open(sweep / "probe_lr" / "fold1" / "results.json"))
  n_train = results["data"]["num_train_images"]
  assert seen == [n_train, n_train]  # once per training image, per run
  assert results["probe"]["solver"] == "logistic"
  assert "never the test split" in results["probe"]["chosen_on"]
  jax_results = json.load(open(sweep / "probe_jax" / "fold1" / "results.json"))
  assert jax_results["probe"]["solver"] == "jax" and jax_results["train"]["epochs"] == 3
  # The backbone stayed as initialised: only the head differs from a fresh initialisation.
  config, state = runs.restore(str(sweep / "probe_jax" / "fold1"))
  fresh = models.init_variables(models.build_model(config.model),
                                jax.random.split(jax.random.key(config.seed))[0],
                                config.image_size)
  for key in fresh["params"]:
    same = jax.tree.all(jax.tree.map(np.array_equal, fresh["params"][key], state.params[key]))
    assert same == (key != "fc"), key

  cli.main(["tables", str(sweep), "--compare", "probe_lr:probe_jax"])
  compared = open(sweep / "compare.md").read()
  assert "probe_lr − probe_jax" in compared and "wins" in compared

  out = str(tmp_path / "features")
  cli.main(["features", "--workdir", str(sweep / "probe_lr" / "fold1"), "--out", out])
  with _h5(os.path.join(out, "breakhis.h5")) as f:
    feats = f["features"][:].astype(np.float64)
    names = [n.decode() for n in f["names"][:]]
    split = np.array([s.decode() for s in f["split"][:]])
    labels, groups = f["labels"][:], np.array([g.decode() for g in f["groups"][:]])
    magnification = np.array([m.decode() for m in f["strata/magnification"][:]])
  train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
  # The validation split that chooses C, cut here: a fifth of the training patients.
  rest, held = next(StratifiedGroupKFold(5, shuffle=True, random_state=0).split(
      np.zeros(len(train)), labels[train], groups[train]))
  losses = {}
  for c in (0.01, 0.1, 1.0):
    scaler = StandardScaler().fit(feats[train[rest]])
    lr = LogisticRegression(C=c, max_iter=1000).fit(scaler.transform(feats[train[rest]]),
                                                    labels[train[rest]])
    p = lr.predict_proba(scaler.transform(feats[train[held]]))[:, 1]
    losses[c] = -np.mean(labels[train[held]] * np.log(p) + (1 - labels[train[held]])
                         * np.log(1 - p))
  for c, v in results["probe"]["validation_log_loss"].items():
    assert v == pytest.approx(losses[float(c)], rel=1e-4)
  best = min(losses, key=losses.get)
  assert results["probe"]["C"] == best
  scaler = StandardScaler().fit(feats[train])
  lr = LogisticRegression(C=best, max_iter=1000).fit(scaler.transform(feats[train]),
                                                     labels[train])
  ours = lr.predict(scaler.transform(feats[test]))
  with open(sweep / "probe_lr" / "fold1" / "predictions.csv") as f:
    rows = {r["file_name"]: r for r in csv.DictReader(f)}
  classes = results["classes"]
  theirs = np.array([classes.index(rows[names[i]]["prediction"]) for i in test])
  np.testing.assert_array_equal(ours, theirs)
  for m, value in results["image_accuracy"].items():
    at = magnification[test] == m
    assert np.mean(ours[at] == labels[test][at]) == pytest.approx(value)
