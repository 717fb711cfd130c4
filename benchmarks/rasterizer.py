"""Rasteriser throughput (frames/s), compile time and peak memory.

    python -m benchmarks.rasterizer --json runs/bench/rasterizer.json
    python -m benchmarks.rasterizer --quick           # two small rows (smoke test)
    python -m benchmarks.rasterizer --peer jaxrenderer --json runs/bench/rasterizer_peer.json

Scene: a NeMo-style grid-faced cuboid (extent 1.0 x 0.5 x 0.4; 1,996 or 500
faces) at distance 5 under random poses (azimuth uniform, elevation in
[-10, 40] deg, theta in [-10, 10] deg), NeMo camera convention
(``nvsm_jax.geometry``) with focal ``500 * W / 128`` px so that the object
spans ~60-80 % of the image width.

Modes (one record per row; ``frames_per_s = poses / median seconds per call``):

* ``fwd``: ``interpolate(rasterize(verts), faces, attrs)`` -> ``[P, H, W, C]``.
* ``grad``: ``value_and_grad`` of ``mean(features ** 2)`` w.r.t. the screen verts.
* ``soft``: ``soft_rasterize(..., vertex_attrs, SoftSettings(top_k=8))`` (silhouette +
  attributes).
* ``score``: NeMo's render-and-compare loss of every pose from a folded score
  table (``interpolate_score``), as in the 144-pose initial grid search.
* ``fwd_cull``: ``fwd`` with ``cull_backfaces=True`` (exact for this closed mesh).
* ``score_grad``: ``value_and_grad`` of the summed ``score`` loss w.r.t. the screen
  verts: the rasteriser's share of one NeMo refinement step (forward + backward).
  :func:`score_fwd_bwd_frames_per_s` is the same measurement on a caller's scene
  (``benchmarks.pose_solver`` uses it for ``solver_efficiency``).

Each row runs in a fresh subprocess, so ``peak_rss_mb`` is that row's process
peak. The first record is the machine's float32 matmul rate
(``name: "matmul_gflops"``). ``--peer jaxrenderer`` runs three ``fwd`` rows
(one with ``--quick``), installs jaxrenderer (jax<0.5, numpy<2, plus a
one-line monkeypatch for its ``jax_array`` config flag) into
``benchmarks/.peers/jaxrenderer`` and times it on the same mesh, image size
and pose batch, rasterising precomputed clip-space vertices and interpolating
the same C-channel vertex attributes (``name: "jaxrenderer"``; our records
get ``speedup_vs_peer``).
Timings on a shared 2-core machine are noisy: records carry the 1-minute
load average and the CPU seconds per call next to the wall-clock median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks import common

FACES = {500: (10, 5, 5), 2000: (20, 11, 9)}
PEER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".peers", "jaxrenderer")
PEER_REQUIREMENTS = ["jax[cpu]<0.5", "numpy<2", "jaxrenderer"]


def _row(image, faces, poses, channels, mode, repeats=5):
    return dict(image=[image, image], faces=faces, poses=poses, channels=channels, mode=mode,
                repeats=repeats)


def full_rows():
    rows = []
    for image in (64, 128):
        for faces in (500, 2000):
            for poses in (16, 64):
                rows.append(_row(image, faces, poses, 16, "fwd"))
    rows += [_row(128, 2000, 16, 128, "fwd"), _row(64, 2000, 64, 128, "fwd"),
             _row(128, 2000, 64, 16, "fwd_cull"),
             _row(64, 500, 16, 16, "grad"), _row(128, 2000, 16, 16, "grad"),
             _row(128, 2000, 64, 16, "grad"),
             _row(64, 500, 16, 16, "soft", repeats=3), _row(128, 2000, 16, 16, "soft", repeats=3),
             dict(_row(128, 2000, 144, 16, "fwd"), grid="nemo"),
             dict(_row(128, 2000, 144, 128, "score"), grid="nemo"),
             _row(16, 2000, 8, 128, "score_grad", repeats=20)]
    return rows


def quick_rows():
    return [_row(64, 500, 16, 16, "fwd", repeats=3), _row(64, 500, 16, 16, "grad", repeats=3)]


def peer_rows():
    return [_row(64, 500, 16, 16, "fwd", repeats=2), _row(128, 2000, 16, 16, "fwd", repeats=2),
            _row(128, 2000, 64, 16, "fwd", repeats=2)]


def scene(row):
    """(screen verts [P, V, 3] float32, faces [F, 3] int32, attrs [V, C], poses) as numpy."""
    import numpy as np
    from nvsm_jax import geometry
    h, w = row["image"]
    verts, faces = common.cuboid_mesh(segments=FACES[row["faces"]])
    if row.get("grid") == "nemo":
        poses = geometry.nemo_pose_grid()[: row["poses"]]
    else:
        poses = common.random_poses(row["poses"], seed=0)
    focal = 500.0 * w / 128.0
    sv = geometry.project_to_screen(verts, poses, focal, np.array([w / 2.0, h / 2.0]))
    attrs = np.random.default_rng(0).normal(size=(len(verts), row["channels"]))
    return sv.astype(np.float32), faces, attrs.astype(np.float32), poses


def nemo_score_loss(sv, faces, table, s_clutter, hw):
    """NeMo's loss of every pose from a folded table (one rasteriser call).

    sv: [P, V, 3] screen verts; faces: [F, 3]; table: [V, H*W] or [P, V, H*W];
    s_clutter: [H*W] or [P, H*W] -> [P].
    """
    import rasterizer as R
    from nvsm_jax.nemo.pose_solver import nemo_loss
    frags = R.rasterize(sv, faces, hw)
    s_obj = R.interpolate_score(frags, faces, table).reshape(sv.shape[0], -1)
    return nemo_loss(s_obj, s_clutter)


def _score_fwd_bwd(sv, faces, table, s_clutter, hw, repeats=20):
    """Times ``value_and_grad`` of the summed NeMo loss w.r.t. ``sv`` (one jitted call)."""
    import jax
    import jax.numpy as jnp
    fn = jax.jit(jax.value_and_grad(
        lambda sv: jnp.sum(nemo_score_loss(sv, faces, table, s_clutter, tuple(hw)))))
    load = common.machine_load()
    stats = common.time_fn_stats(fn, sv, warmup=3, repeats=repeats)
    return dict(frames_per_s=sv.shape[0] / stats["median_s"], compile_s=stats["compile_s"],
                ms_per_call=stats["median_s"] * 1e3, cpu_ms_per_call=stats["cpu_s"] * 1e3,
                load1=load)


def score_fwd_bwd_frames_per_s(sv, faces, table, s_clutter, hw, repeats=20) -> dict:
    """Rasteriser forward + backward throughput on a caller's scene.

    sv: [P, V, 3] screen verts (P frames in one call); faces: [F, 3]; table:
    [V, H*W] or [P, V, H*W] folded scores; s_clutter: [H*W] or [P, H*W]; hw: (H, W).
    Returns ``frames_per_s`` (P / median seconds of one ``value_and_grad`` call
    of the summed NeMo loss), ``ms_per_call``, ``cpu_ms_per_call``, ``compile_s``,
    ``load1``.
    """
    import jax.numpy as jnp
    return _score_fwd_bwd(jnp.asarray(sv, jnp.float32), jnp.asarray(faces, jnp.int32),
                          jnp.asarray(table), jnp.asarray(s_clutter), tuple(hw), repeats)


def _record(row, hw, faces_np, sv_np):
    return dict(name="rasterizer", image=list(hw), faces=int(faces_np.shape[0]),
                poses=int(sv_np.shape[0]), channels=row["channels"], mode=row["mode"],
                peak_rss_mb=common.peak_rss_mb(), device=common.device_description(),
                coverage=None, grid=row.get("grid"))


def measure_row(row):
    """Times one row in this process; returns its record."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import rasterizer as R

    sv_np, faces_np, attrs_np, _ = scene(row)
    sv, faces, attrs = jnp.asarray(sv_np), jnp.asarray(faces_np), jnp.asarray(attrs_np)
    hw = tuple(row["image"])
    mode = row["mode"]

    def features(sv, cull=False):
        return R.interpolate(R.rasterize(sv, faces, hw, cull_backfaces=cull), faces, attrs)

    args = (sv,)
    if mode == "fwd":
        fn = jax.jit(features)
    elif mode == "fwd_cull":
        fn = jax.jit(lambda sv: features(sv, cull=True))
    elif mode == "grad":
        fn = jax.jit(jax.value_and_grad(lambda sv: jnp.mean(features(sv) ** 2)))
    elif mode == "soft":
        if hasattr(R, "SoftSettings"):
            fn = jax.jit(lambda sv: R.soft_rasterize(sv, faces, hw, attrs, R.SoftSettings(top_k=8)))
        else:       # an older tree's rasteriser (keyword settings)
            fn = jax.jit(lambda sv: R.soft_rasterize(sv, faces, hw, attrs, top_k=8))
    elif mode in ("score", "score_grad"):
        # NeMo: unit vertex features [V, C] and an observed feature map [H, W, C];
        # the score table is one matmul per image, the loss one value per pose.
        rng = np.random.default_rng(1)
        fmap = rng.normal(size=hw + (row["channels"],)).astype(np.float32)
        fmap /= np.linalg.norm(fmap, axis=-1, keepdims=True)
        clutter = rng.normal(size=(hw[0] * hw[1],)).astype(np.float32) * 0.1
        mem = attrs / jnp.linalg.norm(attrs, axis=-1, keepdims=True)
        table = mem @ jnp.asarray(fmap).reshape(-1, fmap.shape[-1]).T     # [V, HW]
        if mode == "score_grad":
            rec = _score_fwd_bwd(sv, faces, table, jnp.asarray(clutter), hw,
                                 repeats=row["repeats"])
            return dict(_record(row, hw, faces_np, sv_np), **rec)

        def nemo_loss(sv, fmap, clutter):
            table = mem @ fmap.reshape(-1, fmap.shape[-1]).T                # [V, HW]
            return nemo_score_loss(sv, faces, table, clutter, hw)

        fn = jax.jit(nemo_loss)
        args = (sv, jnp.asarray(fmap), jnp.asarray(clutter))
    else:
        raise ValueError(mode)
    load = common.machine_load()
    stats = common.time_fn_stats(fn, *args, warmup=2, repeats=row["repeats"])
    out = jax.block_until_ready(fn(*args))
    if mode in ("fwd", "fwd_cull"):
        coverage = float(jnp.mean(jnp.any(out != 0, axis=-1)))
    else:
        coverage = None
    return dict(name="rasterizer", image=list(hw), faces=int(faces_np.shape[0]),
                poses=int(sv_np.shape[0]), channels=row["channels"], mode=mode,
                frames_per_s=sv_np.shape[0] / stats["median_s"], compile_s=stats["compile_s"],
                peak_rss_mb=common.peak_rss_mb(), device=common.device_description(),
                ms_per_call=stats["median_s"] * 1e3, cpu_ms_per_call=stats["cpu_s"] * 1e3,
                load1=load, coverage=coverage, grid=row.get("grid"))


