"""Generic training machinery shared by the NeMo and MCSS trainers.

* :class:`TrainState`: flax ``TrainState`` (step, params, tx, opt_state) plus
  ``model_state`` (mutable collections such as ``batch_stats``) and ``aux`` (any
  pytree that moves with training, e.g. memory banks). One pytree: it is jitted,
  donated, sharded and checkpointed as a whole.
* :func:`create_replicated` (with :func:`state_initializer`): the one init
  path, ``jax.eval_shape`` then ``jit(init, out_shardings=replicated)`` so
  parameters are never built on one device and moved; compiled once per model.
* :func:`fit` (steps as a :class:`StepRange`, reporting as a :class:`LoopLog`):
  the one step loop (metrics, the multi-device CPU wait,
  checkpoints, progress, a stop at the first non-finite loss or gradient norm)
  every trainer runs; :func:`make_schedule`: the one
  warm-up + cosine/constant learning-rate builder; :func:`make_optimizer`: the one
  optimiser builder (that schedule, :func:`make_adamw`, :func:`freeze`).
* :func:`step_key`: ``fold_in(PRNGKey(seed), step)``; keys are never carried
  in state, so a resumed run draws the same numbers.
* :class:`Checkpointer`: a thin wrapper over orbax ``CheckpointManager``
  (StandardSave/StandardRestore); ``restore_or(state)`` resumes from the latest
  step if there is one.
* :class:`MetricsWriter`: JSON lines (``{"step": ..., **metrics}``) in the
  workdir, written by process 0 only.
* :func:`progress_bar` (tqdm on a terminal, else :class:`LogProgress` lines),
  :func:`heartbeat` (a line every few seconds during one long call),
  :func:`save_config`, :class:`Throughput`.

Example (a complete run)::

    init = state_initializer(model, optax.adam(1e-3), (1, 64, 64, 3))
    state = create_replicated(init, jax.random.key(seed), mesh, cache_key=(model, 64))
    ckpt = Checkpointer(workdir / "checkpoints", save_every=100)
    state = ckpt.restore_or(state)
    host_batch = lambda s, rows: {k: v[rows] for k, v in batch_for_step(s).items()}
    state = fit(state, train_step, host_batch, mesh, StepRange(int(state.step), num_steps),
                seed=seed, batch_size=32, log=LoopLog(MetricsWriter(workdir), every=50),
                ckpt=ckpt)
    ckpt.close()
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import flax
import optax
from flax.training import train_state

from nvsm_jax import parallel
from nvsm_jax.errors import InputError, NonFiniteError, RunStateError
from nvsm_jax.settings import OptimConfig, flatten, upgrade_record

__all__ = ["TrainState", "make_schedule", "replace_weights", "freeze", "stop_gradient_where",
           "create_replicated", "step_key", "Checkpointer", "MetricsWriter",
           "progress_bar", "LogProgress", "heartbeat", "save_config", "read_json", "write_atomic",
           "load_progress", "START_OVER",
           "ConfigMismatchError", "config_differences",
           "RESUME_FREE_KEYS", "Throughput", "make_adamw", "make_optimizer",
           "quiet_checkpoint_logs",
           "fit", "StepRange", "LoopLog", "state_initializer", "DIVERGENCE_HINT",
           "nonfinite_leaf"]


class TrainState(train_state.TrainState):
    """params + optimiser + ``model_state`` (mutable collections) + ``aux`` pytree."""

    model_state: Any = None
    aux: Any = None

    def variables(self, params=None):
        """``{"params": ..., **model_state}`` for ``module.apply``."""
        out = {"params": self.params if params is None else params}
        if self.model_state:
            out.update(self.model_state)
        return out

    def apply_train(self, params, inputs, *, is_frozen=None):
        """``apply_fn(variables(params), inputs, train=True)`` with the mutable
        collections updated -> ``(output, new model_state)``; with ``is_frozen``
        (a path predicate), those leaves get ``stop_gradient`` first, so the
        backward pass stops there (:func:`stop_gradient_where`). Call it inside a loss."""
        if is_frozen is not None:
            params = stop_gradient_where(params, is_frozen)
        mutable = list(self.model_state.keys()) if self.model_state else False
        out = self.apply_fn(self.variables(params), inputs, train=True, mutable=mutable)
        return out if mutable else (out, self.model_state)

    def checkpoint_tree(self):
        """The array pytree that is saved (no apply_fn / tx)."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state,
                "model_state": self.model_state, "aux": self.aux}

    def restore_tree(self, tree) -> "TrainState":
        return self.replace(step=tree["step"], params=tree["params"],
                            opt_state=tree["opt_state"], model_state=tree["model_state"],
                            aux=tree["aux"])


