"""NeMo's typed config: :class:`NemoConfig`, every setting of a NeMo run, with its
blocks: the CoKe loss (``loss``), the pose solver (``solver``) and the shared
backbone, optimiser and augmentation blocks of :mod:`nvsm_jax.settings`.

The ``nemo`` config file is ``NemoConfig()`` written out; the trainer builds one
from a config once (:meth:`NemoConfig.of`) and passes it on. Like
:mod:`nvsm_jax.settings`, this module imports neither jax nor flax."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from nvsm_jax.settings import (Augment, DataclassConfig, ModelConfig, OptimConfig, flatten,
                               unflatten, upgrade_record)

__all__ = ["LossConfig", "SolverConfig", "REFERENCE", "FAST", "NemoConfig"]


@dataclasses.dataclass(frozen=True)
class LossConfig(DataclassConfig):
    """The ``loss`` block: CoKe's contrastive loss and its memories
    (:func:`nvsm_jax.nemo.losses.coke_loss`, :mod:`nvsm_jax.nemo.features`).

    temperature: of the logits. neighbor_radius_px: vertices projecting within it of
    a vertex are not its negatives; NeMo's 48 px on its 672-px-wide car crops, scaled
    by ``W / neighbor_reference_width`` (9.1 px at 128). clutter_weight: the clutter
    logits get ``+ log(clutter_weight)``. reg_weight: ``reg_weight * mean(clutter .
    vertex memory)``. momentum: of the vertex memory. clutter_per_image /
    clutter_size: background features each image adds to the clutter ring, and the
    ring's size. vertices_per_image: the cross-entropy is averaged over this many
    visible vertices sampled per image (None = all, NeMo's choice; 128 made the step
    3.3x faster, and the loss equals the full one when the sample covers every vertex;
    WORKSPACE.md). Every vertex and clutter row stays a negative.
    """

    temperature: float = 0.07
    neighbor_radius_px: float = 48.0
    neighbor_reference_width: int = 672
    clutter_weight: float = 0.005
    reg_weight: float = 0.1
    momentum: float = 0.9
    clutter_per_image: int = 5
    clutter_size: int = 2560
    vertices_per_image: int | None = 128

    def neighbor_radius(self, image_width: int) -> float:
        """NeMo's neighbour radius scaled from its image width to ``image_width``."""
        return float(self.neighbor_radius_px) * image_width / float(self.neighbor_reference_width)


@dataclasses.dataclass(frozen=True)
class SolverConfig(DataclassConfig):
    """The ``solver`` block: search + refinement settings (defaults: NeMo's, facts file).

    num_azimuth/elevations/thetas/distance: the initial grid (12 x 4 x 3 = 144;
    ``distance`` is :data:`nvsm_jax.geometry.NEMO_DISTANCE`). top_k: grid hypotheses
    refined per image. steps/lr/b1/b2: Adam refinement; the lr is multiplied by
    ``decay_factor`` every ``decay_every`` steps. refine_distance: whether the
    distance is optimised too. cull_backfaces: skip faces turned away from the camera
    in every render; exact for closed meshes seen from outside (the NeMo cuboid), off
    by default (an open mesh would lose its inside faces). Speed gain at 16 x 16
    within noise (WORKSPACE).
    """

    num_azimuth: int = 12
    elevations: Sequence[float] = tuple(np.linspace(-np.pi / 6, np.pi / 3, 4).tolist())
    thetas: Sequence[float] = tuple(np.linspace(-np.pi / 6, np.pi / 6, 3).tolist())
    distance: float = 5.0
    top_k: int = 1
    steps: int = 300
    lr: float = 0.05
    b1: float = 0.4
    b2: float = 0.6
    decay_every: int = 100
    decay_factor: float = 0.2
    refine_distance: bool = True
    cull_backfaces: bool = False

    def __post_init__(self):
        for k in ("elevations", "thetas"):      # hashable, and floats as a JSON file reads back
            v = getattr(self, k)
            if v is not None and not (isinstance(v, tuple) and all(type(x) is float for x in v)):
                object.__setattr__(self, k, tuple(float(x) for x in v))

    def grid(self) -> np.ndarray:
        """The initial grid's poses [P, 4] (:func:`nvsm_jax.geometry.nemo_pose_grid`)."""
        from nvsm_jax import geometry       # (jax) only where a grid is built

        return geometry.nemo_pose_grid(self.num_azimuth, self.elevations, self.thetas,
                                       self.distance)


REFERENCE = SolverConfig()
# tuned for speed (benchmarks/pose_solver.py): a fifth of the steps, faster decay
FAST = SolverConfig(steps=60, lr=0.05, decay_every=25, top_k=1)


@dataclasses.dataclass(frozen=True)
class NemoConfig(DataclassConfig):
    """Every setting of a NeMo run (``nvsm-train-nemo --config=nemo``).

    Data: ``data_root`` / ``test_root`` (the synthetic benchmark's defaults, relative
    to the current folder), ``category``; ``num_labelled`` labelled images chosen by
    ``anchor_rule`` (:mod:`nvsm_jax.data.fewshot`; None = every label); ``seed``.
    Run: ``restart`` (True: a workdir run with another config is moved aside, to
    ``replaced-<time>/``, and the run starts over); ``num_devices`` of the data axis
    (None = all). Training: ``num_steps`` of ``batch_size`` images, metrics every
    ``log_every``, a checkpoint every ``checkpoint_every`` (``keep_checkpoints``
    kept), ``render_stride`` (the visibility render at H / render_stride; None = the
    feature stride), ``pretrain_workdir`` (a :mod:`nvsm_jax.baselines.pretrain`
    workdir to start the backbone from; "" = none). Evaluation: ``eval_at_end`` on
    ``test_root``'s ``eval_occlusions`` levels, ``eval_batch_size`` images a call,
    at most ``eval_limit`` images a level (None = all). Blocks: ``model``,
    ``optim``, ``loss``, ``augment``, ``solver`` (:data:`FAST`: NeMo's grid, 60
    refinement steps instead of 300).
    """

    data_root: str = "data/synthetic/train"
    test_root: str = "data/synthetic/test"
    category: str = "car"
    num_labelled: int | None = None
    anchor_rule: str = "azimuth_ring"
    seed: int = 0
    restart: bool = False
    num_devices: int | None = None
    model: ModelConfig = ModelConfig()
    render_stride: int | None = 2
    pretrain_workdir: str = ""
    num_steps: int = 2000
    batch_size: int = 16
    log_every: int = 20
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_at_end: bool = False
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    augment: Augment | None = Augment()     # None: no augmentation
    solver: SolverConfig = FAST
    eval_batch_size: int = 16
    eval_occlusions: tuple = ("L0", "L1", "L2", "L3")
    eval_limit: int | None = None

    @classmethod
    def of(cls, config, *, recorded: bool = False) -> "NemoConfig":
        """The NeMo settings of ``config``: a NemoConfig as it is, else built from a
        config (a NeMo one, or a few-shot experiment's, whose fields beyond NeMo's are
        the experiment's own and are left out). A field the config lacks keeps its
        default. A block's unknown key is a ConfigError naming it, except in a
        ``recorded`` config (a run's ``config.json``): there an earlier version's names
        are read as today's (:func:`nvsm_jax.settings.upgrade_record`) and a key this
        code does not know is dropped. A NemoConfig is returned as it is; a subclass
        (the few-shot experiment's) as its NeMo fields."""
        if type(config) is cls:
            return config
        if isinstance(config, NemoConfig):
            return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})
        d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if recorded:
            return cls.from_dict(unflatten(upgrade_record(flatten(d))))
        return cls.from_config(d)
