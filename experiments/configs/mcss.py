"""MCSS on the synthetic multi-view benchmark (issue 6).

Run (2-core CPU, minutes)::

    .venv/bin/python -m experiments.mcss --config experiments/configs/mcss.py:demo --workdir runs/mcss_demo

GPU / TPU::

    python -m experiments.mcss --config experiments/configs/mcss.py:full --workdir runs/mcss_full

``tiny`` is for tests (seconds). Any field can be overridden on the command
line, e.g. ``--config.train.steps=500 --config.train.multiview.kind=contrastive``.
"""

import ml_collections


def get_config(arg: str = "demo"):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.restart = False      # True: a workdir run with another config is moved aside, then rerun
    # --- data -------------------------------------------------------------------
    c.data = ml_collections.ConfigDict()
    c.data.root = ""                      # "" -> WORKDIR/data (synthetic, generated once)
    c.data.generate = True                # False: read an existing (e.g. Human3.6M) layout
    c.data.train_subjects = ("S1", "S5", "S6", "S7", "S8")
    c.data.test_subjects = ("S9", "S11")
    c.data.actions = ("Walking", "Waving", "Sitting", "Bending", "JumpingJacks", "Boxing")
    c.data.num_frames = 64
    c.data.num_views = 4
    c.data.image_size = (64, 64)
    c.data.noise_std = 0.02
    # Supervision levels (first = lowest): "frac:x" of instants, or subjects "S1".
    c.supervision_levels = ("frac:0.03", "frac:0.1", "S1")
    c.methods = ("mcss", "baseline")
    # --- model ------------------------------------------------------------------
    c.train = ml_collections.ConfigDict()
    t = c.train
    t.model = ml_collections.ConfigDict(dict(
        stage_sizes=(1, 1, 1, 1), widths=(32, 64, 128, 256), stem_width=32, norm="group",
        embed_dim=64, head_hidden=256, regressor_hidden=(256, 256), regress_from="features",
        embed_scale=8.0))
    # --- optimisation -----------------------------------------------------------
    t.steps = 600
    t.sup_batch = 32
    t.pose_loss = "mpjpe"                 # "mpjpe" | "l1" | "mse" (metres)
    t.pose_weight = 1.0
    t.augment = 0.2                       # colour jitter strength (0 = off)
    t.optim = ml_collections.ConfigDict(dict(lr=2e-3, warmup=50, weight_decay=1e-4, grad_clip=1.0,
                                             final_lr_fraction=0.05))
    t.multiview = ml_collections.ConfigDict(dict(
        kind="contrastive",               # "contrastive" | "triplet" (see DESIGN.md)
        weight=1.0, margin=0.2, temperature=0.1, squared=True, dt_min=8,
        cross_sequence=False, num_seqs=4, num_times=6, num_views=4))
    t.save_every = 200
    t.log_every = 50
    t.progress = False
    # --- evaluation -------------------------------------------------------------
    c.eval = ml_collections.ConfigDict(dict(
        query_view=0, ks=(1, 5, 10, 20), hit_threshold=50.0, random_embedding="untrained",
        baseline_embedding="features",    # "features" (pooled, what it learned) | "head"
        figure_rows=4))
    c.num_devices = 0                     # 0 = all
    c.compilation_cache = ""              # a folder for JAX's persistent compilation cache
    #                                       (one device only: with jax 0.10.2, cached
    #                                       multi-device CPU programs can deadlock)

    if arg == "demo":
        # 2 shared CPU cores: 32x32 crops (the 64x64 step is ~4x slower).
        c.data.image_size = (32, 32)
        t.multiview.num_times = 4
        t.model.update(widths=(16, 32, 64, 128), stem_width=16)
        t.steps = 800                     # the embedding leaves its collapsed start at ~250
    elif arg == "tiny":
        c.data.train_subjects = ("S1", "S5")
        c.data.test_subjects = ("S9",)
        c.data.actions = ("Walking", "Waving")
        c.data.num_frames = 16
        c.data.image_size = (32, 32)
        c.supervision_levels = ("frac:0.25", "S1")
        t.model.update(widths=(8, 8, 16, 16), stem_width=8, embed_dim=16, head_hidden=32,
                       regressor_hidden=(32,))
        t.steps = 4
        t.sup_batch = 8
        t.multiview.update(num_seqs=2, num_times=2, num_views=2, dt_min=4)
        t.save_every = 2
        t.log_every = 2
        t.optim.warmup = 1
        c.eval.ks = (1, 5)
    elif arg == "full":
        c.data.num_frames = 512
        c.data.num_views = 4
        c.data.image_size = (128, 128)
        c.supervision_levels = ("frac:0.01", "frac:0.03", "frac:0.1", "S1", "all")
        t.model.update(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_width=64,
                       embed_dim=128, head_hidden=512, regressor_hidden=(1024, 1024))
        t.steps = 20000
        t.sup_batch = 64
        t.multiview.update(num_seqs=16, num_times=8, num_views=4, dt_min=10)
        t.save_every = 1000
        t.log_every = 100
        t.progress = True
    else:
        raise ValueError(f"unknown config arg {arg!r}: demo | tiny | full")
    return c
