"""The few-shot experiment's typed config (:class:`FewShotConfig`) and NVSM's E-step
block (:class:`EStepConfig`, ``config.estep``). Like :mod:`nvsm_jax.settings`, this
module imports neither jax nor flax (a config file imports it)."""

from __future__ import annotations

import dataclasses

import numpy as np

from nvsm_jax.baselines.settings import ClassifierConfig
from nvsm_jax.nemo.settings import NemoConfig
from nvsm_jax.settings import Augment, DataclassConfig

__all__ = ["EStepConfig", "FewShotData", "FewShotConfig"]


@dataclasses.dataclass(frozen=True)
class EStepConfig(DataclassConfig):
    """The ``estep`` config block: the E-step's proposals, synthesis and acceptance.

    Proposals: ``azimuth_steps`` / ``elevation_steps`` offsets of ``azimuth_step`` /
    ``elevation_step`` radians around every source, elevations clipped to
    [``min_elevation``, ``max_elevation``]. Synthesis: a pixel is valid when
    ``min_weight`` of its face was seen; ``source_chunk`` sources per call.
    Acceptance: ``threshold`` / ``margin`` / ``margin_angle`` / ``max_new`` and the
    flip check and caps ``flip_margin`` / ``flip_window`` / ``max_per_source`` /
    ``max_per_sector`` (:class:`nvsm_jax.nvsm.pseudo_labels.Selection`), then
    ``agree_angle`` (> 0: the NeMo grid search must agree) and ``refine_steps``
    (> 0: refine accepted poses by render-and-compare, from the matched pose).
    The label-free safeguard (issue 9): ``agreement_rate`` > 0 runs the current
    model's own render-and-compare (the ``solver`` config) on the ``max_new``
    best-scoring candidates and accepts the longest score-ranked prefix in which
    at least that fraction of matches lies within ``agreement_angle`` of the
    solver's pose (prefixes shorter than ``agreement_min_count`` do not count);
    none -> the round accepts nothing and the run stops
    (:func:`nvsm_jax.nvsm.pseudo_labels.agreement_cut`).
    Sources: ``mirror_sources`` adds their mirror images; ``novel_views_only``
    drops a pseudo-labelled source's own pose.
    Which source vertices carry features into the synthesised views (issue 9):
    visibility from a render at ``H / source_render_stride`` (None: at the
    feature map's stride); ``min_view_cos`` drops grazing vertices (|n . v|
    below it); ``source_object="mask"`` keeps a labelled source's vertex only
    inside its object mask; ``pseudo_object="memory"`` keeps a pseudo-labelled
    source's vertex only where its feature is closer to the vertex's memory than
    to the clutter prototype. ``distance_scales``: the proposals' distances are
    the source's times each factor (the object's scale varies between images).
    """

    azimuth_step: float = float(np.radians(15.0))
    azimuth_steps: int = 2
    elevation_step: float = float(np.radians(10.0))
    elevation_steps: int = 1
    min_elevation: float = float(np.radians(-20.0))
    max_elevation: float = float(np.radians(60.0))
    min_weight: float = 0.5
    threshold: float = -1.0
    margin: float = -1.0
    margin_angle: float = float(np.pi / 6)
    max_new: int | None = 30
    source_chunk: int = 8
    agree_angle: float = 0.0
    refine_steps: int = 0
    agreement_rate: float = 0.0
    agreement_angle: float = float(np.pi / 6)
    agreement_min_count: int = 5
    mirror_sources: bool = True
    novel_views_only: bool = False
    source_render_stride: int | None = 2     # the training render's stride (issue 9)
    min_view_cos: float = 0.0
    source_object: str = "mask"
    pseudo_object: str = "none"
    distance_scales: tuple = (1.0,)
    flip_margin: float | None = None
    flip_window: float = float(np.radians(20.0))
    max_per_source: int | None = None
    max_per_sector: int | None = None

    def __post_init__(self):
        if self.source_object not in ("none", "mask"):
            raise ValueError(f"estep.source_object={self.source_object!r} "
                             "(expected 'none' or 'mask')")
        if self.pseudo_object not in ("none", "memory"):
            raise ValueError(f"estep.pseudo_object={self.pseudo_object!r} "
                             "(expected 'none' or 'memory')")
        if not 0.0 <= self.min_view_cos < 1.0:
            raise ValueError(f"estep.min_view_cos={self.min_view_cos} (expected in [0, 1))")
        if not 0.0 <= self.agreement_rate <= 1.0:
            raise ValueError(f"estep.agreement_rate={self.agreement_rate} (expected in [0, 1])")
        if self.agreement_rate > 0 and not self.max_new:
            raise ValueError("estep.agreement_rate > 0 needs estep.max_new (how many "
                             f"candidates the solver checks), got max_new={self.max_new}")
        if self.agreement_min_count < 1:
            raise ValueError(f"estep.agreement_min_count={self.agreement_min_count} "
                             "(expected >= 1)")

    @property
    def selection(self):
        """The acceptance rule: a :class:`nvsm_jax.nvsm.pseudo_labels.Selection`."""
        from nvsm_jax.nvsm import pseudo_labels     # (jax) only where a round selects

        return pseudo_labels.Selection(
            self.threshold, self.margin, self.margin_angle, self.max_new,
            flip_margin=self.flip_margin, flip_window=self.flip_window,
            max_per_source=self.max_per_source, max_per_sector=self.max_per_sector)