def replace_weights(state: TrainState, params, model_state=None, *,
                    subtree: str | None = None) -> TrainState:
    """A TrainState whose params (and matching ``model_state`` collections) are replaced.

    params / model_state: trees shaped like ``state.params`` / ``state.model_state``
    (or, with ``subtree``, holding at least that top-level entry, e.g.
    ``"encoder"``: only it is copied). Structures and shapes must match
    (ValueError naming the entry); each leaf keeps the sharding of the leaf it
    replaces. The optimiser state is untouched (Adam's moments are zeros at
    step 0, whatever the params are).
    """
    def place(new, old, where):
        new_s = jax.tree_util.tree_structure(new)
        old_s = jax.tree_util.tree_structure(old)
        if new_s != old_s:
            raise ValueError(f"{where} do not match the model: {new_s} vs {old_s}")

        def put(n, o):
            n = np.asarray(n)
            if n.shape != o.shape:
                raise ValueError(f"{where}: shape {n.shape} != model's {o.shape}")
            n = n.astype(o.dtype)
            return jax.device_put(n, o.sharding) if isinstance(o, jax.Array) else n

        return jax.tree_util.tree_map(put, new, old)

    new_params = flax.core.unfreeze(state.params)
    src = flax.core.unfreeze(params)
    if subtree is None:
        new_params = place(src, new_params, "params")
    else:
        new_params = dict(new_params)
        new_params[subtree] = place(src[subtree], new_params[subtree], f"params[{subtree!r}]")
    state = state.replace(params=new_params)
    ms = state.model_state
    if ms and model_state:
        ms = dict(ms)
        for col, tree in ms.items():
            if col in model_state:
                src_col = model_state[col]
                if subtree is None:
                    ms[col] = place(src_col, tree, col)
                elif subtree in src_col:
                    t = dict(tree)
                    t[subtree] = place(src_col[subtree], tree[subtree], f"{col}[{subtree!r}]")
                    ms[col] = t
        state = state.replace(model_state=ms)
    return state


def make_schedule(lr: float, num_steps: int, *, warmup_steps: int = 0,
                  final_lr_fraction: float = 0.05, kind: str = "cosine"):
    """The learning-rate schedule every trainer uses.

    ``"cosine"``: linear warm-up from 0 over ``warmup_steps`` (at least 1, at most
    ``num_steps - 1``), then cosine decay to ``lr * final_lr_fraction`` at
    ``num_steps``; ``"constant"``: ``lr``.
    """
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, max(1, min(int(warmup_steps), int(num_steps) - 1)), max(int(num_steps), 2),
            end_value=lr * final_lr_fraction)
    if kind == "constant":
        return optax.constant_schedule(lr)
    raise ValueError(f"unknown lr schedule {kind!r}: expected 'cosine' or 'constant'")


def make_adamw(learning_rate, weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999,
               grad_clip: float | None = None, decoupled: bool = False):
    """Adam with weight decay and optional global-norm clipping.

    ``decoupled=False`` adds ``weight_decay * params`` to the gradient before
    Adam (torch ``Adam(weight_decay=...)``, what NeMo used); ``True`` is AdamW.
    learning_rate: a float or an optax schedule.
    """
    parts = []
    if grad_clip:
        parts.append(optax.clip_by_global_norm(grad_clip))
    if weight_decay and not decoupled:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2))
    if weight_decay and decoupled:
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)


def make_optimizer(optim: OptimConfig, num_steps: int,
                   frozen: Callable[[tuple[str, ...]], bool] | None = None):
    """The optimiser every trainer uses: ``(tx, schedule)`` of an ``optim`` block.

    schedule: :func:`make_schedule` (``optim.lr`` over ``num_steps``, its
    ``warmup_steps``, ``final_lr_fraction`` and ``schedule`` kind); tx:
    :func:`make_adamw` over it (``weight_decay``, Adam's ``b1`` / ``b2``,
    ``grad_clip``, ``decoupled``), wrapped in :func:`freeze` when ``frozen`` (a path
    predicate, e.g. ``backbone.frozen_encoder_filter``) is given.
    """
    schedule = make_schedule(optim.lr, num_steps, warmup_steps=optim.warmup_steps,
                             final_lr_fraction=optim.final_lr_fraction, kind=optim.schedule)
    tx = make_adamw(schedule, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2,
                    grad_clip=optim.grad_clip, decoupled=optim.decoupled)
    return (tx if frozen is None else freeze(tx, frozen)), schedule


def _key_names(path) -> tuple[str, ...]:
    """A pytree key path as its dict key names, e.g. ``("encoder", "conv_stem", "kernel")``."""
    return tuple(getattr(k, "key", str(k)) for k in path)


