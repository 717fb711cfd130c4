"""MCSS training and evaluation: joint multi-view consistency + supervised pose.

The supervision boundary: :func:`make_train_set` keeps the 3D poses of the
labelled frames only (``labelled_idx``, ``labelled_pose``); everything else the
trainer sees is images and the (sequence, view, time) synchronisation indices.
Camera calibration is never read.

One step draws (a) a multi-view batch ``num_seqs x num_times x num_views`` from
any training sequence (unlabelled) for the consistency loss and (b)
``sup_batch`` labelled frames for the pose loss; both go through the network in
one pass, sharded over the mesh ``data`` axis. ``method="baseline"`` is the same
network and supervised batch with the multi-view batch (and loss) switched off.

Randomness: the batch of step ``s`` comes from ``numpy.random.default_rng([seed,
s])`` and the step key from ``fold_in``; a resumed run repeats exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nvsm_jax import parallel, training
from nvsm_jax.mcss import fusion, losses, metrics
from nvsm_jax.mcss.h36m import MultiViewData
from nvsm_jax.mcss.model import make_model
from nvsm_jax.mcss.settings import MCSSModelConfig, MultiviewConfig, MultiviewPseudoConfig
from nvsm_jax.models import efficientnet, weights
from nvsm_jax.settings import OptimConfig
from nvsm_jax.models.backbone import encoder_stage, preprocess

__all__ = ["TrainSet", "supervision_mask", "make_train_set", "sample_multiview_batch",
           "sample_supervised_batch", "make_train_step", "init_state", "train", "predict",
           "encode", "encode_copies", "uses_feature_cache", "feature_cache_stage", "tap_stage", "frozen_filter",
           "evaluate_poses",
           "mean_pose_prediction", "predict_frames", "bootstrap_train_set"]


@dataclasses.dataclass
class TrainSet:
    """What the trainer may see: images, synchronisation indices, labelled poses only.

    images uint8 [N, H, W, 3]; seq_id/view/frame int32 [N]; seq_views, seq_frames,
    seq_offset [S]; labelled_idx int [L]; labelled_pose float32 [L, 17, 3] metres
    (root-relative, camera frame).
    """

    images: np.ndarray
    seq_id: np.ndarray
    view: np.ndarray
    frame: np.ndarray
    seq_views: np.ndarray
    seq_frames: np.ndarray
    seq_offset: np.ndarray
    labelled_idx: np.ndarray
    labelled_pose: np.ndarray


def supervision_mask(data: MultiViewData, level: str, seed: int = 0) -> np.ndarray:
    """Which frames carry 3D labels: bool [N].

    level: ``"all"``; a subject list ``"S1"`` / ``"S1,S5"``; or ``"frac:0.05"``
    (that fraction of the time instants of every sequence, drawn at random,
    labelled in all views).
    """
    if level == "all":
        return np.ones(len(data), bool)
    if level.startswith("frac:"):
        frac = float(level.split(":", 1)[1])
        rng = np.random.default_rng([seed, 1234])
        mask = np.zeros(len(data), bool)
        for s in range(len(data.subjects)):
            t_len, v_len = int(data.seq_frames[s]), int(data.seq_views[s])
            k = max(1, int(round(frac * t_len)))
            ts = rng.choice(t_len, size=k, replace=False)
            mask[data.index(s, np.arange(v_len)[:, None], ts[None])] = True
        return mask
    subjects = set(level.split(","))
    unknown = subjects - set(data.subjects)
    if unknown:
        raise ValueError(f"supervision level {level!r}: unknown subjects {sorted(unknown)}")
    return np.isin(data.subject_of_frame, list(subjects))


def make_train_set(data: MultiViewData, labelled: np.ndarray) -> TrainSet:
    """Drops the 3D labels of unlabelled frames (poses converted to metres)."""
    idx = np.flatnonzero(labelled)
    return TrainSet(images=data.images, seq_id=data.seq_id, view=data.view, frame=data.frame,
                    seq_views=data.seq_views, seq_frames=data.seq_frames,
                    seq_offset=data.seq_offset, labelled_idx=idx,
                    labelled_pose=(data.pose3d[idx] / 1000.0).astype(np.float32))


def sample_multiview_batch(rng: np.random.Generator, ts: TrainSet, num_seqs: int, num_times: int,
                           num_views: int) -> dict:
    """``num_seqs`` sequences x ``num_times`` distinct instants x ``num_views`` views.

    Returns flat (seq-major, then time, then view) ``idx [B]`` and ``seq``,
    ``time``, ``view`` [B] int32 (``seq`` is the batch-local sequence slot).
    """
    n_seq = len(ts.seq_offset)
    seqs = rng.choice(n_seq, size=num_seqs, replace=num_seqs > n_seq)
    idx, seq, time, view = [], [], [], []
    for slot, s in enumerate(seqs):
        t_len, v_len = int(ts.seq_frames[s]), int(ts.seq_views[s])
        if v_len < num_views:
            raise ValueError(f"sequence {s} has {v_len} views < num_views={num_views}")
        times = rng.choice(t_len, size=num_times, replace=num_times > t_len)
        for t in times:
            views = rng.choice(v_len, size=num_views, replace=False)
            for v in views:
                idx.append(ts.seq_offset[s] + v * t_len + t)
                seq.append(slot)
                time.append(t)
                view.append(v)
    as32 = lambda x: np.asarray(x, np.int32)
    return {"idx": np.asarray(idx), "seq": as32(seq), "time": as32(time), "view": as32(view)}


def sample_supervised_batch(rng: np.random.Generator, ts: TrainSet, size: int) -> dict:
    """``size`` labelled frames (with replacement)."""
    k = rng.integers(0, len(ts.labelled_idx), size=size)
    return {"idx": ts.labelled_idx[k], "pose": ts.labelled_pose[k]}


def _augment(images, key, strength: float):
    """Per-image brightness/contrast/colour jitter on [B, H, W, 3] floats in [0, 1]."""
    if strength <= 0:
        return images
    k1, k2, k3 = jax.random.split(key, 3)
    b = images.shape[0]
    gain = 1.0 + strength * jax.random.uniform(k1, (b, 1, 1, 3), minval=-1, maxval=1)
    bias = 0.5 * strength * jax.random.uniform(k2, (b, 1, 1, 1), minval=-1, maxval=1)
    noise = 0.02 * strength * jax.random.normal(k3, images.shape)
    return jnp.clip(images * gain + bias + noise, 0.0, 1.0)


def _prep(images_u8, key=None, augment: float = 0.0):
    x = jnp.asarray(images_u8, jnp.float32) / 255.0
    if key is not None:
        x = _augment(x, key, augment)
    return preprocess(x * 255.0)


def _cfg_key(cfg) -> str:
    return cfg.to_json_best_effort(sort_keys=True) if hasattr(cfg, "to_json_best_effort") else repr(cfg)


def init_state(cfg, mesh, image_size, seed: int):
    """``(model, state)``: the model of ``cfg.model`` and a replicated
    :class:`nvsm_jax.training.TrainState` (optimiser of ``cfg.optim`` over ``cfg.steps``),
    through :func:`nvsm_jax.training.create_replicated`: compiled once per
    (config, image size, mesh), so runs that differ only in seed or data do not
    recompile. ``cfg``: the ``train`` block (an
    :class:`~nvsm_jax.mcss.settings.MCSSTrainConfig`, as the experiment passes it, or a
    config block); its ``model`` / ``optim`` blocks are built as
    :class:`~nvsm_jax.mcss.settings.MCSSModelConfig` / :class:`~nvsm_jax.settings.OptimConfig`
    (an unknown key is a ConfigError)."""
    model_cfg = MCSSModelConfig.from_config(cfg.model)
    model = make_model(model_cfg)
    tx, _ = training.make_optimizer(OptimConfig.from_config(cfg.optim), cfg.steps,
                                    frozen=frozen_filter(model_cfg))
    init = training.state_initializer(model, tx, (1, *image_size, 3))
    state = training.create_replicated(init, jax.random.key(seed), mesh,
                                       cache_key=("mcss", _cfg_key(cfg), tuple(image_size)))
    encoder = weights.pretrained_encoder(model.encoder_kind, model_cfg.pretrained)
    if encoder is not None:
        state = training.replace_weights(state, *encoder, subtree="encoder")
    return model, state


def tap_stage(model_cfg) -> int:
    """The last encoder stage (:func:`nvsm_jax.models.backbone.encoder_stage` numbering)
    that the tap ``model_cfg.tap`` reads."""
    tap = int(model_cfg.tap)
    if model_cfg.encoder in efficientnet.VARIANTS:
        return efficientnet.TAP_STAGES.get(tap, 8)
    return {4: 1, 8: 2, 16: 3, 32: 4}[tap]


def feature_cache_stage(cfg) -> int | None:
    """The encoder stage whose output maps training reads computed once
    (:func:`encode`), or None: no cache. ``cfg``: the ``train`` block.

    ``cfg.cache_features``:

    * ``"auto"``: a cache wherever the encoder's first stages are frozen
      (``model.frozen_stages = k > 0``) and have no trainable batch statistics
      (``norm != "batch"``): their maps are the same at every step, so computing
      them once gives the same loss and update. Frozen up to the tap
      (``k > tap_stage``): the tap maps (``tap_stage``; the step runs from the
      tap on). Frozen partly (``k <= tap_stage``, EfficientNet-Lite only): the
      output of the last frozen stage, ``k - 1`` (the step runs encoder stages
      ``k`` .. ``tap_stage``, then the heads). The ResNet splits at the tap only:
      partly frozen, it trains from the images.
    * ``"on"``: as "auto", and a ValueError where that gives no cache;
    * ``"off"``: never.

    With any cache the colour augmentation (``cfg.augment``) is off: it acts on
    images, and the cached maps are of the plain images. The cache holds float32
    maps of every training image; Lite0 at 64 px, per image: 7 KiB at the tap of
    stride 16 (stage 5), 5 KiB for stage 4's output, 10 KiB for stage 3's, 24 KiB
    for stage 2's, 64 KiB for stage 1's, 128 KiB for the stem's.
    """
    mode = cfg.cache_features
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"cache_features must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off":
        return None
    model_cfg = cfg.model
    k = int(model_cfg.frozen_stages or 0)
    tap = tap_stage(model_cfg)
    norm = model_cfg.norm
    lite = model_cfg.encoder in efficientnet.VARIANTS
    stage = None
    if norm != "batch" and k > tap:
        stage = tap
    elif norm != "batch" and lite and k > 0:
        stage = k - 1
    if stage is None and mode == "on":
        if lite:
            raise ValueError(f"cache_features='on' needs frozen encoder stages whose maps "
                             f"can be computed once: frozen_stages >= 1 (got "
                             f"{model_cfg.frozen_stages}; the output of the last "
                             f"frozen stage is cached) and norm != 'batch' (got {norm!r})")
        raise ValueError(f"cache_features='on' needs the encoder frozen up to the tap: "
                         f"frozen_stages > {tap} (got "
                         f"{model_cfg.frozen_stages}) and norm != 'batch'")
    return stage


def uses_feature_cache(cfg) -> bool:
    """Whether training reads encoder maps computed once (:func:`feature_cache_stage`:
    the tap maps of an encoder frozen up to the tap, or the last frozen stage's
    output of a partly frozen EfficientNet-Lite). The result is the same, less the
    colour augmentation (which acts on images: it is off with the cache)."""
    return feature_cache_stage(cfg) is not None


def _cache_split(cfg) -> tuple[int | None, int | None]:
    """``(stop_stage, start_stage)`` of the cache (:func:`feature_cache_stage`):
    ``(None, None)`` for the tap maps (or no cache), ``(k - 1, k)`` for the output
    of stage ``k - 1`` of a partly frozen Lite encoder: :func:`encode`'s ``stage``
    and the network's ``start_stage`` on those maps."""
    stage = feature_cache_stage(cfg)
    if stage is None or stage == tap_stage(cfg.model):
        return None, None
    return stage, stage + 1


