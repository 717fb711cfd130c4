"""Synthetic PASCAL3D+-like data: procedural shapes rendered with the JAX rasteriser.

For each category (see :mod:`nvsm_jax.data.shapes` for the object frame: z up,
front towards -y, so azimuth 0 shows the front):

* the **model mesh** is NeMo's cuboid over the vertices of 200 sampled
  instances (99 % coverage per axis, x made symmetric, ~1000 vertices), written
  to ``CAD_single/{cat}/01.off``; the learner never sees instance meshes;
* every **image** shows a fresh instance (proportions vary per instance) with
  per-part colours, a procedural 3D surface pattern (evaluated on the
  interpolated surface position), Lambertian shading under a random light
  (normals interpolated per pixel); visibility is rasterised at
  ``supersample`` x the size and the coverage box-downsampled (anti-aliased
  silhouettes), shading is evaluated once per output pixel; composited over a
  cluttered procedural background, then occluded (test levels L1-L3) and
  photometrically jittered (brightness, contrast, Gaussian noise);
* **poses** as in PASCAL3D+: azimuth ~ U[0, 2 pi), elevation ~ N(10, 12) deg
  clipped to [-10, 40] deg, theta ~ N(0, 5) deg clipped to +-15 deg, distance
  ~ U[4.5, 5.5]; camera: focal 1, a per-category ``viewport`` (pixels) chosen
  so that the cuboid's projected box spans ``fill`` (0.78) of the smaller image
  side on average at distance 5 (capped at 0.95 for the most elongated view;
  the object itself then fills ~60-70 % of the crop on average), principal
  point at the image centre;
* **occlusion** L1/L2/L3: textured occluders cover 20-40 / 40-60 / 60-80 % of
  the object's pixels (measured on the full silhouette); ``object_mask`` is
  the full silhouette (pixels whose supersampled coverage is >= 1/2),
  ``occluder_mask`` the occluders.

Determinism: image ``i`` of (category, split, level) uses
``np.random.default_rng([seed, category_index, split_id, level, i])`` for
everything, rendering is a fixed jitted XLA program (batched over poses,
padded to a fixed size), and files are written without timestamps, so one seed
gives byte-identical files (``dataset.json`` differs only in its ``timing``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

import rasterizer
from nvsm_jax import geometry, meshes
from nvsm_jax.data import appearance, shapes
from nvsm_jax.data.format import (OCCLUSION_LEVELS, save_npz, save_png, subset_name,
                                  write_list)

__all__ = ["SynthConfig", "generate", "RenderOptions", "render_instances", "category_cuboid",
           "category_viewport", "sample_pose", "GENERATOR_VERSION", "OCCLUSION_RANGES",
           "image_name", "render_silhouettes", "max_mesh_size"]

GENERATOR_VERSION = "nvsm_jax.synthetic/1"
OCCLUSION_RANGES = {"L0": (0.0, 0.0), "L1": (0.2, 0.4), "L2": (0.4, 0.6), "L3": (0.6, 0.8)}
_SPLIT_ID = {"train": 0, "test": 1}
_BUCKET = 256   # vertex / face counts are padded up to a multiple of this


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    categories: tuple[str, ...] = shapes.CATEGORIES
    num_train: int = 1000
    num_test: int = 200                       # per occlusion level
    test_levels: tuple[str, ...] = OCCLUSION_LEVELS
    image_size: tuple[int, int] = (128, 128)  # (H, W)
    supersample: int = 2
    batch_size: int = 32
    seed: int = 0
    fill: float = 0.78
    distance_range: tuple[float, float] = (4.5, 5.5)
    elevation_deg: tuple[float, float, float, float] = (10.0, 12.0, -10.0, 40.0)  # mean, std, lo, hi
    theta_deg: tuple[float, float] = (5.0, 15.0)                                   # std, max |theta|
    cuboid_coverage: float = 0.99
    cuboid_vertices: int = 1000
    cuboid_instances: int = 200
    workers: int = 2                          # host threads compositing / writing images

    def __post_init__(self):
        """Every field checked (``ConfigError`` naming each bad one): an empty set, a zero
        batch or an impossible pose range is refused before anything is written."""
        from nvsm_jax import config_checks  # imported here: it reads nvsm_jax.data
        config_checks.check_synthetic_config(dataclasses.asdict(self))

    @classmethod
    def from_mapping(cls, cfg) -> "SynthConfig":
        """From a dict / ml_collections ConfigDict (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in names}
        if isinstance(kw.get("categories"), str):
            kw["categories"] = tuple(c for c in kw["categories"].split(",") if c)
        if isinstance(kw.get("image_size"), int):
            kw["image_size"] = (kw["image_size"], kw["image_size"])
        return cls(**kw)

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- camera / poses