def freeze(tx: optax.GradientTransformation, is_frozen: Callable[[tuple[str, ...]], bool]
           ) -> optax.GradientTransformation:
    """``tx`` for the params where ``is_frozen(path)`` is False; zero updates (no
    weight decay, no optimiser state) for the others. path: the param's key names,
    e.g. ``("encoder", "blocks_3", "expand_conv", "kernel")``."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if is_frozen(_key_names(path)) else "train", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def stop_gradient_where(params, is_frozen: Callable[[tuple[str, ...]], bool]):
    """``params`` with ``lax.stop_gradient`` on the leaves where ``is_frozen(path)``:
    inside a loss, the backward pass then stops there (XLA drops the frozen layers'
    weight gradients, and everything before them that only they needed)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.stop_gradient(x) if is_frozen(_key_names(path)) else x, params)


_INITIALIZERS: dict = {}


def create_replicated(init_fn: Callable[[jax.Array], Any], key, mesh, *, cache_key=None):
    """Builds ``init_fn(key)`` directly replicated on ``mesh``: the one init path.

    ``jax.eval_shape`` first (no compute) to learn the structure, then
    ``jit(init_fn, out_shardings=replicated)``. Non-array leaves of the result
    (e.g. a TrainState's ``tx``) are static fields, untouched.

    cache_key: a hashable naming everything ``init_fn`` closes over (model,
      optimiser settings, input shape; not the seed, which is ``key``). The
      compiled initialiser is then kept per ``(cache_key, mesh)``: compiling it
      costs more than a tiny training run, so resumes, seeds and tests pay it
      once. The key is an argument, never a baked-in constant, so every call
      returns fresh buffers that a donated train step may consume.
    """
    cached = None if cache_key is None else _INITIALIZERS.get((cache_key, mesh))
    if cached is None:
        abstract = jax.eval_shape(init_fn, key)
        shardings = jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), abstract)
        cached = jax.jit(init_fn, out_shardings=shardings)
        if cache_key is not None:
            if len(_INITIALIZERS) >= 32:
                _INITIALIZERS.pop(next(iter(_INITIALIZERS)))
            _INITIALIZERS[(cache_key, mesh)] = cached
    return cached(key)


def state_initializer(model, tx: optax.GradientTransformation, sample_shape, *,
                      aux_fn: Callable[[jax.Array], Any] | None = None):
    """``init(key) -> TrainState`` of a Flax model: ``model.init`` on zeros of
    ``sample_shape`` (e.g. ``(1, H, W, 3)``, called with ``train=False``), its
    non-``params`` collections as ``model_state`` (``{}`` if none) and, with
    ``aux_fn``, ``aux = aux_fn(k_aux)`` (e.g. a memory bank), where
    ``k_model, k_aux = split(key)``; without it the model draws from ``key`` itself.
    Pass the result to :func:`create_replicated`."""

    def init(key):
        k_model, k_aux = jax.random.split(key) if aux_fn is not None else (key, None)
        variables = dict(model.init(k_model, jnp.zeros(sample_shape, jnp.float32), train=False))
        params = variables.pop("params")
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  model_state=variables,
                                  aux=None if aux_fn is None else aux_fn(k_aux))
        # a strong int32 step, as a restored checkpoint has: a resumed run then reuses
        # the compiled train step instead of compiling it again for a weak-typed step
        return state.replace(step=jnp.zeros((), jnp.int32))

    return init


def step_key(seed_or_key, step) -> jax.Array:
    """``fold_in(key(seed), step)``: the randomness of one step."""
    key = (jax.random.key(seed_or_key) if isinstance(seed_or_key, (int, np.integer))
           else seed_or_key)
    return jax.random.fold_in(key, step)


class _DropClosedEventLoopNoise:
    """``sys.unraisablehook`` wrapper: drops ``RuntimeError('Event loop is closed')``.

    When orbax fails to read a damaged checkpoint, ``asyncio.run`` closes its loop
    while tensorstore reads are still pending; each read that then completes calls
    ``loop.call_soon_threadsafe`` on the closed loop and Python prints the
    RuntimeError as "Exception ignored in ..." (hundreds of lines for a real model)
    before and after the one error that matters, which :meth:`Checkpointer.restore`
    raises. Everything else goes to the previous hook.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable):
        exc = getattr(unraisable, "exc_value", None)
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        self.previous(unraisable)


def _drop_closed_event_loop_noise() -> None:
    """Installs :class:`_DropClosedEventLoopNoise` once (idempotent)."""
    import sys

    if not isinstance(sys.unraisablehook, _DropClosedEventLoopNoise):
        sys.unraisablehook = _DropClosedEventLoopNoise(sys.unraisablehook)


def nonfinite_leaf(tree) -> str | None:
    """The path (``jax.tree_util.keystr``) of the first float leaf of ``tree`` (host or
    device arrays) holding a NaN or an infinity, or None when all are finite."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        try:
            inexact = dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
        except TypeError:                       # extended dtypes (PRNG keys)
            inexact = False
        if inexact and not np.all(np.isfinite(np.asarray(leaf))):
            return jax.tree_util.keystr(path)
    return None


