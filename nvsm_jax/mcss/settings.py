"""MCSS's typed config blocks: the training (``config.train``, :class:`MCSSTrainConfig`)
with its network (``train.model``), multi-view loss (``train.multiview``) and
bootstrapping (``train.multiview_pseudo``), and the evaluation (``config.eval``); the
optimiser (``train.optim``) is the shared :class:`nvsm_jax.settings.OptimConfig`. The
defaults are the ``mcss`` config's base values (before its variants). Like :mod:`nvsm_jax.settings`, this module imports
neither jax nor flax (a config file imports it)."""

from __future__ import annotations

import dataclasses

from nvsm_jax.settings import DataclassConfig, OptimConfig

__all__ = ["MCSSModelConfig", "MultiviewConfig", "MultiviewPseudoConfig", "EvalConfig",
           "MCSSTrainConfig"]


@dataclasses.dataclass(frozen=True)
class MCSSModelConfig(DataclassConfig):
    """The ``train.model`` block: the network (:class:`nvsm_jax.mcss.model.MCSSNet`,
    :func:`nvsm_jax.mcss.model.make_model`).

    encoder: "resnet" (from scratch; ``stage_sizes`` (1, 1, 1, 1) / ``widths`` (32, 64,
    128, 256) / ``stem_width`` 32) or "efficientnet_lite0" (``pretrained="imagenet"``
    puts in the ImageNet weights; its batch norm keeps the stored statistics:
    ``norm="frozen_batch"``); default "resnet". pretrained: "" (default) | "imagenet".
    frozen_stages: encoder stages 0 .. k-1 keep their weights (Lite: 0 stem, 1-7 MBConv
    stages, 8 head); 0. depthwise: the EfficientNet depthwise form "auto" | "shift" |
    "conv"; "auto". norm: "group" (default) | "batch" | "frozen_batch". tap: the stride
    of the encoder map pooled (4 / 8 / 16 / 32); 32. pool: "mean" (global average;
    default) or "flatten" (1x1 conv to ``reduce_dim`` (64) channels, then the map
    flattened). adapter_layers: 3x3 conv-GroupNorm-ReLU layers (``reduce_dim`` wide)
    between the tap and the pool; 0 = none (MCSSNet's default). embed_dim / head_hidden:
    the unit embedding's size and its head's hidden width; 64 / 256. regressor_hidden:
    the pose regressor's hidden widths; (256, 256). regress_from: the regressor reads
    the pooled "features" (default) or the "embedding" (times ``embed_scale``, 8.0).
    """

    encoder: str = "resnet"
    pretrained: str = ""
    frozen_stages: int = 0
    depthwise: str = "auto"
    stage_sizes: tuple[int, ...] = (1, 1, 1, 1)
    widths: tuple[int, ...] = (32, 64, 128, 256)
    stem_width: int = 32
    norm: str = "group"
    tap: int = 32
    pool: str = "mean"
    reduce_dim: int = 64
    adapter_layers: int = 0
    embed_dim: int = 64
    head_hidden: int = 256
    regressor_hidden: tuple[int, ...] = (256, 256)
    regress_from: str = "features"
    embed_scale: float = 8.0


@dataclasses.dataclass(frozen=True)
class MultiviewConfig(DataclassConfig):
    """The ``train.multiview`` block: the multi-view consistency loss
    (:func:`nvsm_jax.mcss.losses.multiview_loss`) and its batch
    (:func:`nvsm_jax.mcss.train.sample_multiview_batch`).

    kind: "contrastive" (default) | "triplet" (see DESIGN.md). weight: of the loss in
    the total; 1.0. margin: the triplet hinge's; 0.2. temperature: the contrastive
    logits'; 0.1. squared: the triplet's distances squared; True. dt_min: frames of one
    sequence at least this far apart in time are negatives (any view); 8.
    cross_sequence: other sequences' frames are negatives too; False. num_seqs x
    num_times x num_views: the batch's sequences, distinct instants per sequence and
    views per instant; 4 x 6 x 4.
    pose_consistency: > 0, also the predicted poses of one instant's views must agree
    up to a rotation (their joint-distance matrices,
    :func:`nvsm_jax.mcss.losses.pose_consistency_loss`), with this weight; 0.0 = off.
    """

    kind: str = "contrastive"
    weight: float = 1.0
    margin: float = 0.2
    temperature: float = 0.1
    squared: bool = True
    dt_min: int = 8
    cross_sequence: bool = False
    num_seqs: int = 4
    num_times: int = 6
    num_views: int = 4
    pose_consistency: float = 0.0