def category_cuboid(category: str, config: SynthConfig) -> meshes.Mesh:
    pts = shapes.model_mesh_points(category, config.seed, config.cuboid_instances)
    return meshes.cuboid_for_points(pts, config.cuboid_coverage, config.cuboid_vertices,
                                    symmetric_axes=(0,))


def category_viewport(cuboid: meshes.Mesh, config: SynthConfig) -> float:
    """Pixels per unit at distance 1 (focal = 1): the cuboid's projected box has a
    longer side of ``fill`` x the smaller image side on average over the pose
    distribution, capped so that it never exceeds 0.95 of it (long objects seen
    from the side). Computed from 256 fixed poses (deterministic)."""
    lo, hi = cuboid.verts.min(0), cuboid.verts.max(0)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])
                        for z in (lo[2], hi[2])])
    rng = np.random.default_rng(12345)
    poses = np.stack([sample_pose(rng, config) for _ in range(256)])
    poses[:, 3] = geometry.NEMO_DISTANCE
    uv = geometry.project_to_screen(corners, poses, 1.0, np.zeros(2), xnp=np)[..., :2]
    ext = (uv.max(1) - uv.min(1)).max(-1)                     # [256] at focal 1 px
    size = min(config.image_size)
    vp = min(config.fill * size / ext.mean(), 0.95 * size / ext.max())
    return round(float(vp), 3)