class Checkpointer:
    """orbax ``CheckpointManager`` over a :class:`TrainState` (or any pytree).

    directory: where the step folders go; save_every: steps between saves
    (``maybe_save(..., force=True)`` saves regardless, e.g. at the end);
    max_to_keep: how many to keep. Saving is asynchronous;
    :meth:`wait` / :meth:`close` block until written.
    """

    def __init__(self, directory, save_every: int = 1000, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True))

    @staticmethod
    def _tree(state):
        return state.checkpoint_tree() if isinstance(state, TrainState) else state

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Saves ``state`` at ``step``. The tree is fetched to host first: it is
        replicated (one copy per device would otherwise be sliced and written
        per array, which costs seconds for a small model on 8 CPU devices).
        A tree with a non-finite float is refused (:class:`NonFiniteError`, its
        ``leaf`` attribute names the entry): a diverged state is never saved."""
        tree = jax.device_get(self._tree(state))
        leaf = nonfinite_leaf(tree)
        if leaf is not None:
            err = NonFiniteError(f"{self.directory}: step {int(step)} not saved: {leaf} holds "
                                 "non-finite values")
            err.leaf = leaf
            raise err
        self.manager.save(int(step), args=self._ocp.args.StandardSave(tree), force=True)

    def due(self, step: int, force: bool = False) -> bool:
        """Whether :meth:`maybe_save` saves at ``step``: a multiple of ``save_every``,
        or ``force``."""
        return force or (self.save_every > 0 and step % self.save_every == 0)

    def maybe_save(self, step: int, state, force: bool = False) -> bool:
        """Saves when ``step`` is a multiple of ``save_every`` (or ``force``)."""
        if self.due(step, force):
            if self.manager.latest_step() != int(step):
                self.save(step, state)
            return True
        return False

    def restore(self, state, step: int | None = None):
        """Restores ``step`` (default latest) into the structure/shardings of ``state``."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if int(step) not in self.manager.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no checkpoint of step {step} (saved steps: "
                f"{sorted(self.manager.all_steps())}); the run's progress record points at a "
                "checkpoint that is gone: restore it, or start the run over in a new workdir")
        ref = self._tree(state)
        target = jax.tree_util.tree_map(
            lambda x: np.zeros(x.shape, x.dtype) if hasattr(x, "shape") else x, ref)
        _drop_closed_event_loop_noise()       # a damaged file: only the error below
        try:
            tree = self.manager.restore(step, args=self._ocp.args.StandardRestore(target))
        except (ValueError, KeyError, OSError, FileNotFoundError) as err:
            raise ValueError(
                f"{os.path.join(self.directory, str(step))}: cannot restore this checkpoint "
                f"({type(err).__name__}: {str(err)[:300]}); it is damaged or from another "
                "model. Delete that step folder to resume from an earlier one, or start over "
                "in a new workdir") from err
        # back onto the devices with the shardings of ``state``
        tree = jax.tree_util.tree_map(
            lambda t, x: jax.device_put(t, x.sharding) if isinstance(x, jax.Array)
            else jnp.asarray(t), tree, ref)
        return state.restore_tree(tree) if isinstance(state, TrainState) else tree

    def restore_or(self, state):
        """The latest checkpoint restored into ``state``'s structure, or ``state`` itself."""
        return state if self.manager.latest_step() is None else self.restore(state)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` JSON lines to ``workdir/filename`` (process 0),
    and the scalar metrics as TensorBoard summaries under
    ``workdir/tensorboard/<filename stem>/`` (``tensorboard --logdir WORKDIR``).
    The event file is flushed after every write, so a killed run keeps its curves.
    A resumed run first drops the lines it will replay (:meth:`discard_after`)."""

    def __init__(self, workdir, filename: str = "metrics.jsonl", tensorboard: bool = True):
        self.path = os.path.join(os.fspath(workdir), filename)
        self.enabled = parallel.is_main_process()
        self._tb_dir = os.path.join(os.fspath(workdir), "tensorboard",
                                    os.path.splitext(os.path.basename(filename))[0])
        self._tb = None
        self._use_tb = tensorboard
        if self.enabled:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def _summary_writer(self):
        if self._tb is None and self._use_tb:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._tb_dir, flush_secs=10 ** 6)
        return self._tb

    def write(self, step: int, **metrics) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(jax.device_get(v))
            row[k] = v.item() if v.size == 1 else v.tolist()
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        tb = self._summary_writer()
        if tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) \
                        and np.isfinite(v):
                    tb.add_scalar(k, v, int(step))
            tb.flush()

    def discard_after(self, step: int) -> int:
        """Drops the lines of steps after ``step`` (and a line cut short by a kill); returns
        how many went. A run resumed from the checkpoint of ``step`` replays the steps
        after it and writes their lines again: :func:`fit` calls this first, so every
        step keeps one line, the one of the run that got past it. The file is rewritten
        atomically (a temporary file, then ``os.replace``); process 0 only."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue                        # a write cut short by a kill
            if not (isinstance(row, dict) and isinstance(row.get("step"), int)
                    and row["step"] > step):
                keep.append(line if line.endswith("\n") else line + "\n")
        dropped = len(lines) - len(keep)
        if dropped:
            write_atomic(self.path, lambda f: f.writelines(keep))
            logging.getLogger(__name__).info(
                "%s: dropped %d line(s) after step %d (the resumed run writes them again)",
                self.path, dropped, step)
        return dropped

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def read(self) -> list[dict]:
        """The lines written so far. A last line cut short by a kill is left out; a
        damaged line before it raises RunStateError naming the file and the line."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                if i == len(lines) - 1 and not line.endswith("\n"):
                    break                       # a write cut short by a kill
                raise RunStateError(f"{self.path}: line {i + 1} is damaged ({err.msg}); "
                                    "delete that line to go on") from err
        return rows


class LogProgress:
    """Progress as one ``logging`` line every ``interval`` seconds (and at the end):
    ``desc: 40/200 (20%), 12 s, 3.3/s, about 48 s left, loss=0.912``. For logs that
    are not a terminal (SLURM files, notebooks, pipes), where tqdm's ``\\r`` updates
    pile up into one long line. The first item's line comes as soon as it took
    ``interval`` (a first call that compiles). Without any logging handler
    configured (a plain notebook) the lines go to stderr."""

    def __init__(self, iterable: Iterable, total: int | None = None, initial: int = 0,
                 desc: str = "train", interval: float = 5.0):
        self.iterable, self.desc, self.interval = iterable, desc, interval
        if total is None and hasattr(iterable, "__len__"):
            total = initial + len(iterable)
        self.total, self.initial, self.postfix = total, initial, {}

    def set_postfix(self, **values) -> None:
        """Values appended to the next lines (as tqdm's ``set_postfix``)."""
        self.postfix = values

    def line(self, n: int, seconds: float) -> str:
        """The text of the line after item ``n`` (counting from ``initial``)."""
        done = n - self.initial
        rate = done / seconds if seconds > 0 else 0.0
        text = f"{self.desc}: {n}"
        if self.total:
            text += f"/{self.total} ({100.0 * n / self.total:.0f}%)"
        text += f", {seconds:.0f} s, {rate:.3g}/s"
        if self.total and 0 < rate and n < self.total:
            text += f", about {(self.total - n) / rate:.0f} s left"
        return text + "".join(f", {k}={v}" for k, v in self.postfix.items())

    def __iter__(self):
        emit = _emitter()
        n, start = self.initial, time.monotonic()
        last = start
        current = {"what": None, "since": start}      # the item running now, for the beat
        stop = threading.Event()

        def beat():                                   # one thread for the whole loop
            told = None
            while not stop.wait(min(0.5, HEARTBEAT_SECONDS / 4)):
                what, since = current["what"], current["since"]
                now = time.monotonic()
                if what is not None and now - since >= HEARTBEAT_SECONDS and (
                        told is None or now - told >= HEARTBEAT_SECONDS):
                    emit(f"{what}: still running, {now - since:.0f} s")
                    told = now

        thread = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
        thread.start()
        try:
            for item in self.iterable:
                current["what"] = f"{self.desc}: {n + 1}/{self.total or '?'}"
                current["since"] = time.monotonic()
                yield item
                current["what"] = None
                n += 1
                now = time.monotonic()
                if now - last >= self.interval or (self.total and n == self.total):
                    emit(self.line(n, now - start))
                    last = now
        finally:
            stop.set()
            thread.join()


def _emitter() -> Callable[[str], None]:
    """``log.info``, or a stderr line when no logging handler is configured (a plain
    notebook, where INFO records would be dropped)."""
    if logging.getLogger().handlers:
        return logging.getLogger(__name__).info
    return lambda msg: print(msg, file=sys.stderr, flush=True)


#: Seconds of one call without output after which :func:`heartbeat` (and the progress
#: lines' beat) says it is still running.
HEARTBEAT_SECONDS = 8.0


@contextlib.contextmanager
def heartbeat(what: str, every: float = HEARTBEAT_SECONDS):
    """Logs ``<what>: still running, 16 s`` every ``every`` seconds while the block
    runs: one long call (a compilation) that no progress line can report."""
    emit, stop, start = _emitter(), threading.Event(), time.monotonic()

    def beat():
        while not stop.wait(every):
            emit(f"{what}: still running, {time.monotonic() - start:.0f} s")

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def progress_bar(iterable: Iterable, total: int | None = None, initial: int = 0,
                 desc: str = "train", disable: bool | None = None):
    """Progress over ``iterable``: tqdm when stderr is a terminal, else a
    :class:`LogProgress` line every 5 s; hidden (the bare iterable) on non-main
    processes or when ``disable``."""
    if disable is None:
        disable = not parallel.is_main_process()
    if disable:
        return iterable
    if not getattr(sys.stderr, "isatty", lambda: False)():
        return LogProgress(iterable, total=total, initial=initial, desc=desc)
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True,
                mininterval=2.0)


class _DropCheckpointInfo(logging.Filter):
    """Drops orbax's INFO records (a dozen lines per save); keeps its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_checkpoint_logs() -> None:
    """Lets binaries log at INFO without orbax's per-save chatter (idempotent)."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _DropCheckpointInfo) for f in handler.filters):
        handler.addFilter(_DropCheckpointInfo())


# Keys that may change between a run and its resumption: they choose what is
# evaluated, logged or added (the few-shot experiment's cells), not what is trained.
RESUME_FREE_KEYS = ("eval_limit", "eval_batch_size", "eval_occlusions", "eval_at_end",
                    "eval_every_round", "log_every", "num_devices", "checkpoint_every",
                    "keep_checkpoints", "test_root", "methods", "annotations", "categories",
                    "restart", "results_dir")


class ConfigMismatchError(InputError):
    """A workdir holds a run made with another config."""


def _config_text(config) -> str:
    """JSON of an ml_collections config, a typed config (a DataclassConfig) or a dict."""
    if hasattr(config, "to_json_best_effort"):
        return config.to_json_best_effort(indent=2)
    if dataclasses.is_dataclass(config):
        config = config.to_dict()
    return json.dumps(config, indent=2, default=str) if isinstance(config, dict) else str(config)


def config_differences(old: dict, new: dict, free_keys=RESUME_FREE_KEYS) -> list[str]:
    """``"key: old -> new"`` for every dotted key that differs outside ``free_keys``
    (a record of an earlier version read in today's names: :func:`upgrade_record`)."""
    a, b = (upgrade_record(flatten(x)) for x in (old, new))
    free = lambda k: any(k == f or k.startswith(f + ".") for f in free_keys)  # noqa: E731
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if not free(k) and a.get(k) != b.get(k)]


def save_config(config, workdir, filename: str = "config.json", *,
                free_keys=RESUME_FREE_KEYS, has_work: bool = True) -> str:
    """Writes a config (ml_collections or typed; JSON, best effort) as the run's record.

    If ``workdir`` already holds ``filename`` from a run with a different config
    (outside ``free_keys``), raises :class:`ConfigMismatchError` naming every
    differing key, before anything is overwritten: resuming it with another model
    or schedule would mix two runs. With ``config.restart`` set, the workdir's
    previous files (all but a generated ``data/`` folder) move to
    ``replaced-<UTC time>/`` first and the run starts over; nothing is deleted.
    ``has_work=False`` (the caller found no checkpoint and no finished result there,
    :func:`nvsm_jax.nemo.train.holds_work`: the run failed before any work) does the same
    without ``restart``, so a failed run never blocks its corrected rerun.
    """
    workdir = os.fspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, filename)
    text = _config_text(config)
    if os.path.exists(path) and parallel.is_main_process():
        try:
            with open(path) as f:
                old = json.load(f)
            diffs = config_differences(old, json.loads(text), free_keys)
        except (json.JSONDecodeError, OSError, TypeError, ValueError) as err:
            diffs = [f"<{path} unreadable: {err}>"]
        restart = bool(config.get("restart") if hasattr(config, "get")
                       else getattr(config, "restart", False))
        if diffs and not restart and has_work:
            shown = "; ".join(diffs[:12]) + (f"; ... ({len(diffs)} keys)" if len(diffs) > 12 else "")
            raise ConfigMismatchError(
                f"{path}: this workdir holds a run with another config ({shown}). Rerun with "
                "the same config, use a new --workdir, or pass --config.restart=True to move "
                "the old run aside and start over")
        if diffs:
            aside = os.path.join(workdir, time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime()))
            os.makedirs(aside)
            from nvsm_jax.workdir_lock import LOCK_FILE     # the running hold stays
            for name in os.listdir(workdir):
                if name not in ("data", LOCK_FILE) and not name.startswith("replaced-"):
                    os.replace(os.path.join(workdir, name), os.path.join(aside, name))
            logging.getLogger(__name__).warning("config changed (%s): the previous run moved to %s",
                                                "; ".join(diffs[:5]), aside)
    if parallel.is_main_process():
        write_atomic(path, lambda f: f.write(text))
    parallel.sync("save_config")    # no process goes on before process 0 checked the record
    return path


def write_atomic(path, write: Callable[[Any], None], *, binary: bool = False,
                 fsync: bool = False, suffix: str = ".tmp") -> None:
    """Fills ``path`` through ``path + suffix``: ``write(f)`` writes the open temporary
    file (text, or ``binary``), then ``os.replace`` puts it in place, so a kill leaves
    the old file or the new one, never a torn one. ``fsync``: the data reach the disk
    before the replace."""
    tmp = os.fspath(path) + suffix
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, what: str, recover: str):
    """``json.load`` of a run-state file, or a RunStateError naming the file, what it
    records and how to recover (instead of a bare JSONDecodeError)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else ""
        raise RunStateError(f"{path}: the {what} is damaged ({getattr(err, 'msg', err)}"
                            f"{where}); {recover}") from err


#: How to start an NVSM run over in its workdir (the run-state files go together).
START_OVER = ("delete it to restart the NVSM run from round 0 (and with it checkpoints/, "
               "pseudo_labels/ and rounds.jsonl), or restore it")


def load_progress(workdir) -> dict | None:
    """``{"round": r, "step": s}`` of the last finished round (with ``"stopped": True``
    when the run ended there before ``num_rounds``: nothing new passed, or the pool was
    used up), or None. A damaged ``progress.json`` raises RunStateError naming it.

    The NVSM round loop writes it (:mod:`nvsm_jax.nvsm.run_state`); it lives here, in the
    core, because an evaluation of any workdir reads where its run ended."""
    path = os.path.join(os.fspath(workdir), "progress.json")
    if not os.path.exists(path):
        return None
    done = read_json(path, "record of the last finished NVSM round", START_OVER)
    if not (isinstance(done, dict) and {"round", "step"} <= set(done)
            and all(type(done[k]) is int and done[k] >= 0 for k in ("round", "step"))):
        raise RunStateError(f"{path}: expected {{'round': r, 'step': s}} (integers >= 0), got "
                            f"{done!r}; {START_OVER}")
    return done


class Throughput:
    """Images per second between calls of :meth:`tick` (wall clock)."""

    def __init__(self):
        self.last = time.perf_counter()

    def tick(self, num_items: int) -> float:
        now = time.perf_counter()
        rate = num_items / max(now - self.last, 1e-9)
        self.last = now
        return rate


#: What :func:`fit`'s divergence error suggests checking, unless the trainer passes its own.
DIVERGENCE_HINT = ("check the learning rate (too high or not finite), the loss's temperature "
                   "or scale, and the data or initial weights (non-finite values)")


@jax.jit
def _note_nonfinite(carry, loss, grad_norm):
    """The first steps with a non-finite loss / gradient norm, carried on the device.

    carry: int32 [3], the first step of each (loss, grad_norm), -1 while there is none,
    then the last step counted (the counter lives here, so a step costs no host-to-device
    copy); loss, grad_norm: any shape -> the carry after one more step, int32 [3].
    """
    step = carry[2] + 1
    bad = jnp.stack([~jnp.all(jnp.isfinite(loss)), ~jnp.all(jnp.isfinite(grad_norm))])
    return jnp.concatenate([jnp.where((carry[:2] < 0) & bad, step, carry[:2]), step[None]])


def _diverged(what: str, step: int, ckpt: "Checkpointer | None", hint: str) -> NonFiniteError:
    """The error of a diverged training: the step, the last checkpoint kept, ``hint``."""
    if ckpt is None:
        kept = "this loop keeps no checkpoints"
    else:
        ckpt.wait()                             # the last save is complete on disk
        last = ckpt.latest_step()
        kept = ("no finite checkpoint was saved" if last is None else
                f"the last finite checkpoint, step {last}, is kept in "
                f"{os.path.join(ckpt.directory, str(last))}")
    return NonFiniteError(f"training diverged: non-finite {what} at step {step}; {kept}. "
                          f"{hint}")


@dataclasses.dataclass(frozen=True)
class StepRange:
    """The global steps one :func:`fit` call runs, ``start .. end - 1``, of a run whose
    last step is ``total`` (default ``end``; e.g. a resumed run's, or the round's of an
    NVSM M-step): the progress bar's total and a checkpoint always saved."""

    start: int
    end: int
    total: int | None = None


@dataclasses.dataclass(frozen=True)
class LoopLog:
    """How :func:`fit` reports: a line of metrics to ``writer`` every ``every`` steps
    and at the loop's end, each with the constant fields ``extra`` (e.g. the NVSM
    round); a progress bar named ``desc`` (without one, a heartbeat while the first
    step compiles)."""

    writer: "MetricsWriter"
    every: int
    progress: bool = True
    desc: str = "train"
    extra: dict | None = None


def fit(state, train_step, host_batch: Callable[[int, slice], dict], mesh, steps: StepRange, *,
        seed, batch_size: int, log: LoopLog, ckpt: "Checkpointer | None" = None,
        hint: str = DIVERGENCE_HINT):
    """The step loop every trainer shares: global steps ``steps.start .. steps.end - 1``.

    host_batch(step, rows) -> dict of host arrays holding only the rows ``rows`` of
    the step's global batch: ``rows`` is the slice of ``0 .. batch_size`` this
    process feeds (:func:`nvsm_jax.parallel.process_rows`; one process: all rows),
    so each process reads only its share; sharded here over ``mesh``'s data axis.
    A caller that builds the whole batch slices it
    (``{k: v[rows] for k, v in whole(step).items()}``).
    train_step(state, batch, key) -> (state, metrics), keyed by ``step_key(seed, step)``.
    On a multi-device CPU mesh at most one step is in flight
    (:func:`nvsm_jax.parallel.wait_if_cpu_collectives`).
    Writes metrics (plus images/s and ``log.extra``) to ``log.writer`` every
    ``log.every`` steps and at ``steps.end`` (:class:`LoopLog`). With ``ckpt``, saves
    checkpoints on its schedule and always at ``steps.total`` (the run's last step;
    default ``steps.end``); the caller closes it. ``steps.total`` is also the
    progress bar's total. Lines of ``log.writer`` after ``steps.start`` (a killed
    run's, replayed now) are dropped first.

    Divergence: the first step whose ``metrics["loss"]`` or ``metrics["grad_norm"]``
    is non-finite is tracked on the device (no per-step host sync) and read at every
    log step and before every checkpoint save; then :class:`NonFiniteError` names
    that step (steps count from 1, as in ``metrics.jsonl`` and the checkpoints), the
    last checkpoint kept and ``hint``. No checkpoint of that step or later is saved,
    nor any state with a non-finite value (:meth:`Checkpointer.save`).
    """
    start, end = steps.start, steps.end
    num_steps = end if steps.total is None else steps.total
    writer, log_every, progress, desc = log.writer, log.every, log.progress, log.desc
    extra = dict(log.extra or {})
    timer = Throughput()
    since = 0
    if start < end:
        writer.discard_after(start)
    loop = range(start, end)
    if progress:
        loop = progress_bar(loop, total=num_steps, initial=start, desc=desc)
    rows = parallel.process_rows(batch_size, mesh)
    carry = np.array([-1, -1, start], np.int32)   # first non-finite loss, grad_norm; step

    def stop_if_diverged():
        bad = np.asarray(jax.device_get(carry))[:2]
        if (bad >= 0).any():
            k = int(bad[bad >= 0].min())
            what = " and ".join(n for n, b in zip(("loss", "gradient norm"), bad) if b == k)
            raise _diverged(what, k, ckpt, hint)

    for s in loop:
        batch = parallel.shard_batch(host_batch(s, rows), mesh, process_local=True)
        if s == start and not progress:     # the progress bar beats for itself
            with heartbeat(f"{desc}: step {s + 1} (the first call compiles)",
                           every=HEARTBEAT_SECONDS):
                state, metrics = train_step(state, batch, step_key(seed, s))
                jax.block_until_ready(metrics)
        else:
            state, metrics = train_step(state, batch, step_key(seed, s))
        carry = _note_nonfinite(carry, metrics.get("loss", 0.0), metrics.get("grad_norm", 0.0))
        parallel.wait_if_cpu_collectives((state, metrics), mesh)
        since += batch_size
        if (s + 1) % log_every == 0 or s + 1 == end:
            metrics = jax.device_get(metrics)
            writer.write(s + 1, **extra, images_per_s=timer.tick(since), **metrics)
            since = 0
            if progress and hasattr(loop, "set_postfix"):
                loop.set_postfix(loss=f"{float(metrics['loss']):.3f}")
            stop_if_diverged()
        if ckpt is not None and ckpt.due(s + 1, force=(s + 1 == num_steps)):
            stop_if_diverged()
            try:
                ckpt.maybe_save(s + 1, state, force=True)
            except NonFiniteError as err:       # finite loss, non-finite update (lr = nan)
                raise _diverged(f"weights ({getattr(err, 'leaf', '?')})", s + 1, ckpt,
                                hint) from err
    return state