# --------------------------------------------------------------------------- jaxrenderer peer


def ensure_peer_env() -> str:
    """Creates the jaxrenderer virtual environment once; returns its python."""
    python = os.path.join(PEER_DIR, "bin", "python")
    probe = "import jax, numpy, importlib.util as u; assert u.find_spec('renderer')"
    if os.path.exists(python) and subprocess.run([python, "-c", probe],
                                                 capture_output=True).returncode == 0:
        return python
    subprocess.run([sys.executable, "-m", "venv", PEER_DIR], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *PEER_REQUIREMENTS], check=True)
    return python


def peer_worker(spec):
    """Runs inside the peer environment: times jaxrenderer on a saved scene."""
    import jax
    # jaxrenderer 0.3.2 sets the long-removed `jax_array` flag at import time.
    _update = jax.config.update
    jax.config.update = lambda name, value: None if name == "jax_array" else _update(name, value)
    import jax.numpy as jnp
    import numpy as np
    from typing import NamedTuple

    import renderer
    from renderer.shader import PerVertex, Shader

    data = np.load(spec["npz"])
    sv, faces, attrs = data["sv"], data["faces"], data["attrs"]
    h, w = spec["image"]
    n, f = 0.1, 100.0
    z = sv[..., 2]
    ndc = np.stack([2 * sv[..., 0] / w - 1, 2 * sv[..., 1] / h - 1,
                    (f + n) / (f - n) - 2 * f * n / ((f - n) * z)], -1)
    clip = jnp.asarray(np.concatenate([ndc * z[..., None], z[..., None]], -1), jnp.float32)

    class Extra(NamedTuple):
        clip: jax.Array
        attrs: jax.Array

    class Varying(NamedTuple):
        attrs: jax.Array

    class FeatureShader(Shader):
        @staticmethod
        def vertex(gl_VertexID, gl_InstanceID, camera, extra):
            return (PerVertex(gl_Position=extra.clip[gl_VertexID]),
                    Varying(attrs=extra.attrs[gl_VertexID]))

    camera = renderer.Camera.create(
        view=jnp.eye(4), projection=jnp.eye(4),
        viewport=renderer.Camera.viewport_matrix(
            lowerbound=jnp.zeros(2, int), dimension=jnp.asarray([w, h]), depth=1))
    faces_j = jnp.asarray(faces)
    attrs_j = jnp.asarray(attrs)

    def one(clip_p):
        buffers = renderer.Buffers(zbuffer=jnp.ones((w, h)),
                                   targets=(jnp.zeros((w, h, attrs.shape[-1])),))
        out = renderer.render(camera, FeatureShader, buffers, faces_j, Extra(clip_p, attrs_j))
        return out.targets[0]

    fn = jax.jit(jax.vmap(one))
    stats = common.time_fn_stats(fn, clip, warmup=1, repeats=spec["repeats"])
    out = np.asarray(fn(clip))
    return dict(stats, coverage=float(np.mean(np.any(out != 0, -1))), jax=jax.__version__)


