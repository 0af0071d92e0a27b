"""Every field of a jattn run, with its default. Variants import this and change a few fields.

This file alone is not a row of the paper: it is the paper's full model ("Ours") and its training
recipe (section 3), without data or weights filled in. Run a variant instead, e.g.

  python -m jattn.main --config configs/ours.py --config.fold=1

Any field can be overridden on the command line, e.g. --config.num_epochs=5
--config.model.dtype=bfloat16 --config.data.dir=/data/breakhis.
"""

import ml_collections

from jattn.data import sources


def get_config():
  config = ml_collections.ConfigDict()
  config.name = "default"  # run name: the sweep folder and the tables use it
  config.paper_row = "Ours"  # the row of the paper's Tables 1-2 this reproduces ('' for none)

  # --- Data (jattn.data) ---
  # config.data: the source (jattn/data/sources.py: 'breakhis', 'folder'
  # (a folder of images per class, or a manifest) or 'tfds:NAME' (a prepared TFDS data set, e.g.
  # tfds:colorectal_histology)), the fields every source reads (data.dir, data.prepared_dir,
  # data.folds, data.folds_seed, data.num_folds, data.skip_corrupt) and each source's own group with
  # its defaults: data.breakhis (download, magnifications, task, synthetic), data.folder (manifest,
  # classes, group, strata, mpp, positive_class), data.tfds. `python -m jattn.main --config X
  # --config.data.dir=DIR` points the run at its data.
  config.data = sources.default_config("breakhis")
  config.fold = 1  # which fold to train and test, 1..5 (BreakHis), 1..data.num_folds
  config.image_size = 224  # images are resized to image_size x image_size (aspect not kept)
  config.loader_threads = 2  # threads that assemble batches from the decoded-image cache
  # 'macenko': every image's stains normalised to a reference fitted on the fold's training
  # images (Macenko et al., 2009; jattn.data.stain), in training, evaluation and predict; 'none'.
  config.stain_norm = "none"

  # Augmentation, on the accelerator inside the jitted train step (jattn.data.augment).
  config.augment = ml_collections.ConfigDict()
  config.augment.flip = "horizontal_vertical"  # 'none', 'horizontal' or 'horizontal_vertical'
  config.augment.rotation = "right_angles"  # 'none', 'right_angles' or 'uniform'
  config.augment.max_angle = 180.0  # degrees; 'uniform' draws from [-max_angle, max_angle]
  # Colour jitter after the geometry; 0 is off (the paper). Each draws per image.
  config.augment.hed_scale = 0.0  # each H, E, DAB stain concentration times U(1 -/+ s); 0-0.5
  config.augment.hed_shift = 0.0  # ... plus U(-s, s), optical density units; 0-0.5
  config.augment.brightness = 0.0  # RGB times U(1 -/+ s); 0-0.5
  config.augment.contrast = 0.0  # distance from the image's mean grey times U(1 -/+ s); 0-0.5
  config.augment.saturation = 0.0  # distance from each pixel's grey times U(1 -/+ s); 0-1

  # --- Model (jattn.models) ---
  config.model = ml_collections.ConfigDict()
  # The backbone (jattn/models/__init__.py): 'vgg19' (the paper), 'resnet18', 'resnet50'
  # (torchvision's layouts; configs/resnet50*.py).
  config.model.name = "vgg19"
  config.model.num_classes = 2  # benign, malignant
  config.model.width = 1.0  # multiplies the conv widths: VGG19's 64-...-512, a ResNet's planes
  # VGG only:
  config.model.batch_norm = False  # True: torchvision's vgg19_bn backbone (the authors' code)
  config.model.classifier_width = 4096  # hidden units of the two fully connected layers
  config.model.pool_size = 7  # adaptive average pool to pool_size x pool_size before the classifier
  config.model.dropout_rate = 0.5  # dropout in the classifier, as torchvision
  config.model.c_attn_blocks = (1, 2)  # VGG blocks (1-5) followed by C-Attn (sec. 2.3: bottom)
  config.model.s_attn_blocks = (3, 4, 5)  # VGG blocks followed by S-Attn (sec. 2.3: top)
  # ResNet only: stages followed by C-Attn / S-Attn, 0 the stem, 1-4 torchvision's layer1-4 (by
  # resolution, as the paper's on VGG: 56x56 maps for C-Attn, 28 to 7 for S-Attn, at 224).
  config.model.c_attn_stages = (0, 1)
  config.model.s_attn_stages = (2, 3, 4)
  # ViT presets only (jattn/models/vit.py: 'dinov2_vits14_reg4', 'uni', 'virchow2', ...; see
  # docs/foundation-models.md): blocks followed by C-Attn / S-Attn on the patch-token grid, 1..depth
  # or negative from the end (-2: before the last block, which carries them to the class token).
  config.model.vit_c_attn_blocks = (-2,)
  config.model.vit_s_attn_blocks = (-2,)
  config.model.vit = ml_collections.ConfigDict()
  config.model.vit.depth = 0  # 0: the preset's; smaller ViTs for tests and demos
  config.model.vit.embed_dim = 0  # 0: the preset's
  config.model.vit.num_heads = 0  # 0: the preset's
  config.model.vit.pool = ""  # '': the preset's; 'token', 'avg' or 'token+avg' (Virchow's)
  # The preset's published weights: a local timm or Hugging Face state dict (.safetensors, .bin,
  # .pth); '' starts the ViT from scratch. jattn never downloads them (most are gated).
  config.model.weights = ""
  # Every backbone:
  # True: the backbone's pretrained parameters are not trained (the head and attention modules
  # are); with train_last_blocks=k (ViT presets), its last k blocks are trained too.
  config.model.freeze = False
  config.model.train_last_blocks = 0
  config.model.c_attn_kernel = 4  # kernel of the convs giving M_Q, M_K, eq. (1); code: 7
  config.model.c_attn_stride = 4  # their stride; code: 4
  config.model.c_attn_padding = 0  # their padding; code: 3
  config.model.s_attn_reduction = 8  # r in eq. (7): S_Q, S_K have C / r channels
  # Computation dtype: 'auto' is bfloat16 on GPU/TPU and float32 on CPU; 'float32', 'bfloat16'.
  # Parameters, optimiser state, attention logits and softmax stay float32 whatever it is.
  config.model.dtype = "auto"
  config.model.s_attn_impl = "auto"  # S-Attn: 'explicit' einsums, 'fused' (one attention op)
  # Batch norm's running variance tracks the unbiased batch variance (n / (n - 1) times the
  # biased one), as PyTorch's; False: the biased one, as Flax's (runs written before this field).
  config.model.bn_unbiased_running_var = True

  # A frozen backbone (config.model.freeze above) with augmentation off, no attention module and
  # nothing trainable before the pooled features computes each image's features once and trains
  # the head on them (jattn.training.probe, docs/features.md).
  # The linear probe of such a run: 'jax' (the head trained with this recipe: Adam, weight decay,
  # epochs) or 'logistic' (scikit-learn's LogisticRegression, C chosen from c_values on a
  # validation split of the training groups: the run's validation_fraction, else the fraction
  # below; never the test split).
  config.probe = ml_collections.ConfigDict()
  config.probe.solver = "jax"
  config.probe.c_values = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
  config.probe.validation_fraction = 0.2
  config.probe.max_iter = 1000

  # ImageNet weights for the backbone convs, converted by `python -m jattn.models.weights`
  # ('' trains from scratch, with a warning). The classifier and attention start from scratch.
  config.pretrained = "pretrained/vgg19"
  config.pretrained_scope = "backbone"  # 'backbone' (the paper) or 'all' (every matching weight)

  # --- Optimisation (sec. 3 and the authors' code) ---
  config.num_epochs = 130  # the authors trained 130 epochs
  config.batch_size = 8
  config.learning_rate = 5e-5  # Adam
  config.weight_decay = 1e-4  # L2 added to the gradient, as torch.optim.Adam(weight_decay=...)
  config.lr_decay_factor = 0.5  # step decay
  config.lr_decay_every = 30  # epochs between decays, when lr_milestones is empty
  config.lr_milestones = ()  # epochs at which to decay instead, e.g. (30, 60) as the code
  config.seed = 0  # initialisation, data order, augmentation and dropout

  # --- Evaluation ---
  config.eval_batch_size = 32  # the last test batch is padded and masked, never dropped
  config.tie_rule = "benign"  # patient vote tie: 'benign' (the authors' code) or 'malignant'
  config.tta = "none"  # test-time augmentation: 'none', or 'dihedral' (mean of 8 flips/turns)
  config.bootstrap_resamples = 1000  # patient bootstrap for the metrics' 95% CIs (0: none)
  config.bootstrap_seed = 0  # seed of that bootstrap
  # Temperature scaling (jattn.evaluation.calibration): the fraction of each fold's training
  # groups held out as a validation split (group-disjoint, stratified; drawn from config.seed) on
  # which one temperature is fitted after training. 0: no split, the paper's protocol.
  config.validation_fraction = 0.0
  config.calibration = ml_collections.ConfigDict()
  config.calibration.bins = 15  # equal-width (and equal-mass) bins of the ECE and the diagrams

  # --- Bookkeeping ---
  config.log_every_steps = 50  # metrics.jsonl, TensorBoard and the finite-loss check
  config.checkpoint_every_steps = 0  # extra checkpoints within an epoch (0: at epoch ends only)
  config.keep_checkpoints = 3  # most recent checkpoints kept

  # --- Parallelism (jattn.training.parallel): how a run is laid out, not what it computes ---
  config.parallel_folds = 1  # train folds fold..fold+K-1 in one program (--workdir with {fold})
  config.num_devices = 0  # devices the batch is sharded over (0: all, of every process)
  # Training steps handed to the devices at once, one lax.scan over that many batches (Keras'
  # steps_per_execution): fewer dispatches; cut to single steps at epoch ends and checkpoints.
  config.steps_per_dispatch = 1
  # Seconds the processes of a multi-process launch wait for each other before giving up in one
  # line (a process that never starts, a wrong address); the wait is jattn's, before JAX's own.
  config.coordinator_timeout_s = 300.0
  return config
