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

from nvsm_jax.nemo.settings import NemoConfig


def get_config(arg: str = "default") -> ml_collections.ConfigDict:
    arg = arg or "default"
    if arg not in ("default", "tiny"):
        raise ValueError(f"config arg must be 'default' or 'tiny', got {arg!r}")
    # every field, its default and its meaning: nvsm_jax.nemo.settings.NemoConfig (the
    # blocks: nvsm_jax.settings.ModelConfig / OptimConfig / Augment, nemo.settings'
    # LossConfig / SolverConfig). Among them: EfficientNet-Lite0 from ImageNet, stride 8,
    # 128-d features; Adam (torch-style L2) at lr 1e-3 (NeMo: 1e-4 for 800 epochs; short
    # runs need more), warm-up + cosine; the CoKe CE over 128 sampled visible vertices;
    # the solver's 144-pose grid and 60 refinement steps (NeMo: 300).
    c = NemoConfig().to_config_block()
    if arg == "tiny":
        make_tiny(c)
    return c


def make_tiny(c: ml_collections.ConfigDict) -> None:
    """The tiny variant's NeMo fields (also the few-shot experiment's ``tiny``)."""
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