def measure_peer(row, python):
    import numpy as np
    sv, faces, attrs, _ = scene(row)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scene.npz")
        np.savez(path, sv=sv, faces=faces, attrs=attrs)
        spec = dict(npz=path, image=row["image"], repeats=row["repeats"])
        load = common.machine_load()
        out = subprocess.run([python, "-m", "benchmarks.rasterizer", "--peer-worker",
                              json.dumps(spec)], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"jaxrenderer worker failed:\n{out.stderr[-4000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(name="jaxrenderer", image=row["image"], faces=int(faces.shape[0]),
                poses=int(sv.shape[0]), channels=row["channels"], mode=row["mode"],
                frames_per_s=sv.shape[0] / res["median_s"], compile_s=res["compile_s"],
                peak_rss_mb=res["peak_rss_mb"], device=res["device"],
                ms_per_call=res["median_s"] * 1e3, cpu_ms_per_call=res["cpu_s"] * 1e3,
                load1=load, coverage=res["coverage"], peer_jax=res["jax"])


COLUMNS = ["name", "image", "faces", "poses", "channels", "mode", "frames_per_s", "ms_per_call",
           "cpu_ms_per_call", "compile_s", "peak_rss_mb", "load1", "speedup_vs_peer"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--quick", action="store_true", help="two small rows only")
    p.add_argument("--peer", choices=["jaxrenderer"], default=None,
                   help="also time a peer rasteriser on matching rows")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.row is not None:
        print(json.dumps([measure_row(json.loads(a.row))]))
        return
    if a.peer_worker is not None:
        res = peer_worker(json.loads(a.peer_worker))
        res.update(peak_rss_mb=common.peak_rss_mb(), device=common.device_description())
        print(json.dumps(res))
        return

    records = [dict(name="matmul_gflops", gflops=common.matmul_gflops(),
                    device=common.device_description(), load1=common.machine_load())]
    print(f"float32 matmul: {records[0]['gflops']:.0f} GFLOP/s on {records[0]['device']}",
          flush=True)
    if a.peer:
        rows = peer_rows()[:1] if a.quick else peer_rows()
    else:
        rows = quick_rows() if a.quick else full_rows()
    print("  ".join(COLUMNS), flush=True)
    ours = []
    for row in rows:
        rec = common.run_row_subprocess("benchmarks.rasterizer", row)[0]
        ours.append(rec)
        common.print_table([rec], COLUMNS, header=False)
    records += ours
    if a.peer:
        python = ensure_peer_env()
        for row, mine in zip(rows, ours):
            rec = measure_peer(row, python)
            mine["speedup_vs_peer"] = mine["frames_per_s"] / rec["frames_per_s"]
            records.append(rec)
            common.print_table([rec], COLUMNS, header=False)
    print()
    common.print_table(records[1:], COLUMNS)
    if a.json:
        common.write_json(a.json, records)


if __name__ == "__main__":
    main()