def frozen_filter(model_cfg):
    """``is_frozen(path)`` for the encoder stages ``0 .. frozen_stages - 1``
    (:func:`nvsm_jax.models.backbone.encoder_stage`), or None when nothing is frozen."""
    k = int(model_cfg.frozen_stages or 0)
    if k <= 0:
        return None
    kind = model_cfg.encoder
    return lambda path: path[0] == "encoder" and encoder_stage(path[1:], kind) < k


def make_train_step(model, cfg, use_multiview: bool):
    """Jitted ``(state, batch, key) -> (state, metrics)`` on the global batch.

    batch: ``sup_images [B2, H, W, 3] uint8``, ``sup_pose [B2, 17, 3]`` and, if
    ``use_multiview``, ``mv_images [B1, ...]``, ``mv_seq``, ``mv_time``, ``mv_view`` [B1].
    With ``sup_feats`` / ``mv_feats`` (encoder maps, :func:`encode`, of the stage
    :func:`feature_cache_stage` names for ``cfg``) in place of the images, the
    network runs from those maps on: from the tap (an encoder frozen up to it), or
    from the stage after the last frozen one (no augmentation either way).
    """
    mv = MultiviewConfig.from_config(cfg.multiview)
    w_mv = float(mv.weight) if use_multiview else 0.0
    frozen = frozen_filter(cfg.model)
    start_stage = _cache_split(cfg)[1]      # the network's first stage on cached maps

    def loss_fn(params, state, batch, key):
        k1, k2 = jax.random.split(key)
        cached = "sup_feats" in batch       # encoder maps computed once (uses_feature_cache)
        if cached:
            sup_x = batch["sup_feats"]
        else:
            sup_x = _prep(batch["sup_images"], k1, cfg.augment)
        if use_multiview:
            mv_x = batch["mv_feats"] if cached else _prep(batch["mv_images"], k2, cfg.augment)
            x = jnp.concatenate([sup_x, mv_x], axis=0)
        else:
            x = sup_x
        if frozen is not None:      # the backward pass stops at the frozen stages
            params = training.stop_gradient_where(params, frozen)
        emb, pose = model.apply(state.variables(params), x, train=True, from_features=cached,
                                start_stage=start_stage if cached else None)
        n_sup = sup_x.shape[0]
        l_pose = losses.pose_loss(pose[:n_sup], batch["sup_pose"], kind=cfg.pose_loss)
        out = {"loss_pose": l_pose}
        total = cfg.pose_weight * l_pose
        if use_multiview:
            l_mv, aux = losses.multiview_loss(
                emb[n_sup:], batch["mv_seq"], batch["mv_time"], batch["mv_view"], kind=mv.kind,
                dt_min=mv.dt_min, margin=mv.margin, temperature=mv.temperature,
                squared=mv.squared, cross_sequence=mv.cross_sequence)
            total = total + w_mv * l_mv
            out["loss_mv"] = l_mv
            w_pc = float(mv.pose_consistency)
            if w_pc > 0:        # the regressor's own multi-view term (DESIGN.md)
                l_pc = losses.pose_consistency_loss(pose[n_sup:], batch["mv_seq"],
                                                    batch["mv_time"], batch["mv_view"])
                total = total + w_pc * l_pc
                out["loss_pose_mv"] = l_pc
            out.update({f"mv_{k}": v for k, v in aux.items()})
        out["loss"] = total
        return total, out

    def step(state, batch, key):
        grads, out = jax.grad(loss_fn, has_aux=True)(state.params, state, batch, key)
        out["grad_norm"] = optax.global_norm(grads)
        return state.apply_gradients(grads=grads), out

    return jax.jit(step, donate_argnums=(0,))


