"""NeMo training: a feature net + vertex/clutter memory trained with the CoKe loss.

``train_and_evaluate(config, workdir)`` (importable from a notebook; the CLI is
``nvsm-train-nemo --config=nemo --workdir W``):

1. loads the category's labelled images (all, or ``num_labelled`` of them via
   :func:`nvsm_jax.data.fewshot.make_fewshot_split`) and its model mesh;
2. builds a :class:`nvsm_jax.training.TrainState` whose ``aux`` is the
   :class:`nvsm_jax.nemo.features.MemoryBank`, replicated on a Mesh with a ``data``
   axis; batches are sharded over it;
3. runs the jitted, donated train step, saving orbax checkpoints every
   ``checkpoint_every`` steps and at the end (a killed run resumes exactly:
   batches and keys are pure functions of ``(seed, step)``), metrics as JSON lines
   (``metrics.jsonl``), the config as ``config.json``;
4. optionally evaluates on the test root
   (:func:`nvsm_jax.nemo.evaluate.evaluate_workdir`; the CLI ``nvsm-evaluate`` does
   the same from a workdir).

One train step: features = FeatureNet(images); vertex features read at the
projected mesh vertices (visibility from the rasteriser); CoKe loss against the
memory (stop-gradient); Adam update; momentum update of the vertex memory with
``visibility * |n . v|`` weights; 5 background features per image enter the
clutter ring.
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvsm_jax import evaluation, geometry, meshes, parallel, training
from nvsm_jax.baselines import pretrain
from nvsm_jax.data import fewshot, loaders, pipeline
from nvsm_jax.errors import ConfigError, RunStateError
from nvsm_jax.models import backbone, weights
from nvsm_jax.nemo import config_checks as nemo_checks
from nvsm_jax.nemo import features as feat
from nvsm_jax.nemo import losses, pose_solver
from nvsm_jax.nemo.settings import NemoConfig
from nvsm_jax.settings import ModelConfig
from nvsm_jax.workdir_lock import locked

log = logging.getLogger(__name__)

__all__ = ["build_model", "labelled_images", "load_train_set",
           "init_state", "make_loss_fn", "make_train_step",
           "train_and_evaluate", "NemoModel", "load_model", "feature_fn", "predict",
           "nemo_model", "evaluate_nemo", "holds_work"]


def build_model(model: ModelConfig) -> backbone.FeatureNet:
    """The feature net of a ``model`` block."""
    return backbone.make_feature_net(model.backbone, stride=model.stride,
                                     feature_dim=model.feature_dim, norm=model.norm,
                                     encoder_norm=model.encoder_norm, depthwise=model.depthwise)


def labelled_images(config, pool):
    """The images NeMo trains on: all of ``pool``, or its ``config.num_labelled``
    few-shot anchors (the same split as every other method of the experiment)."""

    if config.num_labelled:
        return fewshot.split_from_config(pool, int(config.num_labelled), config).labelled
    return pool


def load_train_set(config):
    """(PoseSet of the labelled training images, Mesh) from ``config.data_root``.

    A missing root raises DataError naming it and the command that makes one."""

    if not config.data_root or not os.path.isdir(config.data_root):
        raise loaders.DataError(
            f"training root {config.data_root!r} not found (config.data_root, from "
            f"{os.getcwd()!r}); make one with `nvsm-make-synthetic --out data/synthetic` "
            "(the default data/synthetic/train) or pass --config.data_root=DIR")
    # several processes: each reads an image only when one of its batch rows needs it
    train = loaders.load_pose_set(config.data_root, config.category, "L0",
                                  lazy_images=jax.process_count() > 1)
    object_mesh = loaders.load_model_mesh(config.data_root, config.category, pose_set=train)
    return labelled_images(config, train), object_mesh


def _optimizer(config: NemoConfig):
    """``(tx, schedule)``: the ``optim`` block over ``num_steps``, the frozen encoder
    stages kept (:func:`nvsm_jax.training.make_optimizer`)."""
    return training.make_optimizer(
        config.optim, config.num_steps,
        frozen=backbone.frozen_encoder_filter(config.model.backbone, config.model.frozen_stages))


def init_state(config: NemoConfig, model, num_verts: int, image_hw, mesh, *,
               pretrained: bool = True) -> training.TrainState:
    """TrainState (params, Adam, batch_stats if any, MemoryBank) replicated on ``mesh``.

    With ``pretrained``, the encoder starts from ``config.model.pretrained``
    (``"imagenet"``: :func:`nvsm_jax.models.weights.pretrained_encoder`) and, with
    ``config.pretrain_workdir`` set, the backbone from that self-supervised run's
    weights (:mod:`nvsm_jax.baselines.pretrain`); restoring a checkpoint afterwards
    overrides them as usual.
    """
    config = NemoConfig.of(config)
    tx, _ = _optimizer(config)
    clutter_size = config.loss.clutter_size
    init = training.state_initializer(
        model, tx, (1, *image_hw, 3),
        aux_fn=lambda k: feat.init_memory(k, num_verts, model.feature_dim, clutter_size))
    # the initialiser closes over the model, the optimiser (config.optim and the
    # schedule's horizon, the frozen stages) and the memory's shape: its cache key
    optim_key = (config.optim, config.num_steps, config.model.frozen_stages)
    log.info("initialising the model (compiling its initialiser on first use)")
    with training.heartbeat("initialising the model"):
        state = training.create_replicated(
            init, jax.random.key(config.seed), mesh,
            cache_key=("nemo", model, tuple(image_hw), num_verts, clutter_size, optim_key))
    encoder = (weights.pretrained_encoder(model.encoder, config.model.pretrained)
               if pretrained else None)
    if encoder is not None:
        state = training.replace_weights(state, *encoder, subtree="encoder")
    if pretrained and config.pretrain_workdir:
        state = pretrain.apply_pretrained(state,
                                          pretrain.load_pretrained_params(config.pretrain_workdir))
    return state


_TRAIN_STEPS: dict = {}


def make_train_step(config: NemoConfig, model, object_mesh: meshes.Mesh, image_hw,
                    state_sharding, mesh):
    """The jitted, donated step ``(state, batch, key) -> (state, metrics)``.

    Kept per (config, model, mesh geometry, image size, state layout, device mesh):
    a resumed run, or a second run of the same config in one process (tests, the
    few-shot experiment's cells), reuses the compiled step instead of compiling it again.
    """
    config = NemoConfig.of(config)
    key = (config, model, np.asarray(object_mesh.verts).tobytes(),
           np.asarray(object_mesh.faces).tobytes(), tuple(image_hw),
           tuple(jax.tree_util.keystr(k) for k, _ in
                 jax.tree_util.tree_flatten_with_path(state_sharding)[0]), mesh)
    cached = _TRAIN_STEPS.get(key)
    if cached is None:
        if len(_TRAIN_STEPS) >= 16:
            _TRAIN_STEPS.pop(next(iter(_TRAIN_STEPS)))
        cached = _TRAIN_STEPS[key] = _make_train_step(config, model, object_mesh, image_hw,
                                                      state_sharding, mesh)
    return cached


def make_loss_fn(config: NemoConfig, model, object_mesh: meshes.Mesh, image_hw):
    """The train step's forward: ``loss_fn(params, state, batch, key) -> (total, aux)``.

    ``aux`` = ``(CokeLoss, normalised vertex features, VertexFeatures, sampled
    clutter, new model state)``; :func:`make_train_step` differentiates it, and
    ``benchmarks.train`` times it alone (the step's forward pass).
    """
    verts = jnp.asarray(object_mesh.verts, jnp.float32)
    faces = jnp.asarray(object_mesh.faces, jnp.int32)
    normals = jnp.asarray(meshes.vertex_normals(object_mesh.verts, object_mesh.faces))
    config = NemoConfig.of(config)
    lc = config.loss
    coke = losses.CokeWeights(lc.temperature, lc.neighbor_radius(image_hw[1]),
                             lc.clutter_weight, lc.reg_weight)
    stride = config.model.stride
    render_stride = config.render_stride or stride
    frozen = backbone.frozen_encoder_filter(config.model.backbone,
                                            config.model.frozen_stages)

    def loss_fn(params, state: training.TrainState, batch, key):
        images = backbone.preprocess(batch["image"])
        memory: feat.MemoryBank = state.aux
        # no backward through the frozen stages
        fmap, new_model_state = state.apply_train(params, images, is_frozen=frozen)
        vf = feat.vertex_features(fmap, verts, faces, normals, batch["pose"], batch["focal"],
                                  batch["principal"], stride=stride,
                                  render_stride=render_stride)
        fv = feat.l2_normalize(vf.features)
        k_clutter, k_vertex = jax.random.split(key)
        clutter = feat.sample_clutter(k_clutter, fmap, vf.silhouette, lc.clutter_per_image)
        vertex_ids = None
        if lc.vertices_per_image:
            vertex_ids = losses.sample_vertices(k_vertex, vf.visible,
                                                min(int(lc.vertices_per_image), verts.shape[0]))
        loss = losses.coke_loss(fv, vf.visible, vf.xy, memory.vertex, memory.clutter,
                                clutter, vertex_ids=vertex_ids, weights=coke)
        return loss.total, (loss, fv, vf, clutter, new_model_state)

    return loss_fn


def _make_train_step(config: NemoConfig, model, object_mesh: meshes.Mesh, image_hw,
                     state_sharding, mesh):
    lc = config.loss
    _, schedule = _optimizer(config)
    loss_fn = make_loss_fn(config, model, object_mesh, image_hw)

    def step(state: training.TrainState, batch, key):
        memory: feat.MemoryBank = state.aux
        (_, (loss, fv, vf, clutter, new_ms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params, state, batch, key)
        state = state.apply_gradients(grads=grads)
        vertex = feat.update_vertex_memory(memory.vertex, jax.lax.stop_gradient(fv),
                                           vf.weights, lc.momentum)
        memory = feat.enqueue_clutter(memory._replace(vertex=vertex),
                                      jax.lax.stop_gradient(clutter))
        state = state.replace(aux=memory, model_state=new_ms)
        metrics = {"loss": loss.total, "contrastive": loss.contrastive, "reg": loss.reg,
                   "visible_frac": jnp.mean(vf.visible.astype(jnp.float32)),
                   "grad_norm": optax.global_norm(grads), "lr": schedule(state.step - 1)}
        return state, metrics

    return jax.jit(step, donate_argnums=0,
                   out_shardings=(state_sharding, parallel.replicated(mesh)))


# files that mean a run did work: a finished cell, NVSM round, evaluation, pre-training
_WORK_FILES = ("rows.json", "progress.json", "results.json", pretrain.PARAMS_FILE)


def holds_work(workdir) -> bool:
    """Whether ``workdir``, or a run folder inside it (a few-shot cell), holds a
    checkpoint or a finished result (:data:`_WORK_FILES`). Generated ``data/`` and
    runs moved aside (``replaced-*``) do not count. A workdir without any was left
    by a run that failed before its first checkpoint: its config may change
    (:func:`nvsm_jax.training.save_config`'s ``has_work``)."""
    for root, dirs, files in os.walk(os.fspath(workdir)):
        if os.path.basename(root) == "checkpoints" and (dirs or files):
            return True
        if any(name in _WORK_FILES for name in files):
            return True
        dirs[:] = [d for d in dirs if d != "data" and not d.startswith("replaced-")]
    return False


def _batch_iterator(config: NemoConfig, train):
    return pipeline.BatchIterator(train, config.batch_size, seed=config.seed,
                                  augment=pipeline.augment_from_config(config.augment))


@locked     # one run per workdir (nvsm_jax.workdir_lock)
def train_and_evaluate(config, workdir, *, num_devices: int | None = None,
                       stop_after: int | None = None, train_set=None, object_mesh=None,
                       progress: bool = True) -> training.TrainState:
    """Trains NeMo per ``config`` into ``workdir`` (resuming if checkpoints exist).

    num_devices: devices of the data axis (default ``config.num_devices`` or all).
    stop_after: stop the loop after this many steps *of this call* (simulates a
      killed run; the final checkpoint is then not forced).
    train_set / object_mesh: a PoseSet (the whole pool; ``config.num_labelled``
      still picks the few-shot anchors from it) and Mesh to use instead of
      loading ``config.data_root`` (tests, notebooks, the few-shot experiment).
    Evaluates on ``config.test_root`` at the end when ``config.eval_at_end``.
    """
    nemo_checks.check_nemo_config(config)
    record = config     # config.json: as given (a few-shot cell's holds the experiment's too)
    config = NemoConfig.of(config)
    workdir = os.fspath(workdir)
    if train_set is None:
        train_set, object_mesh = load_train_set(config)
    else:
        train_set = labelled_images(config, train_set)
    mesh = parallel.make_mesh(num_devices or config.num_devices)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of {n_dev} devices")
    os.makedirs(workdir, exist_ok=True)     # the record, once the config and data are good
    training.save_config(record, workdir, has_work=holds_work(workdir))
    model = build_model(config.model)
    image_hw = train_set.image_size
    state = init_state(config, model, len(object_mesh.verts), image_hw, mesh)
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                 max_to_keep=config.keep_checkpoints)
    state = ckpt.restore_or(state)
    start = int(state.step)
    state_sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    train_step = make_train_step(config, model, object_mesh, image_hw, state_sharding, mesh)
    batches = _batch_iterator(config, train_set)
    writer = training.MetricsWriter(workdir)
    end = config.num_steps if stop_after is None else min(config.num_steps, start + stop_after)
    if start < end:
        log.info("training steps %d -> %d on %d device(s), %d images", start, end, n_dev,
                 len(train_set))
        log.info("compiling the train step (first call; about a minute on CPU)")
    keys = ("image", "pose", "focal", "principal")
    state = training.fit(        # each process reads only its rows of every batch
        state, train_step,
        lambda s, rows: {k: v for k, v in batches.batch(s, rows).items() if k in keys},
        mesh, training.StepRange(start, end, total=config.num_steps), seed=config.seed,
        batch_size=config.batch_size,
        log=training.LoopLog(writer, config.log_every, progress=progress), ckpt=ckpt)
    ckpt.close()
    if (stop_after is None and config.eval_at_end and config.test_root
            and parallel.is_main_process()):     # one process evaluates and writes results
        from nvsm_jax.nemo.evaluate import evaluate_workdir   # it imports this module

        evaluate_workdir(workdir, config.test_root)
    return state


class NemoModel(NamedTuple):
    """Everything inference needs. variables: FeatureNet variables; memory: MemoryBank;
    object_mesh: the model mesh; config: the run's NeMo settings; step: the checkpoint's
    step (:func:`load_model`; None for a live state)."""

    model: Any
    variables: Any
    memory: feat.MemoryBank
    object_mesh: meshes.Mesh
    config: NemoConfig
    step: int | None = None


def nemo_model(config, model, state, object_mesh) -> "NemoModel":
    """The inference bundle of a live TrainState (``config``: a NemoConfig, or a config
    it is built from)."""
    return NemoModel(model, state.variables(), state.aux, object_mesh, NemoConfig.of(config))


def evaluate_nemo(nemo: NemoModel, test_sets: dict) -> dict:
    """NeMo inference (the run's own solver, ``eval_batch_size`` images a call) on
    ``{occlusion: PoseSet}`` -> ``{occlusion: {"errors" [N] rad, "pred" [N, 4],
    "score" [N], "acc_pi_6", "acc_pi_18", "med_err_deg"}}``."""
    rows = {}
    for occ, test in test_sets.items():
        log.info("evaluating on %d %s test images", len(test), occ)
        with training.heartbeat(f"evaluating on {occ}"):
            res = predict(nemo, test, batch_size=nemo.config.eval_batch_size)
        err = evaluation.rotation_errors(res.pose, test.poses)
        rows[occ] = {"errors": err, "pred": res.pose, "score": res.score,
                     "acc_pi_6": evaluation.accuracy_at(err, np.pi / 6),
                     "acc_pi_18": evaluation.accuracy_at(err, np.pi / 18),
                     "med_err_deg": evaluation.median_error_deg(err)}
    return rows


def load_model(workdir, config=None, object_mesh=None) -> NemoModel:
    """Restores the latest checkpoint of a NeMo workdir (config from ``config.json``; a
    missing or damaged one is a RunStateError naming it)."""

    workdir = os.fspath(workdir)
    if config is None:
        path = os.path.join(workdir, "config.json")
        if not os.path.isfile(path):
            raise RunStateError(f"{path}: not found; is {workdir} the workdir of a NeMo or "
                                "NVSM run (nvsm-train-nemo, or a cell of nvsm-fewshot)?")
        recover = ("delete it and rerun the training command with the same config: it "
                   "writes it again and resumes from the checkpoints")
        config = training.read_json(path, "run's config", recover)   # damaged: RunStateError
        if not isinstance(config, dict):
            raise RunStateError(f"{path}: the run's config is not a JSON object; {recover}")
        try:        # a key this code does not know (an older or newer run's) is dropped
            config = NemoConfig.of(config, recorded=True)
        except (TypeError, ValueError) as err:
            raise RunStateError(f"{path}: not a NeMo run's config ({err}); {recover}") from None
    config = NemoConfig.of(config)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not (os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))):
        raise RunStateError(f"no checkpoint in {ckpt_dir}; is {workdir} a trained NeMo or NVSM "
                            "run (nvsm-train-nemo, or a cell of nvsm-fewshot such as "
                            "W/nvsm_car_7)?")
    if object_mesh is None:
        object_mesh = loaders.load_model_mesh(config.data_root, config.category)
    model = build_model(config.model)
    mesh = parallel.make_mesh(1)
    log.info("loading the model of %s", workdir)
    # image size only matters for shapes of nothing here (fully convolutional)
    state = init_state(config, model, len(object_mesh.verts), (64, 64), mesh,
                       pretrained=False)
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"))
    state = ckpt.restore(state)
    ckpt.close()
    return NemoModel(model, state.variables(), state.aux, object_mesh, config, int(state.step))


def feature_fn(nemo: NemoModel):
    """``images uint8 [B, H, W, 3] -> feature maps [B, h, w, D]`` (jitted, eval mode)."""
    @jax.jit
    def f(images):
        return nemo.model.apply(nemo.variables, backbone.preprocess(images), train=False)
    return f


def predict(nemo: NemoModel, pose_set, solver_cfg=None, *, batch_size: int = 16,
            progress: bool = False):
    """NeMo inference on a PoseSet -> :class:`nvsm_jax.nemo.pose_solver.SolveResult`
    (``solver_cfg``: the run's own solver when None)."""
    solver_cfg = nemo.config.solver if solver_cfg is None else solver_cfg
    clutter = feat.clutter_prototype(nemo.memory.clutter)
    bar = (lambda it: training.progress_bar(it, desc="solve")) if progress else None
    return pose_solver.solve_batched(
        feature_fn(nemo), pose_set.images, nemo.memory.vertex, clutter, nemo.object_mesh,
        geometry.Intrinsics(pose_set.focal, pose_set.principal),
        stride=nemo.config.model.stride, solver_cfg=solver_cfg, batch_size=batch_size,
        progress=bar)
