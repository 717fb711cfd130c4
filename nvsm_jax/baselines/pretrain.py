"""Self-supervised dense contrastive pre-training of the NeMo backbone.

ImageNet weights cannot be downloaded here, so the :class:`FeatureNet` (dense
unit features ``[B, h, w, D]``, stride ``s``) can instead be pre-trained on the
unlabelled pool (:class:`nvsm_jax.data.UnlabelledSet`) with a pixel-level
contrastive objective in the spirit of DenseCL / PixPro.

Design
------
* **Two views with known correspondence** (host numpy, a pure function of
  ``(seed, step)``): each view of an image is a translation by a whole number
  of *feature cells* (``ty, tx`` in ``[-max_shift_cells, max_shift_cells]``,
  i.e. multiples of ``s`` pixels; uncovered pixels take the image's mean
  colour), then a horizontal flip with probability ``flip_prob``, then colour
  jitter (:func:`nvsm_jax.data.color_jitter`) and Gaussian pixel noise.
  Original cell ``(i, j)`` lands on view cell ``(i + ty, j + tx)``, column
  ``w - 1 - (j + tx)`` after a flip; it is *valid* when it stays inside both
  views (:func:`view_correspondence`).
* **Positives / negatives.** ``cells_per_image`` valid original cells are
  sampled per image; their features in view 1 and view 2 form ``N = B * K``
  pairs. The dense loss is the symmetric InfoNCE over the ``N x N`` cosine
  matrix divided by ``temperature`` (default 0.15): the corresponding cell is
  the positive, every other sampled cell of the *whole batch* in the other view
  is a negative, except cells of the same image within ``neighbor_radius``
  cells of the positive (they overlap the positive's receptive field, as NeMo's
  CoKe loss also excludes neighbouring vertices). Invalid (padding) cells are
  masked out of both rows and columns.
* **Global term** (``global_weight``, default 0.25): InfoNCE between the
  L2-normalised mean features of the two views of each image against the other
  images of the batch. Total ``(1 - g) * dense + g * global``.
* Training follows :mod:`nvsm_jax.nemo.train`: one ``Mesh`` with a ``data`` axis
  (views sharded on the batch axis; the ``N x N`` matrix spans the global batch,
  XLA inserts the gathers), a jitted donated step, Adam with warm-up + cosine,
  orbax checkpoints (a killed run resumes exactly), ``metrics.jsonl``.

Using the result
----------------
:func:`pretrain` returns :class:`Pretrained` ``(params, model_state)`` and writes
``pretrained.msgpack`` in the workdir; :func:`load_pretrained_params` reads it
back (or the latest checkpoint of an unfinished run), and
:func:`apply_pretrained` puts it into a NeMo :class:`nvsm_jax.training.TrainState`
(``state = apply_pretrained(state, load_pretrained_params(workdir))`` right
after :func:`nvsm_jax.nemo.train.init_state`, before restoring NeMo checkpoints).
The encoder part (``params["encoder"]``) also fits
:class:`nvsm_jax.baselines.classifier.PoseClassifier`.

Public API: :class:`PretrainConfig`, :func:`make_views`, :func:`view_correspondence`,
:func:`dense_infonce`, :func:`global_infonce`, :func:`pretrain_loss`,
:func:`pretrain`, :class:`Pretrained`, :func:`load_pretrained_params`,
:func:`apply_pretrained`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvsm_jax import parallel, training
from nvsm_jax.data import pipeline
from nvsm_jax.baselines.settings import PretrainConfig
from nvsm_jax.models import backbone
from nvsm_jax.settings import OptimConfig

log = logging.getLogger(__name__)

__all__ = ["PretrainConfig", "pretrain_config", "Pretrained", "view_correspondence",
           "make_views", "dense_infonce", "global_infonce", "pretrain_loss", "resolve_model",
           "make_train_step", "pretrain", "load_pretrained_params", "apply_pretrained",
           "PARAMS_FILE"]

PARAMS_FILE = "pretrained.msgpack"


def pretrain_config(arg: str = "default") -> PretrainConfig:
    """``"default"`` or ``"tiny"`` (a smoke run that only exercises the code)."""
    if arg in (None, "", "default"):
        return PretrainConfig()
    if arg == "tiny":
        return PretrainConfig(num_steps=4, batch_size=8, cells_per_image=16, max_shift_cells=1,
                              log_every=1, checkpoint_every=2,
                              optim=OptimConfig(warmup_steps=1, lr=3e-3, weight_decay=0.0))
    raise ValueError(f"config arg must be 'default' or 'tiny', got {arg!r}")


class Pretrained(NamedTuple):
    """params: FeatureNet ``params`` tree; model_state: other collections (``batch_stats``) or {}."""

    params: Any
    model_state: Any


# --------------------------------------------------------------------------- views

def view_correspondence(grid_hw, shift, flip) -> tuple[np.ndarray, np.ndarray]:
    """Where each original feature cell lands in a view.

    grid_hw: (h, w) feature cells; shift: [..., 2] int cells (ty, tx); flip: [...] bool.
    Returns (flat index [..., h*w] int32 into the view's ``h*w`` cells, valid
    [..., h*w] bool); original cell ``(i, j)`` is flat ``i * w + j``.
    """
    h, w = grid_hw
    shift = np.asarray(shift, np.int64)
    flip = np.asarray(flip, bool)
    i, j = np.divmod(np.arange(h * w), w)
    vi = i + shift[..., 0:1]
    vj = j + shift[..., 1:2]
    valid = (vi >= 0) & (vi < h) & (vj >= 0) & (vj < w)
    vj = np.where(flip[..., None], w - 1 - vj, vj)
    idx = np.clip(vi, 0, h - 1) * w + np.clip(vj, 0, w - 1)
    return idx.astype(np.int32), valid


def _shift_image(image: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """out[y, x] = image[y - dy, x - dx] (pixels), ``fill`` outside."""
    h, w = image.shape[:2]
    out = np.empty_like(image)
    out[...] = fill
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if h - abs(dy) > 0 and w - abs(dx) > 0:
        out[yd, xd] = image[ys, xs]
    return out


def make_views(images: np.ndarray, stride: int, config: PretrainConfig,
               rng: np.random.Generator) -> dict:
    """Two augmented views of each image and their sampled cell correspondences.

    images: [B, H, W, 3] uint8, H and W multiples of ``stride``.
    Returns a dict of numpy arrays (K = ``config.cells_per_image``):
    ``view1``, ``view2``: [B, H, W, 3] uint8; ``idx1``, ``idx2``: [B, K] int32 flat
    cells of view 1 / view 2 (``h * w`` grid, h = H / stride); ``valid``: [B, K]
    bool (False = padding, fewer than K shared cells); ``cell``: [B, K, 2] float32
    original-grid (row, col) of each sample; plus ``shift`` [B, 2, 2] int32
    (ty, tx per view) and ``flip`` [B, 2] bool.
    """

    images = np.asarray(images)
    b, height, width, _ = images.shape
    if height % stride or width % stride:
        raise ValueError(f"image size {(height, width)} is not a multiple of stride {stride}")
    h, w = height // stride, width // stride
    m = int(config.max_shift_cells)
    shift = rng.integers(-m, m + 1, size=(b, 2, 2))
    flip = rng.random((b, 2)) < config.flip_prob
    views, idxs = [], []
    for v in range(2):
        out = np.empty_like(images)
        for n in range(b):
            fill = images[n].reshape(-1, 3).mean(0).astype(images.dtype)
            x = _shift_image(images[n], int(shift[n, v, 0]) * stride,
                             int(shift[n, v, 1]) * stride, fill)
            out[n] = x[:, ::-1] if flip[n, v] else x
        if config.jitter > 0:
            j = config.jitter
            out = pipeline.color_jitter(out, rng, j, j, j)
        if config.noise_std > 0:
            noisy = out.astype(np.float32) + rng.normal(0, config.noise_std, out.shape)
            out = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        views.append(out)
        idxs.append(view_correspondence((h, w), shift[:, v], flip[:, v]))
    (idx1, ok1), (idx2, ok2) = idxs
    shared = ok1 & ok2                                              # [B, h*w]
    k = int(config.cells_per_image)
    pick = np.zeros((b, k), np.int64)
    valid = np.zeros((b, k), bool)
    for n in range(b):
        cand = np.flatnonzero(shared[n])
        chosen = rng.permutation(cand)[:k]
        pick[n, :len(chosen)] = chosen
        valid[n, :len(chosen)] = True
    rows = np.arange(b)[:, None]
    cell = np.stack(np.divmod(pick, w), -1).astype(np.float32)
    return {"view1": views[0], "view2": views[1], "idx1": idx1[rows, pick],
            "idx2": idx2[rows, pick], "valid": valid, "cell": cell,
            "shift": shift.astype(np.int32), "flip": flip}


# --------------------------------------------------------------------------- losses

def _masked_ce(logits, mask_rows, mask_cols):
    """Mean over valid rows of ``-log softmax(logits)[r, r]`` over valid columns."""
    neg = jnp.finfo(logits.dtype).min / 2
    logits = jnp.where(mask_cols[None, :], logits, neg)
    logp = jnp.diagonal(logits) - jax.nn.logsumexp(logits, axis=-1)
    w = mask_rows.astype(logits.dtype)
    return -jnp.sum(logp * w) / jnp.maximum(jnp.sum(w), 1.0)


def dense_infonce(f1, f2, valid, *, temperature: float = 0.15, image_id=None, cell=None,
                  neighbor_radius: float = 0.0):
    """Symmetric InfoNCE between corresponding cells.

    f1, f2: [N, D] unit features, row ``n`` of f1 and f2 is a positive pair;
    valid: [N] bool (invalid rows are neither anchors nor negatives);
    image_id: [N] int and cell: [N, 2] (original-grid row, col), with
      ``neighbor_radius > 0``: same-image cells within that many cells of the
      positive are excluded from the negatives.
    Returns the loss [] (``~log N`` for unrelated features, -> 0 for identical
    views of distinct features).
    """
    logits = jnp.matmul(f1, f2.T, precision=jax.lax.Precision.HIGHEST) / temperature
    n = f1.shape[0]
    if neighbor_radius and image_id is not None and cell is not None:
        d2 = jnp.sum((cell[:, None, :] - cell[None, :, :]) ** 2, -1)
        near = (image_id[:, None] == image_id[None, :]) & (d2 <= neighbor_radius ** 2)
        near = near & ~jnp.eye(n, dtype=bool)
        logits = jnp.where(near, jnp.finfo(logits.dtype).min / 2, logits)
    valid = jnp.asarray(valid, bool)
    return 0.5 * (_masked_ce(logits, valid, valid) + _masked_ce(logits.T, valid, valid))


def global_infonce(g1, g2, *, temperature: float = 0.15):
    """Symmetric InfoNCE of image-level features. g1, g2: [B, D] (normalised here) -> []."""
    g1 = g1 / jnp.linalg.norm(g1, axis=-1, keepdims=True).clip(1e-6)
    g2 = g2 / jnp.linalg.norm(g2, axis=-1, keepdims=True).clip(1e-6)
    ok = jnp.ones(g1.shape[0], bool)
    logits = jnp.matmul(g1, g2.T, precision=jax.lax.Precision.HIGHEST) / temperature
    return 0.5 * (_masked_ce(logits, ok, ok) + _masked_ce(logits.T, ok, ok))


def pretrain_loss(fmap1, fmap2, batch, config: PretrainConfig):
    """The pre-training loss of two feature maps.

    fmap1, fmap2: [B, h, w, D] (FeatureNet outputs of view1 / view2);
    batch: ``idx1``, ``idx2``, ``valid`` [B, K], ``cell`` [B, K, 2] (see
    :func:`make_views`). Returns (total [], {"dense": [], "global": [],
    "pos_cos": [] mean positive cosine, "neg_cos": [] mean cosine to other images}).
    """
    b, h, w, d = fmap1.shape
    k = batch["idx1"].shape[1]
    flat1, flat2 = fmap1.reshape(b, h * w, d), fmap2.reshape(b, h * w, d)
    f1 = jnp.take_along_axis(flat1, batch["idx1"][..., None], axis=1).reshape(b * k, d)
    f2 = jnp.take_along_axis(flat2, batch["idx2"][..., None], axis=1).reshape(b * k, d)
    valid = batch["valid"].reshape(b * k)
    image_id = jnp.repeat(jnp.arange(b), k)
    dense = dense_infonce(f1, f2, valid, temperature=config.temperature, image_id=image_id,
                          cell=batch["cell"].reshape(b * k, 2),
                          neighbor_radius=config.neighbor_radius)
    glob = global_infonce(fmap1.mean((1, 2)), fmap2.mean((1, 2)),
                          temperature=config.temperature)
    g = config.global_weight
    total = (1.0 - g) * dense + g * glob if g else dense
    vf = valid.astype(f1.dtype)
    pos = jnp.sum(jnp.sum(f1 * f2, -1) * vf) / jnp.maximum(vf.sum(), 1.0)
    other = (image_id[:, None] != image_id[None, :]) & valid[:, None] & valid[None, :]
    cos = jnp.matmul(f1, f2.T)
    neg = jnp.sum(jnp.where(other, cos, 0.0)) / jnp.maximum(other.sum(), 1)
    return total, {"dense": dense, "global": glob, "pos_cos": pos, "neg_cos": neg}


# --------------------------------------------------------------------------- training

def resolve_model(model_config_or_model) -> backbone.FeatureNet:
    """A FeatureNet from: a FeatureNet; a NeMo config (``config.model``); a model config
    (``backbone``, ``stride``, ``feature_dim``, ``norm``...); or a preset name."""
    m = model_config_or_model
    if isinstance(m, backbone.FeatureNet):
        return m
    if isinstance(m, str):
        return backbone.make_feature_net(m)
    if hasattr(m, "model") and hasattr(m.model, "backbone"):
        m = m.model
    get = m.get if hasattr(m, "get") else (lambda k, d=None: getattr(m, k, d))
    if get("backbone") is None:
        raise TypeError(f"cannot build a FeatureNet from {type(model_config_or_model)}")
    return backbone.make_feature_net(get("backbone"), stride=get("stride"),
                                     feature_dim=get("feature_dim"), norm=get("norm"),
                                     encoder_norm=get("encoder_norm"), depthwise=get("depthwise"))


def init_state(config: PretrainConfig, model: backbone.FeatureNet, image_hw,
               mesh) -> training.TrainState:
    """TrainState (FeatureNet params, Adam, batch_stats if any) replicated on ``mesh``,
    through :func:`nvsm_jax.training.create_replicated` (compiled once per config,
    seed aside, model and image size)."""
    init = training.state_initializer(model, _optimizer(config)[0], (1, *image_hw, 3))
    return training.create_replicated(
        init, jax.random.key(config.seed), mesh,
        cache_key=("pretrain", config.replace(seed=0), model, tuple(image_hw)))


@functools.lru_cache(maxsize=16)
def _optimizer(config: PretrainConfig):
    """``(tx, schedule)`` of :func:`nvsm_jax.training.make_optimizer`, cached: the
    same config gets the same ``tx`` object, a static field of the state, so the
    cached train step sees the same state structure and does not compile again."""
    return training.make_optimizer(config.optim, config.num_steps)


@functools.lru_cache(maxsize=8)
def make_train_step(config: PretrainConfig, model: backbone.FeatureNet, mesh):
    """Jitted, donated ``(state, batch, key) -> (state, metrics)``.

    batch: ``view1``, ``view2`` [B, H, W, 3] uint8 and ``idx1``, ``idx2``,
    ``valid`` [B, K], ``cell`` [B, K, 2], sharded over ``data``.
    """
    _, schedule = _optimizer(config)
    rep = parallel.replicated(mesh)

    def step(state: training.TrainState, batch, key):
        del key
        # [B, 2, H, W, 3] -> [2B, ...] with the two views of an image adjacent: the rows
        # stay on their device (concatenating along the sharded axis would move them).
        views = jnp.stack([batch["view1"], batch["view2"]], axis=1)
        b = views.shape[0]
        x = backbone.preprocess(views.reshape(2 * b, *views.shape[2:]))

        def loss_fn(params):
            fmap, new_ms = state.apply_train(params, x)
            fmap = fmap.reshape(b, 2, *fmap.shape[1:])
            loss, m = pretrain_loss(fmap[:, 0], fmap[:, 1], batch, config)
            return loss, (m, new_ms)

        (loss, (m, new_ms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads).replace(model_state=new_ms)
        return state, {"loss": loss, **m, "grad_norm": optax.global_norm(grads),
                       "lr": schedule(state.step - 1)}

    return jax.jit(step, donate_argnums=0, out_shardings=(rep, rep))


def _host_batch(batches, model, config: PretrainConfig, step: int, rows: slice) -> dict:
    """The rows ``rows`` of ``step``'s views (drawn for the whole batch)."""
    images = batches.batch(step)["image"]
    views = make_views(images, model.stride, config, np.random.default_rng([config.seed, 2, step]))
    return {k: views[k][rows] for k in ("view1", "view2", "idx1", "idx2", "valid", "cell")}