@dataclasses.dataclass(frozen=True)
class MultiviewPseudoConfig(DataclassConfig):
    """The ``train.multiview_pseudo`` block: multi-view bootstrapping (MCSS only;
    :mod:`nvsm_jax.mcss.fusion`). After training, every unlabelled frame gets the pose
    fused from its instant's views (cameras rotated onto each other from the labelled
    instants or the predictions), and the network is trained again, from its initial
    weights, on labelled + pseudo-labelled frames.

    rounds: how many times; 0 = off (default). fuse: "median" (default) | "mean" over
    the views.
    """

    rounds: int = 0
    fuse: str = "median"


@dataclasses.dataclass(frozen=True)
class EvalConfig(DataclassConfig):
    """The ``eval`` block: the evaluation (:mod:`nvsm_jax.mcss.experiment`,
    :mod:`nvsm_jax.mcss.retrieval`).

    query_view: the camera whose frames are the retrieval queries (the gallery: the
    other cameras); 0. ks: the top-k of the retrieval scores; (1, 5, 10, 20) (the first
    is the headline's). hit_threshold: Hit@k is the fraction of queries with a top-k
    neighbour under this PA-MPJPE (mm); 50.0. random_embedding: the untrained row's
    retrieval from the untrained network's embedding, "untrained" (default), or from
    "gaussian" vectors.
    baseline_embedding: the baseline's retrieval from its "features" (pooled, what it
    learned; default) or its (untrained) embedding "head". figure_rows: queries in
    ``retrieval.png``; 4.
    """

    query_view: int = 0
    ks: tuple[int, ...] = (1, 5, 10, 20)
    hit_threshold: float = 50.0
    random_embedding: str = "untrained"
    baseline_embedding: str = "features"
    figure_rows: int = 4


@dataclasses.dataclass(frozen=True)
class MCSSTrainConfig(DataclassConfig):
    """The ``train`` block: one network's training (:func:`nvsm_jax.mcss.train.train`),
    built once per seed by the experiment and passed to each of its runs.

    model / optim / multiview / multiview_pseudo: the blocks above (the optimiser is the
    shared :class:`nvsm_jax.settings.OptimConfig`: Adam, torch-style L2, lr 2e-3, 50
    warm-up steps, then cosine to 5 %; the global norm clipped at 1). steps: of
    ``sup_batch`` labelled frames (600 / 32) plus, for MCSS, the multi-view batch.
    pose_loss: "mpjpe" (default) | "l1" | "mse" (metres), weighted ``pose_weight`` (1).
    augment: colour jitter strength (0.2; 0 = off). cache_features: "auto" (default:
    when the encoder is frozen up to the tap, its maps are computed once and training
    runs from the tap on, without colour jitter) | "on" | "off". cache_copies: with the
    cache and ``augment > 0``, the maps of the images as they are plus
    ``cache_copies - 1`` colour-jittered copies, computed once; each frame of a batch
    reads one at random (1 = the plain maps only). save_every / log_every: checkpoints
    and metrics (200 / 50 steps). progress: a progress bar (False).
    """

    model: MCSSModelConfig = MCSSModelConfig()
    steps: int = 600
    sup_batch: int = 32
    pose_loss: str = "mpjpe"
    pose_weight: float = 1.0
    augment: float = 0.2
    cache_features: str = "auto"
    cache_copies: int = 1
    optim: OptimConfig = OptimConfig(lr=2e-3, weight_decay=1e-4, warmup_steps=50,
                                     final_lr_fraction=0.05, grad_clip=1.0)
    multiview: MultiviewConfig = MultiviewConfig()
    multiview_pseudo: MultiviewPseudoConfig = MultiviewPseudoConfig()
    save_every: int = 200
    log_every: int = 50
    progress: bool = False