def sample_pose(rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """(azimuth, elevation, theta, distance) float64 radians."""
    em, es, elo, ehi = config.elevation_deg
    ts, tmax = config.theta_deg
    a = rng.uniform(0, 2 * np.pi)
    e = np.deg2rad(np.clip(rng.normal(em, es), elo, ehi))
    t = np.deg2rad(np.clip(rng.normal(0, ts), -tmax, tmax))
    d = rng.uniform(*config.distance_range)
    return np.array([a, e, t, d], np.float64)


def image_name(category: str, split: str, level: str, index: int) -> str:
    return f"{category}_{split}_{index:05d}" if split == "train" else \
        f"{category}_{level}_{index:05d}"


# --------------------------------------------------------------------------- rendering

_RENDER_CACHE = {}


def _pad_to(n, bucket=_BUCKET):
    return -(-n // bucket) * bucket


def _render_fn(hw, supersample):
    """Jitted batch renderer for an image size (cached; XLA recompiles per padded shape).

    Visibility is rasterised at ``supersample`` x the resolution; the coverage
    (fraction of covered sub-samples) is box-downsampled, which anti-aliases
    the silhouette. Shading is evaluated once per output pixel, at its first
    covered sub-sample (4x less per-pixel work than shading every sub-sample;
    only edges between parts of the object stay aliased).
    """
    key = (tuple(hw), supersample)
    if key in _RENDER_CACHE:
        return _RENDER_CACHE[key]
    h, w = hw
    s = supersample

    def render(verts, faces, attrs, normals, pose, focal, principal, light, tex):
        # verts/normals: [B, V, 3] world; attrs: [B, V, 4] (rgb, texture weight);
        # pose: [B, 4]; focal: [B]; principal: [B, 2]; light: [B, 4] (direction
        # towards the light in camera coordinates, ambient); tex: [B, 8] (stripe
        # frequency, check frequency, amplitude, stripe direction xyz, phase, checks mix)
        b = verts.shape[0]
        screen = geometry.project_to_screen(verts, pose, focal * s, principal * s, xnp=jnp)
        frags = rasterizer.rasterize(screen, faces, image_size=(h * s, w * s))
        sub = lambda x: jnp.moveaxis(  # noqa: E731  [B, hs, ws, ...] -> [B, h, w, s*s, ...]
            x.reshape((b, h, s, w, s) + x.shape[3:]), 2, 3).reshape((b, h, w, s * s) + x.shape[3:])
        fid = sub(frags.face_id)
        covered = fid >= 0
        cover = covered.mean(-1, dtype=jnp.float32)
        pick = jnp.argmax(covered, axis=-1)[..., None]                   # first covered sample
        fid1 = jnp.take_along_axis(fid, pick, -1)[..., 0]
        bary1 = jnp.take_along_axis(sub(frags.bary), pick[..., None], -2)[..., 0, :]
        frag1 = rasterizer.Fragments(face_id=fid1, bary=bary1, depth=jnp.zeros_like(cover))
        r_cv, _ = geometry.world_to_camera(pose, xnp=jnp)
        n_cam = jnp.einsum("bij,bvj->bvi", r_cv, normals)
        va = jnp.concatenate([attrs, n_cam, verts], axis=-1)          # [B, V, 10]
        px = rasterizer.interpolate(frag1, faces, va)                   # [B, h, w, 10]
        albedo, tw, n, p = px[..., :3], px[..., 3:4], px[..., 4:7], px[..., 7:10]
        n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
        # the camera looks along +z: visible surfaces have n.z < 0; flip back-facing normals
        n = jnp.where(n[..., 2:3] > 0, -n, n)
        diffuse = jnp.maximum(jnp.sum(n * light[:, None, None, :3], -1, keepdims=True), 0.0)
        amb = light[:, None, None, 3:4]
        t = tex[:, None, None, :]
        u = jnp.sum(p * t[..., 3:6], -1, keepdims=True)
        stripes = jnp.sin(t[..., 0:1] * u + t[..., 6:7])
        checks = jnp.sign(jnp.sin(t[..., 1:2] * p[..., 0:1]) * jnp.sin(t[..., 1:2] * p[..., 1:2])
                          * jnp.sin(t[..., 1:2] * p[..., 2:3]))
        pattern = (1 - t[..., 7:8]) * stripes + t[..., 7:8] * checks
        albedo = albedo * (1.0 + t[..., 2:3] * tw * pattern)
        rgb = jnp.clip(albedo * (amb + (1 - amb) * diffuse), 0.0, 1.0) * cover[..., None]
        return rgb, cover

    fn = jax.jit(render)
    _RENDER_CACHE[key] = fn
    return fn


def _pad_batch(arrays, n):
    """Pads the leading axis of every array to n by repeating row 0."""
    out = []
    for a in arrays:
        pad = n - len(a)
        out.append(a if pad == 0 else np.concatenate([a, np.repeat(a[:1], pad, 0)]))
    return out


@dataclasses.dataclass(frozen=True)
class RenderOptions:
    """How :func:`render_instances` renders (not what it renders).

    supersample: visibility is rasterised at ``supersample`` x the resolution
      (coverage = the fraction of covered sub-samples).
    batch_size: images per jitted call (default: all N in one call); the last
      batch is padded by repeating its first image.
    pad_to: ``(V, F)`` to pad vertices / faces to (default: the next multiple
      of 256); padding faces are degenerate and never drawn.
    fetch: False (one batch only) returns the device arrays without waiting,
      so the caller can overlap host work with rendering.
    """

    supersample: int = 2
    batch_size: int | None = None
    pad_to: tuple[int, int] | None = None
    fetch: bool = True


def render_instances(instances, poses, focal, principal, lights, textures, colors,
                     image_size, options: RenderOptions = RenderOptions()):
    """Renders instances of ONE category (shared topology) at the given poses.

    instances: list of shapes.Instance; poses [N, 4]; focal [N]; principal [N, 2];
    lights [N, 4]; textures [N, 8]; colors: list of [V, 4] (rgb, texture weight);
    image_size: (H, W); options: :class:`RenderOptions` (supersample, batch_size,
    pad_to, fetch).
    Returns (rgb [N, H, W, 3] float32 premultiplied by coverage, coverage [N, H, W]).
    """
    supersample, batch_size, pad_to, fetch = (options.supersample, options.batch_size,
                                              options.pad_to, options.fetch)
    n = len(instances)
    b = batch_size or n
    faces = instances[0].faces
    v = len(instances[0].verts)
    vp, fp = pad_to or (_pad_to(v), _pad_to(len(faces)))
    faces_p = np.zeros((fp, 3), np.int32)          # padding faces are degenerate (0, 0, 0)
    faces_p[:len(faces)] = faces
    fn = _render_fn(image_size, supersample)
    rgbs, covers = [], []
    for start in range(0, n, b):
        sl = slice(start, min(start + b, n))
        k = sl.stop - sl.start
        verts = np.zeros((k, vp, 3), np.float32)
        norms = np.zeros((k, vp, 3), np.float32)
        attrs = np.zeros((k, vp, 4), np.float32)
        for i, inst in enumerate(instances[sl]):
            verts[i, :v] = inst.verts
            norms[i, :v] = inst.normals
            attrs[i, :v] = colors[start + i]
        args = _pad_batch([verts, norms, attrs, np.asarray(poses[sl], np.float32),
                           np.asarray(focal[sl], np.float32),
                           np.asarray(principal[sl], np.float32),
                           np.asarray(lights[sl], np.float32),
                           np.asarray(textures[sl], np.float32)], b)
        verts, norms, attrs, pz, fz, pr, li, tx = args
        rgb, cov = fn(verts, faces_p, attrs, norms, pz, fz, pr, li, tx)
        if not fetch and n <= b:
            return rgb, cov
        rgbs.append(np.asarray(rgb)[:k])
        covers.append(np.asarray(cov)[:k])
    return np.concatenate(rgbs), np.concatenate(covers)


def _silhouette_fn(hw, supersample):
    key = ("silhouette", tuple(hw), supersample)
    if key not in _RENDER_CACHE:
        h, w = hw
        s = supersample

        def sil(verts, faces, pose, focal, principal):
            screen = geometry.project_to_screen(verts, pose, focal * s, principal * s, xnp=jnp)
            frags = rasterizer.rasterize(screen, faces, image_size=(h * s, w * s))
            c = (frags.face_id >= 0).astype(jnp.float32)
            return c.reshape(-1, h, s, w, s).mean((2, 4))

        _RENDER_CACHE[key] = jax.jit(sil)
    return _RENDER_CACHE[key]


def render_silhouettes(verts, faces, poses, focal, principal, image_size, supersample=1):
    """Coverage [N, H, W] (fraction of covered sub-samples) of a mesh at poses.

    verts: [V, 3] or per-image [N, V, 3]; faces [F, 3]; poses [N, 4]; focal [N];
    principal [N, 2]. Meshes are padded to the generator's fixed sizes so that
    one compiled function serves every category. For checks and tests.
    """
    n = len(poses)
    verts = np.broadcast_to(np.asarray(verts, np.float32), (n,) + np.shape(verts)[-2:])
    vp, fp = max_mesh_size()
    vv = np.zeros((n, max(vp, verts.shape[1]), 3), np.float32)
    vv[:, :verts.shape[1]] = verts
    ff = np.zeros((max(fp, len(faces)), 3), np.int32)
    ff[:len(faces)] = faces
    return np.asarray(_silhouette_fn(image_size, supersample)(
        vv, ff, np.asarray(poses, np.float32), np.asarray(focal, np.float32),
        np.asarray(principal, np.float32)))


def max_mesh_size() -> tuple[int, int]:
    """(V, F) every instance mesh is padded to: the largest category, rounded up."""
    topo = [shapes.category_topology(c) for c in shapes.CATEGORIES]
    return _pad_to(max(v for v, _ in topo)), _pad_to(max(len(f) for _, f in topo))


# --------------------------------------------------------------------------- one image's draws

def _draw_appearance(inst: shapes.Instance, rng):
    """Per-vertex (rgb, texture weight) [V, 4], light [4], texture params [8]."""
    ng = len(shapes.GROUPS)
    pal = appearance.random_color(rng, ng)
    g = shapes.G
    pal[g["glass"]] = np.array([0.12, 0.16, 0.22]) * rng.uniform(0.6, 1.4) + rng.uniform(0, 0.08, 3)
    pal[g["dark"]] = rng.uniform(0.03, 0.12, 3)
    pal[g["metal"]] = rng.uniform(0.55, 0.8) * np.ones(3) + rng.uniform(-0.05, 0.05, 3)
    pal[g["head"]] = np.array([1.0, 0.97, 0.75]) * rng.uniform(0.9, 1.0)
    pal[g["tail"]] = np.array([0.85, 0.05, 0.04]) * rng.uniform(0.8, 1.0)
    pal[g["accent"]] = appearance.random_color(rng, sat=(0.7, 1.0), val=(0.7, 1.0))
    pal[g["wood"]] = np.array([0.45, 0.28, 0.13]) * rng.uniform(0.6, 1.5)
    if rng.random() < 0.5:
        pal[g["body2"]] = pal[g["body"]] * rng.uniform(0.5, 0.9)
    pal = np.clip(pal, 0, 1)
    colors = np.concatenate([pal[inst.group], shapes.TEXTURED[inst.group][:, None]], 1)
    # light: direction in camera coordinates (x right, y down, z forward), towards
    # the light, mostly from above and from the camera's side
    ldir = np.array([rng.uniform(-1, 1), rng.uniform(-1, 0.2), rng.uniform(-1, -0.2)])
    light = np.concatenate([ldir / np.linalg.norm(ldir), [rng.uniform(0.25, 0.5)]])
    d1 = rng.normal(size=3)
    tex = np.concatenate([[rng.uniform(8, 40), rng.uniform(6, 30), rng.uniform(0.0, 0.35)],
                          d1 / np.linalg.norm(d1), [rng.uniform(0, 2 * np.pi)],
                          [float(rng.random() < 0.3)]])
    return colors.astype(np.float32), light.astype(np.float32), tex.astype(np.float32)


# --------------------------------------------------------------------------- generation

def _write_readme(root, split, config, counts):
    text = f"""Synthetic PASCAL3D+-like pose data ({split} root), made by nvsm_jax
({GENERATOR_VERSION}). Regenerate with:

    nvsm-make-synthetic --out <DIR> --categories {','.join(config.categories)} \\
        --train {config.num_train} --test {config.num_test} --size {config.image_size[0]} \\
        --seed {config.seed}

Layout (NeMo-preprocessed PASCAL3D+): images/{{cat}}{{occ}}/{{name}}.png,
annotations/{{cat}}{{occ}}/{{name}}.npz, lists/{{cat}}{{occ}}/mesh01.txt,
CAD_single/{{cat}}/01.off (the category's cuboid model mesh). {{occ}} is empty
for L0 and FGL1_BGL1 / FGL2_BGL2 / FGL3_BGL3 for 20-40 / 40-60 / 60-80 %
occlusion. Annotation keys: azimuth, elevation, theta (radians), distance,
focal, viewport (pixels = focal * viewport), principal [px, py] (screen
coordinates: x = column, y = row, pixel centres at +0.5), box = bbox =
[x_min, y_min, x_max, y_max] (pixel edges), cad_index (1), height, width,
object_mask (full silhouette), occluder_mask, occluded_fraction.
nvsm_jax.geometry.project_pascal(X, azimuth, elevation, theta, distance, focal,
viewport, principal) gives the pixel of model point X. Object frame: z up,
front towards -y (azimuth 0 = front view).

Counts: {json.dumps(counts)}
"""
    with open(os.path.join(root, "README"), "w") as f:
        f.write(text)


def _prepare_batch(category, split, level, indices, config, viewport):
    """Host-side draws of one batch: instances, poses, appearance (per-image rngs)."""
    h, w = config.image_size
    cat_id = shapes.CATEGORIES.index(category)
    rngs = [np.random.default_rng([config.seed, cat_id, _SPLIT_ID[split],
                                   OCCLUSION_LEVELS.index(level), i]) for i in indices]
    insts, poses, cols, lights, texs = [], [], [], [], []
    for rng in rngs:
        inst = shapes.sample_instance(category, rng)
        poses.append(sample_pose(rng, config))
        c, li, tx = _draw_appearance(inst, rng)
        insts.append(inst)
        cols.append(c)
        lights.append(li)
        texs.append(tx)
    k = len(rngs)
    return dict(category=category, split=split, level=level, indices=list(indices), rngs=rngs,
                insts=insts, poses=np.stack(poses), colors=cols, lights=np.stack(lights),
                textures=np.stack(texs), focal=np.full(k, viewport, np.float32),
                principal=np.tile(np.array([w / 2, h / 2], np.float32), (k, 1)))


def _finish_one(batch, j, rgb, cov, root, config, viewport):
    h, w = config.image_size
    category, split, level = batch["category"], batch["split"], batch["level"]
    sub = subset_name(category, level)
    i, rng = batch["indices"][j], batch["rngs"][j]
    name = image_name(category, split, level, i)
    obj = cov >= 0.5
    if not obj.any():
        raise RuntimeError(f"{name}: object not visible (check the camera)")
    img = appearance.background(rng, (h, w)) * (1 - cov[..., None]) + rgb
    occ = np.zeros((h, w), bool)
    frac = 0.0
    if level != "L0":
        img, occ, frac = appearance.occlude(img, obj, OCCLUSION_RANGES[level], rng)
    img = appearance.photometric(img, rng)
    ys, xs = np.nonzero(obj)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    a, e, t, d = batch["poses"][j]
    save_png(os.path.join(root, "images", sub, name + ".png"), img)
    save_npz(os.path.join(root, "annotations", sub, name + ".npz"),
             azimuth=np.float64(a), elevation=np.float64(e), theta=np.float64(t),
             distance=np.float64(d), focal=np.float64(1.0), viewport=np.float64(viewport),
             principal=np.array([w / 2, h / 2], np.float64), box=box, bbox=box,
             cad_index=np.int64(1), height=np.int64(h), width=np.int64(w),
             object_mask=obj, occluder_mask=occ, occluded_fraction=np.float64(frac),
             occlusion_level=np.int64(OCCLUSION_LEVELS.index(level)))
    return name, frac


def _finish_batch(batch, rgb, cov, root, config, viewport, pool=None):
    """Background, occluders, photometric jitter, and the files of one rendered batch.

    Every image only uses its own rng, so running them on a thread pool gives
    the same bytes as running them in order.
    """
    rgb, cov = np.asarray(rgb), np.asarray(cov)
    args = [(batch, j, rgb[j], cov[j], root, config, viewport) for j in range(len(batch["rngs"]))]
    results = list(pool.map(lambda a: _finish_one(*a), args)) if pool is not None else \
        [_finish_one(*a) for a in args]
    return [r[0] for r in results], [r[1] for r in results]


def generate(out_dir, config: SynthConfig = SynthConfig(), *, log=print) -> dict:
    """Generates ``out_dir/train`` (L0 pool) and ``out_dir/test`` (L0-L3) roots.

    Batches are rendered asynchronously: while XLA renders batch k + 1, the host
    composites and writes batch k. Every category is padded to the same vertex
    and face counts (:func:`max_mesh_size`), so the renderer compiles once per
    image size and batch size.
    Returns the statistics written to each root's ``dataset.json``.
    """
    for category in config.categories:
        if category not in shapes.CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {shapes.CATEGORIES}")
    for level in config.test_levels:
        if level not in OCCLUSION_LEVELS:
            raise ValueError(f"unknown occlusion level {level!r}")
    roots = {"train": os.path.join(out_dir, "train"), "test": os.path.join(out_dir, "test")}
    jobs = [("train", "L0", config.num_train)] + [("test", lv, config.num_test)
                                                  for lv in config.test_levels]
    pad = max_mesh_size()          # one compiled renderer for every category
    counts: dict = {"train": {}, "test": {}}
    viewports, frac_stats = {}, {}
    t0 = time.perf_counter()
    c0 = time.process_time()
    n_images = 0
    pool = ThreadPoolExecutor(max(1, config.workers)) if config.workers > 1 else None
    try:
        for category in config.categories:
            cuboid = category_cuboid(category, config)
            vp = category_viewport(cuboid, config)
            viewports[category] = vp
            for root in roots.values():
                meshes.save_off(os.path.join(root, "CAD_single", category, "01.off"), *cuboid)
            chunks = [(split, level, range(s0, min(s0 + config.batch_size, num)))
                      for split, level, num in jobs for s0 in range(0, num, config.batch_size)]
            names: dict = {}
            in_flight = None
            for chunk in chunks + [None]:
                nxt = None
                if chunk is not None:
                    b = _prepare_batch(category, *chunk, config, vp)
                    handles = render_instances(b["insts"], b["poses"], b["focal"], b["principal"],
                                               b["lights"], b["textures"], b["colors"],
                                               config.image_size,
                                               RenderOptions(config.supersample, config.batch_size,
                                                             pad_to=pad, fetch=False))
                    nxt = (b, handles)
                if in_flight is not None:
                    b, (rgb, cov) = in_flight
                    done, fracs = _finish_batch(b, rgb, cov, roots[b["split"]], config, vp, pool)
                    names.setdefault((b["split"], b["level"]), []).extend(done)
                    frac_stats.setdefault(b["level"], []).extend(fracs)
                    n_images += len(done)
                in_flight = nxt
            for (split, level), ns in names.items():
                sub = subset_name(category, level)
                write_list(os.path.join(roots[split], "lists", sub, "mesh01.txt"), ns)
                counts[split][sub] = len(ns)
            log(f"[synthetic] {category}: {sum(len(v) for v in names.values())} images "
                f"({n_images / (time.perf_counter() - t0):.1f} images/s so far)")
    finally:
        if pool is not None:
            pool.shutdown()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - c0
    stats = {"generator": GENERATOR_VERSION, "config": config.to_json(), "seed": config.seed,
             "viewport": viewports,
             "occluded_fraction_mean": {k: round(float(np.mean(v)), 4)
                                        for k, v in sorted(frac_stats.items())},
             "timing": {"images": n_images, "seconds": round(elapsed, 3),
                        "images_per_second": round(n_images / max(elapsed, 1e-9), 3),
                        "cpu_seconds": round(cpu, 3),
                        "cpu_ms_per_image": round(1e3 * cpu / max(n_images, 1), 3)}}
    for split, root in roots.items():
        os.makedirs(root, exist_ok=True)
        _write_readme(root, split, config, counts[split])
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump(dict(stats, split=split, counts=counts[split]), f, indent=1, sort_keys=True)
    return dict(stats, counts=counts)