def pretrain(config: PretrainConfig, model_config_or_model, unlabelled, workdir, *,
             num_devices: int | None = None, progress: bool = True,
             stop_after: int | None = None) -> Pretrained:
    """Dense contrastive pre-training of a FeatureNet on unlabelled images (resumable).

    model_config_or_model: see :func:`resolve_model` (e.g. the NeMo config).
    unlabelled: :class:`nvsm_jax.data.UnlabelledSet` (or anything with ``images``
      [N, H, W, 3] uint8; H, W multiples of 32 and of the model stride).
    workdir: gets ``pretrain_config.json``, ``metrics.jsonl``, ``checkpoints/`` and,
      at the end, ``pretrained.msgpack``.
    num_devices: devices of the ``data`` axis (default all; divides ``batch_size``).
    stop_after: stop after this many steps of this call (simulated kill).
    Returns :class:`Pretrained` (host numpy ``params`` / ``model_state`` trees).
    """

    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    model = resolve_model(model_config_or_model)
    if parallel.is_main_process():
        with open(os.path.join(workdir, "pretrain_config.json"), "w") as f:
            json.dump({"pretrain": config.to_dict(),
                       "model": {fl.name: getattr(model, fl.name)
                                 for fl in dataclasses.fields(model)
                                 if fl.name not in ("parent", "name")}}, f, indent=2)
    mesh = parallel.make_mesh(num_devices)
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of {n_dev} devices")
    image_hw = tuple(unlabelled.images.shape[1:3])
    state = init_state(config, model, image_hw, mesh)
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint_every,
                                 max_to_keep=config.keep_checkpoints)
    state = ckpt.restore_or(state)
    start = int(state.step)
    train_step = make_train_step(config, model, mesh)
    batches = pipeline.BatchIterator(unlabelled, config.batch_size, seed=config.seed)
    writer = training.MetricsWriter(workdir)
    end = config.num_steps if stop_after is None else min(config.num_steps, start + stop_after)
    if start < end:
        log.info("pretrain: steps %d -> %d on %d device(s), %d images", start, end, n_dev,
                 len(unlabelled))
    state = training.fit(
        state, train_step, lambda s, rows: _host_batch(batches, model, config, s, rows), mesh,
        training.StepRange(start, end, total=config.num_steps), seed=config.seed,
        batch_size=config.batch_size,
        log=training.LoopLog(writer, config.log_every, progress=progress, desc="pretrain"),
        ckpt=ckpt)
    ckpt.close()
    result = Pretrained(jax.device_get(state.params), jax.device_get(state.model_state or {}))
    if int(state.step) >= config.num_steps and parallel.is_main_process():
        with open(os.path.join(workdir, PARAMS_FILE), "wb") as f:
            f.write(flax.serialization.msgpack_serialize(
                {"params": result.params, "model_state": result.model_state,
                 "step": int(state.step)}))
    return result