_STEPS: dict = {}


def _cached_step(model, cfg, use_multiview: bool):
    """The jitted step, compiled once per (model, config, mode)."""
    key = (model, _cfg_key(cfg), use_multiview)
    if key not in _STEPS:
        _STEPS[key] = make_train_step(model, cfg, use_multiview)
    return _STEPS[key]


def _batch_for_step(ts: TrainSet, cfg, step: int, use_multiview: bool, seed: int,
                    feats: np.ndarray | None = None, mesh=None) -> dict:
    """The host batch of ``step``: images, or with ``feats`` (the encoder maps of
    ``ts.images``, [N, ...], or of ``C`` colour-augmented copies of them, [C, N, ...],
    :func:`encode_copies`) those maps, of the same frames (with copies, each frame's
    copy drawn at random). With ``mesh``, only this process's rows of each part
    (:func:`nvsm_jax.parallel.process_rows`; all of them on one process): the draws
    are made for the whole batch, so every process agrees, and only its own frames
    are gathered (``shard_batch(..., process_local=True)`` assembles the batch)."""
    rng = np.random.default_rng([seed, step])
    name = "images" if feats is None else "feats"

    def mine(x):
        return x if mesh is None else x[parallel.process_rows(len(x), mesh)]

    def take(idx):
        if feats is None:
            return ts.images[mine(idx)]
        if feats.ndim == 4:                          # one copy
            return feats[mine(idx)]
        copy = rng.integers(0, len(feats), size=len(idx))    # a copy per frame
        return feats[mine(copy), mine(idx)]

    sup = sample_supervised_batch(rng, ts, cfg.sup_batch)
    batch = {f"sup_{name}": take(sup["idx"]), "sup_pose": mine(sup["pose"])}
    if use_multiview:
        mvb = sample_multiview_batch(rng, ts, cfg.multiview.num_seqs, cfg.multiview.num_times,
                                     cfg.multiview.num_views)
        batch.update({f"mv_{name}": take(mvb["idx"])}, mv_seq=mine(mvb["seq"]),
                     mv_time=mine(mvb["time"]), mv_view=mine(mvb["view"]))
    return batch