@dataclasses.dataclass(frozen=True)
class FewShotData(DataclassConfig):
    """The experiment's ``data`` block. generate: render the synthetic benchmark when
    ``data_root`` is missing; synthetic: the generator's settings (the ``synthetic``
    config; the fields below and ``categories`` / ``eval_occlusions`` override its
    counts, size, seed and levels); num_train / num_test images per category (per
    level); image_size (H, W); seed."""

    generate: bool = True
    synthetic: dict = dataclasses.field(default_factory=dict, hash=False)
    num_train: int = 1000
    num_test: int = 200
    image_size: tuple = (128, 128)
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class FewShotConfig(NemoConfig):
    """The few-shot experiment (``nvsm-fewshot --config=nvsm``): the classification
    baseline, NeMo on the labelled images, NVSM and NeMo on every label, per category
    and labelled count.

    NeMo's fields (:class:`nvsm_jax.nemo.settings.NemoConfig`) are the settings every
    NeMo and NVSM row trains with, so both train the same way; the experiment sets
    ``num_labelled`` and ``num_steps`` per row. Its own defaults: ``data_root`` /
    ``test_root`` "" (= ``<workdir>/data/train`` and ``/test``, generated), and an
    ``augment`` block with any hue and 20 % grey images (the 7 anchors' part colours
    must not become pose cues; WORKSPACE.md, NVSM).

    Rows: ``categories`` (comma-separated), ``annotations`` (each row's ``num_labelled``;
    the results' column keeps the published tables' name),
    ``methods`` (of ``cls_baseline``, ``nemo``, ``nvsm``, ``nemo_full``), ``data``
    (:class:`FewShotData`). NeMo rows: ``full_steps`` (nemo_full), ``fewshot_steps``
    (nemo and NVSM's round 0). NVSM: ``num_rounds`` after round 0 (``initial_steps``
    long) of ``steps_per_round`` each; the labelled rows repeated to at least
    ``labelled_min_fraction`` of each M-step's set; ``pretrain_steps`` > 0 (and no
    ``pretrain_workdir``): self-supervised pre-training on the pool first, batches of
    ``pretrain_batch``, shared by the rows; ``eval_every_round``; the E-step
    ``estep``; ``nvsm_oracle``: diagnosis rows that read the hidden poses, never the
    method ("none", "true_poses", "true_but_flips", "random_true";
    :data:`nvsm_jax.nvsm.pseudo_labels.ORACLES`). The classification baseline: ``cls``
    (:class:`nvsm_jax.baselines.settings.ClassifierConfig`). ``results_dir``: a
    tracked folder for each finished cell's small record ("" = none; ``nvsm-report
    --results DIR`` aggregates them).
    """

    data_root: str = ""
    test_root: str = ""
    num_labelled: int | None = 7
    augment: Augment | None = Augment(hue=1.0, grayscale_prob=0.2)
    categories: str = "car"
    annotations: tuple = (7,)
    methods: tuple = ("cls_baseline", "nemo", "nvsm", "nemo_full")
    data: FewShotData = dataclasses.field(default_factory=FewShotData)
    full_steps: int = 2000
    fewshot_steps: int = 600
    num_rounds: int = 6
    initial_steps: int = 600
    steps_per_round: int = 400
    labelled_min_fraction: float = 0.1
    pretrain_steps: int = 0
    pretrain_batch: int = 32
    eval_every_round: bool = True
    estep: EStepConfig = EStepConfig()
    nvsm_oracle: str = "none"
    cls: ClassifierConfig = ClassifierConfig(num_steps=600)
    results_dir: str = ""