def _restore_raw(workdir):
    import orbax.checkpoint as ocp

    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"{workdir}: no {PARAMS_FILE} and no checkpoint")
        tree = ckpt.manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        ckpt.close()
    return tree


def load_pretrained_params(workdir) -> Pretrained:
    """Pre-trained FeatureNet weights of a :func:`pretrain` workdir.

    Reads ``pretrained.msgpack`` (written at the end of a run), or else the
    latest checkpoint of an unfinished run. Returns :class:`Pretrained` with host
    numpy trees matching ``FeatureNet.init(...)["params"]`` (and ``batch_stats``
    under ``model_state`` for BatchNorm models).
    """
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, PARAMS_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            tree = flax.serialization.msgpack_restore(f.read())
    else:
        tree = _restore_raw(workdir)
    return Pretrained(tree["params"], tree.get("model_state") or {})


def apply_pretrained(state: training.TrainState, pretrained: Pretrained | Any, *,
                     subtree: str | None = None) -> training.TrainState:
    """A TrainState whose params (and matching ``model_state``) are the pre-trained ones.

    state: e.g. the NeMo state of :func:`nvsm_jax.nemo.train.init_state` (fresh, step 0).
    pretrained: :class:`Pretrained` or a bare params tree.
    subtree: copy only this top-level entry (e.g. ``"encoder"`` for
      :class:`nvsm_jax.baselines.classifier.PoseClassifier`); default all params.
    The structure and shapes must match (ValueError otherwise); each leaf keeps
    the sharding of the leaf it replaces. The optimiser state is untouched
    (Adam's moments are zeros at step 0, whatever the params are).
    """
    if not isinstance(pretrained, Pretrained):
        pretrained = Pretrained(pretrained, {})
    return training.replace_weights(state, pretrained.params, pretrained.model_state,
                                    subtree=subtree)