@functools.lru_cache(maxsize=None)
def _encode_fn(model, stage: int | None = None, augment: float = 0.0):
    def f(variables, x, key):
        return model.apply(variables, _prep(x, key if augment > 0 else None, augment),
                           train=False, stop_stage=stage, method=model.features)
    return jax.jit(f)


_FEATURES: dict = {}


def _fingerprint(tree) -> str:
    h = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _stages_upto(tree, kind: str, stage: int):
    """The encoder variables (one collection's subtree) of stages ``0 .. stage``."""
    return {top: sub for top, sub in tree.items() if encoder_stage((top,), kind) <= stage}


def _cache_key(model, state, images: np.ndarray, stage: int | None) -> tuple:
    """What the maps of ``images`` depend on: the encoder weights of the stages run
    (all, or ``0 .. stage``), the model's encoder fields and the images array."""
    variables = state.variables()
    enc = {"params": variables["params"].get("encoder", {}),
           **{k: v.get("encoder", {}) for k, v in variables.items() if k != "params"}}
    if stage is not None:
        enc = {k: _stages_upto(v, model.encoder_kind, stage) for k, v in enc.items()}
    return (_fingerprint(enc), model.encoder_kind, model.tap if stage is None else None,
            stage, model.norm, model.depthwise, tuple(model.stage_sizes),
            tuple(model.widths), model.stem_width, id(images), images.shape)


