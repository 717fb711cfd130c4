"""NVSM few-shot experiment: baselines, NeMo, NVSM and fully supervised NeMo.

Run (the demo generates its own synthetic data under the workdir if missing)::

    nvsm-fewshot --config=nvsm:demo --workdir runs/nvsm_demo
    nvsm-fewshot --config=nvsm:paper --workdir runs/nvsm_paper

Variants (``get_config(arg)``):
    "demo":  car, 7 annotations, L0-L3 test sets; fits the 2-core CPU machine.
    "paper": 12 categories x {7, 20, 50} annotations, all occlusion levels; meant for
             a GPU/TPU, resumable on CPU (every method and round checkpoints).
    "tiny":  a smoke run that only exercises the code (about 2.5 min on 2 CPU cores;
             its accuracies are meaningless, 0 % is expected).
Every field, its default and its meaning: ``nvsm_jax.nvsm.settings.FewShotConfig``;
its NeMo/CoKe settings (model, loss, optimiser, solver) are ``NemoConfig``'s, so NeMo
and NVSM train the same way. ``nvsm-report --results DIR`` aggregates
the cells recorded with ``--config.results_dir=DIR``.
"""

import ml_collections
import numpy as np

from nvsm_jax.nvsm.settings import FewShotConfig

from . import nemo, synthetic  # relative: works under both package names


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
    arg = arg or "demo"
    if arg not in ("demo", "paper", "tiny"):
        raise ValueError(f"config arg must be 'demo', 'paper' or 'tiny', got {arg!r}")
    # every field, its default and its meaning: nvsm_jax.nvsm.settings.FewShotConfig (NeMo's
    # fields, nvsm_jax.nemo.settings.NemoConfig, are the ones every NeMo and NVSM row
    # trains with); set here only what differs
    c = FewShotConfig().to_config_block()
    if arg == "tiny":
        nemo.make_tiny(c)                # the tiny NeMo model and solver
    # the generator's settings; data.num_train / num_test / image_size / seed and
    # config.categories / eval_occlusions override its counts, size, seed and levels
    c.data.synthetic = synthetic.get_config("tiny" if arg == "tiny" else "default")
    c.initial_steps = c.get_ref("fewshot_steps")

    # the E-step: EStepConfig's defaults (offsets of 15 deg x +-2 in azimuth and 10 deg x
    # +-1 in elevation around each source; no threshold or margin; mirrored sources; no
    # solver agreement, estep.agreement_rate = 0: the label-free safeguard of issue 9 is
    # off; no flip check, estep.flip_margin = None), then the experiment's caps of issue
    # 28 per source (a source and its mirror count as one) and per 30-deg azimuth sector
    # of the matched pose, and the refinement of accepted poses
    # (at the demo's scale, on validation data: caps and 30 refinement steps took sofa from
    # 21 points below NeMo-7 to 16 above; accepting 50 a round instead of 15, half the pool
    # after 4 rounds, then to +28.5, car from +6 to +21; WORKSPACE.md, issue 28. The 128 px
    # values keep the demo's share: about half the pool labelled after the last round, caps
    # scaled with max_new; not measured)
    c.estep.max_new = 85                 # a 993-image pool, 6 rounds
    c.estep.max_per_source = 14
    c.estep.max_per_sector = 9
    c.estep.refine_steps = 30            # accepted poses refined by render-and-compare
    # (nvsm_oracle: diagnosis rows, never the method, they read the hidden poses, issue 28:
    # "true_poses" = the accepted images at their true poses, "true_but_flips" = the same
    # but matches off by > 150 deg keep their wrong pose, "random_true" = as many images per
    # round drawn uniformly from the pool at their true poses)

    # ---- the classification baseline (Res50-Gene row): its encoder, learning rate, weight
    # decay, augmentation, batch and seed are the NeMo rows' (references:
    # --config.model.backbone=... changes both); its own warm-up (100) and cosine floor
    for key in ("backbone", "norm", "encoder_norm", "depthwise", "pretrained", "frozen_stages"):
        c.cls.model[key] = c.model.get_ref(key)
    for key in ("lr", "weight_decay"):
        c.cls.optim[key] = c.optim.get_ref(key)
    for key in ("flip_prob", "jitter", "hue", "grayscale_prob"):
        c.cls.augment[key] = c.augment.get_ref(key)
    for key in ("seed", "batch_size", "log_every", "keep_checkpoints"):
        c.cls[key] = c.get_ref(key)
    c.cls.checkpoint_every = c.cls.get_ref("num_steps")    # one checkpoint, at the end

    if arg == "demo":
        c.data.num_train = 400
        c.data.num_test = 60
        c.data.image_size = (64, 64)
        c.model.stride = 4
        c.model.feature_dim = 64
        c.batch_size = 16
        c.full_steps = 400
        c.fewshot_steps = 200
        c.steps_per_round = 120
        c.num_rounds = 4
        c.cls.num_steps = 200
        c.estep.max_new = 50             # a 393-image pool: 200 labelled after 4 rounds
        c.estep.max_per_source = 8       # chosen on validation data (issue 28)
        c.estep.max_per_sector = 5
        c.loss.clutter_size = 512
        c.solver.steps = 30
        c.solver.decay_every = 12
        c.eval_every_round = False
    elif arg == "paper":
        c.categories = ",".join(["aeroplane", "bicycle", "boat", "bottle", "bus", "car", "chair",
                                 "diningtable", "motorbike", "sofa", "train", "tvmonitor"])
        c.annotations = (7, 20, 50)
    elif arg == "tiny":
        c.data.num_train = 24
        c.data.num_test = 4
        c.data.image_size = (32, 32)
        c.model.stride = 4
        c.batch_size = 8
        c.full_steps = 2
        c.fewshot_steps = 2
        c.steps_per_round = 2
        c.num_rounds = 2
        c.cls.num_steps = 2
        c.estep.threshold = -1.0         # accept anything: exercises every path
        c.estep.margin = -1.0
        c.estep.max_new = 4
        c.estep.agree_angle = float(np.pi)  # the solver check runs but never rejects
        c.estep.agreement_rate = 1.0         # the safeguard runs and, at pi, accepts all
        c.estep.agreement_angle = float(np.pi)
        c.estep.azimuth_steps = 1
        c.estep.elevation_steps = 0
        c.estep.source_chunk = 4
        c.estep.max_per_source = 4       # the caps' path runs; with max_new 4 they never bind
        c.estep.max_per_sector = 4
        c.estep.refine_steps = 2
        c.eval_every_round = True
        c.eval_batch_size = 8
    return c