def _remembered(cache_key, images):
    hit = _FEATURES.get(cache_key)
    return hit[1] if hit is not None and hit[0] is images else None


def _remember(cache_key, images, feats) -> None:
    if len(_FEATURES) >= 4:
        _FEATURES.pop(next(iter(_FEATURES)))
    _FEATURES[cache_key] = (images, feats)


def encode(model, state, images: np.ndarray, mesh=None, batch_size: int = 256,
           stage: int | None = None, augment: float = 0.0, key=None) -> np.ndarray:
    """The encoder maps at the tap (:meth:`MCSSNet.features`), float32
    ``[N, H / tap, W / tap, C]``, for uint8 images ``[N, H, W, 3]``; with ``stage``
    (EfficientNet-Lite), the output of that encoder stage instead
    (``features(x, stop_stage=stage)``; the network resumes from it with
    ``from_features=True, start_stage=stage + 1``). Kept per (encoder weights, model,
    images) for the process's lifetime (a frozen encoder gives every run of an
    experiment the same maps: computed once); with ``stage`` only the weights of
    stages ``0 .. stage`` count, so runs that share a frozen prefix share its maps.
    ``augment`` > 0 with a PRNG ``key``: the maps of colour-jittered images
    (:func:`_augment` at that strength; chunk ``i`` with ``fold_in(key, i)``), not
    kept (:func:`encode_copies` keeps its copies together)."""
    if augment > 0 and key is None:
        raise ValueError("encode: augment > 0 needs a PRNG key")
    augment = float(augment) if augment > 0 else 0.0
    cache_key = _cache_key(model, state, images, stage) if augment == 0 else None
    if cache_key is not None and (hit := _remembered(cache_key, images)) is not None:
        return hit
    mesh = mesh or parallel.make_mesh()
    variables = state.variables()
    fn = _encode_fn(model, stage, augment)
    key = jax.random.key(0) if key is None else key
    n_dev = mesh.devices.size
    batch_size = max(n_dev, batch_size - batch_size % n_dev)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded, n = parallel.pad_to_multiple(chunk, batch_size if len(images) > batch_size
                                             else n_dev)
        out.append(parallel.host_array(fn(variables, parallel.shard_batch(padded, mesh),
                                          jax.random.fold_in(key, start // batch_size)))[:n])
    feats = np.concatenate(out).astype(np.float32)
    if cache_key is not None:
        _remember(cache_key, images, feats)
    return feats


def encode_copies(model, state, images: np.ndarray, cfg, mesh=None, seed: int = 0) -> np.ndarray:
    """The training cache: the maps (:func:`encode`, at the cache stage of ``cfg``, the
    ``train`` block) of the images as they are and, with ``cfg.cache_copies`` = C > 1
    and ``cfg.augment`` > 0, of C - 1 colour-jittered copies (copy c jittered with
    ``fold_in(key(seed), c)``): [N, ...] or [C, N, ...], kept as one entry for the
    process's lifetime (every run of an experiment trains on the same copies). The
    encoder is frozen up to the cache, so the jitter that training from images would
    draw afresh each step is drawn C - 1 times, once."""
    stage = _cache_split(cfg)[0]
    plain = encode(model, state, images, mesh, stage=stage)
    copies = int(cfg.cache_copies or 1)
    if copies <= 1 or float(cfg.augment) <= 0:
        return plain
    cache_key = ("copies", copies, float(cfg.augment), int(seed),
                 *_cache_key(model, state, images, stage))
    if (hit := _remembered(cache_key, images)) is not None:
        return hit
    base = jax.random.key(seed)
    feats = np.stack([plain] + [encode(model, state, images, mesh, stage=stage,
                                       augment=float(cfg.augment),
                                       key=jax.random.fold_in(base, c))
                                for c in range(1, copies)])
    _remember(cache_key, images, feats)
    return feats


def train(ts: TrainSet, cfg, workdir: str, *, method: str, mesh=None, seed: int = 0,
          log=None) -> tuple[Any, Any]:
    """Trains (or resumes) one run in ``workdir``; returns ``(model, state)``.

    method: ``"mcss"`` (pose + multi-view loss) or ``"baseline"`` (pose only).
    cfg: the ``train`` block (an :class:`~nvsm_jax.mcss.settings.MCSSTrainConfig`, or a
    config block); its ``model`` / ``optim`` / ``multiview`` blocks are built
    as their dataclasses (:mod:`nvsm_jax.mcss.settings`; an unknown key is a ConfigError
    before any step). Checkpoints every ``cfg.save_every`` steps; metrics to
    ``metrics.jsonl``.
    """
    if method not in ("mcss", "baseline"):
        raise ValueError(f"method must be 'mcss' or 'baseline', got {method!r}")
    mesh = mesh or parallel.make_mesh()
    use_mv = method == "mcss"
    image_size = ts.images.shape[1:3]
    model, state = init_state(cfg, mesh, image_size, seed)
    ckpt = training.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=cfg.save_every)
    state = ckpt.restore_or(state)
    writer = training.MetricsWriter(workdir)
    step_fn = _cached_step(model, cfg, use_mv)
    start = int(jax.device_get(state.step))
    feats = encode_copies(model, state, ts.images, cfg, mesh, seed) \
        if uses_feature_cache(cfg) and start < cfg.steps else None
    mv = MultiviewConfig.from_config(cfg.multiview)
    batch_size = cfg.sup_batch + (mv.num_seqs * mv.num_times * mv.num_views if use_mv else 0)
    state = training.fit(         # each process gathers only its rows of each part
        state, step_fn, lambda s, _rows: _batch_for_step(ts, cfg, s, use_mv, seed, feats, mesh),
        mesh, training.StepRange(start, cfg.steps), seed=seed, batch_size=batch_size,
        log=training.LoopLog(writer, cfg.log_every, progress=cfg.progress,
                             desc=os.path.basename(workdir)), ckpt=ckpt)
    ckpt.close()
    if log and start < cfg.steps:
        last = writer.read()[-1]
        log(f"[{os.path.basename(workdir)}] step {last['step']}/{cfg.steps} " +
            " ".join(f"{k}={last[k]:.4f}" for k in ("loss", "loss_pose", "loss_mv") if k in last))
    return model, state


@functools.lru_cache(maxsize=None)
def _predict_fn(model, embedding: str = "head", from_features: bool = False,
                start_stage: int | None = None):
    def fn(variables, x):
        x = x if from_features else _prep(x)
        emb, pooled = model.apply(variables, x, train=False, from_features=from_features,
                                  start_stage=start_stage, method=model.embed)
        pose = model.apply(variables, emb, pooled, method=model.regress)
        if embedding == "features":
            emb = pooled / jnp.sqrt(jnp.sum(pooled * pooled, axis=-1, keepdims=True) + 1e-12)
        return emb, pose
    return jax.jit(fn)


def predict(model, state, images: np.ndarray, mesh=None, batch_size: int = 256,
            embedding: str = "head", from_features: bool = False,
            start_stage: int | None = None):
    """-> (emb [N, D], pose [N, 17, 3] mm) for uint8 images [N, H, W, 3] (or, with
    ``from_features``, their encoder maps from :func:`encode`: the tap maps, or with
    ``start_stage=k`` the output of encoder stage ``k - 1``, ``encode(...,
    stage=k - 1)``).

    embedding: ``"head"`` (the unit embedding the multi-view loss trains) or
    ``"features"`` (the unit-normalised pooled encoder features the regressor
    reads: the representation a supervised-only network actually learns).
    """
    if embedding not in ("head", "features"):
        raise ValueError(f"embedding must be 'head' or 'features', got {embedding!r}")
    if start_stage is not None and not from_features:
        raise ValueError("start_stage reads encoder maps: pass from_features=True")
    mesh = mesh or parallel.make_mesh()
    n_dev = mesh.devices.size
    fn = _predict_fn(model, embedding, bool(from_features),
                     None if start_stage is None else int(start_stage))
    variables = state.variables()
    embs, poses = [], []
    batch_size = max(n_dev, batch_size - batch_size % n_dev)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded, n = parallel.pad_to_multiple(chunk, batch_size if len(images) > batch_size else n_dev)
        e, p = fn(variables, parallel.shard_batch(padded, mesh))
        embs.append(parallel.host_array(e)[:n])
        poses.append(parallel.host_array(p)[:n] * 1000.0)
    return np.concatenate(embs), np.concatenate(poses)


def evaluate_poses(pred_mm: np.ndarray, gt_mm: np.ndarray) -> dict:
    """Mean MPJPE / N-MPJPE / PA-MPJPE (mm) over frames."""
    pred, gt = jnp.asarray(pred_mm, jnp.float32), jnp.asarray(gt_mm, jnp.float32)
    return {"mpjpe": float(jnp.mean(metrics.mpjpe(pred, gt))),
            "n_mpjpe": float(jnp.mean(metrics.n_mpjpe(pred, gt))),
            "pa_mpjpe": float(jnp.mean(metrics.pa_mpjpe(pred, gt)))}


def predict_frames(model, state, images: np.ndarray, cfg, mesh=None, embedding: str = "head"):
    """:func:`predict` through the encoder maps computed once where ``cfg`` (the
    ``train`` block) trains from them (:func:`feature_cache_stage`: the tap maps,
    or the last frozen stage's output), else from the images: (emb [N, D], pose
    [N, 17, 3] mm). Either way the same network, to float rounding."""
    if uses_feature_cache(cfg):
        stop, start = _cache_split(cfg)
        return predict(model, state, encode(model, state, images, mesh, stage=stop), mesh,
                       embedding=embedding, from_features=True, start_stage=start)
    return predict(model, state, images, mesh, embedding=embedding)


def bootstrap_train_set(model, state, ts: TrainSet, cfg, mesh=None
                        ) -> tuple[TrainSet, np.ndarray]:
    """The training set with every frame labelled, and the single-view predictions it
    came from ([N, 17, 3] mm): the true labels where there are any, elsewhere the
    multi-view pseudo-label of the model's predictions
    (:func:`nvsm_jax.mcss.fusion.pseudo_labels`: the views of each instant fused in
    one camera frame, the rotations between cameras from the labelled instants or
    the predictions; ``cfg.multiview_pseudo.fuse``: "median" or "mean" over views).
    Reads only images, synchronisation and the labelled poses."""
    pseudo = MultiviewPseudoConfig.from_config(cfg.multiview_pseudo)
    _, pred = predict_frames(model, state, ts.images, cfg, mesh)
    pose = fusion.pseudo_labels(pred / 1000.0, ts.seq_offset, ts.seq_views, ts.seq_frames,
                                ts.labelled_idx, ts.labelled_pose, how=pseudo.fuse)
    return dataclasses.replace(ts, labelled_idx=np.arange(len(ts.images)),
                               labelled_pose=pose.astype(np.float32)), pred


def mean_pose_prediction(ts: TrainSet, n: int) -> np.ndarray:
    """The constant predictor: the mean labelled training pose (mm), ``[n, 17, 3]``."""
    mean = ts.labelled_pose.mean(axis=0) * 1000.0
    return np.broadcast_to(mean, (n, *mean.shape)).astype(np.float32)
