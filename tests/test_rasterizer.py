"""Hard rasteriser tests, each against an oracle the rasteriser did not produce.

* face ids, depths, interpolated hit points and visible vertices vs trimesh
  ray casting through pixel centres (float64, its own intersection code);
* gradients vs central finite differences in float64;
* batched vs looped, one trace for repeated shapes, 8-device sharding vs one
  device, tiny pass/block settings vs defaults (the multi-pass path);
* NaN-freedom at the near plane, for faces crossing z = 0 and edge-on faces.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import rasterizer as R
from nvsm_jax import geometry

H, W = 48, 64          # non-square on purpose
FOCAL = 150.0
NP = 3                 # poses per batch; tests share shapes so compilations are reused
PRINCIPAL = np.array([W / 2.0, H / 2.0])


# --------------------------------------------------------------------------- meshes


def _l_shape():
    """A concave, self-occluding L-shaped prism (two boxes glued along a face)."""
    a = trimesh.creation.box(extents=(1.0, 0.4, 0.4), transform=trimesh.transformations.translation_matrix((0.0, 0.0, 0.0)))
    b = trimesh.creation.box(extents=(0.4, 0.4, 0.8), transform=trimesh.transformations.translation_matrix((0.3, 0.0, 0.6)))
    return trimesh.util.concatenate([a, b])


MESHES = {
    "icosphere": lambda: trimesh.creation.icosphere(subdivisions=2, radius=0.7),
    "box": lambda: trimesh.creation.box(extents=(1.2, 0.6, 0.5)),
    "cuboid": lambda: trimesh.Trimesh(*trimesh.remesh.subdivide(
        *trimesh.remesh.subdivide(*(lambda m: (m.vertices, m.faces))(
            trimesh.creation.box(extents=(1.0, 0.5, 0.4))))), process=False),
    "torus": lambda: trimesh.creation.torus(major_radius=0.55, minor_radius=0.2,
                                            major_sections=24, minor_sections=10),
    "l_shape": _l_shape,
}


@functools.lru_cache(maxsize=None)
def mesh(name):
    m = MESHES[name]()
    return np.asarray(m.vertices, np.float64), np.asarray(m.faces, np.int32)


def poses(n, seed):
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, 2 * np.pi, n), np.deg2rad(rng.uniform(-30, 60, n)),
                     np.deg2rad(rng.uniform(-20, 20, n)), rng.uniform(3.0, 4.0, n)], -1)


def screen(verts, pose):
    """Screen vertices [..., V, 3] float32, projected in numpy (no eager jax ops)."""
    sv = geometry.project_to_screen(np.asarray(verts, np.float64), np.asarray(pose, np.float64),
                                    FOCAL, PRINCIPAL)
    return jnp.asarray(sv, jnp.float32)


@jax.jit
def _render(sv, faces, attrs):
    frags = R.rasterize(sv, faces, (H, W))
    return frags, R.interpolate(frags, faces, attrs)


def render(name, seed):
    """(verts, faces, poses, fragments, interpolated world positions) of NP poses."""
    verts, faces = mesh(name)
    ps = poses(NP, seed)
    frags, pts = _render(screen(verts, ps), jnp.asarray(faces), jnp.asarray(verts, jnp.float32))
    return verts, faces, ps, frags, pts


# --------------------------------------------------------------------------- ray oracle


def cast_rays(verts, faces, pose):
    """(face id [H, W] (-1 miss), camera depth [H, W], hit point [H, W, 3]) by ray casting."""
    m = trimesh.Trimesh(verts, faces, process=False)
    r_cv, t_cv = geometry.world_to_camera(np.asarray(pose, np.float64))
    centre = -r_cv.T @ t_cv
    rows, cols = np.mgrid[0:H, 0:W]
    d_cam = np.stack([(cols + 0.5 - PRINCIPAL[0]) / FOCAL, (rows + 0.5 - PRINCIPAL[1]) / FOCAL,
                      np.ones((H, W))], -1).reshape(-1, 3)
    dirs = d_cam @ r_cv                                    # R^T d for each row
    origins = np.broadcast_to(centre, dirs.shape)
    loc, ray_idx, tri_idx = m.ray.intersects_location(origins, dirs, multiple_hits=False)
    fid = np.full(H * W, -1)
    depth = np.zeros(H * W)
    hit = np.zeros((H * W, 3))
    fid[ray_idx] = tri_idx
    hit[ray_idx] = loc
    depth[ray_idx] = (loc @ r_cv.T + t_cv)[:, 2]
    return fid.reshape(H, W), depth.reshape(H, W), hit.reshape(H, W, 3)


@pytest.mark.parametrize("name", list(MESHES))
def test_against_ray_casting(name):
    verts, faces, ps, frags, hit_pts = render(name, seed=len(name))
    fid, depth, bary = (np.asarray(v) for v in (frags.face_id, frags.depth, frags.bary))
    hit_pts = np.asarray(hit_pts)
    for p in range(len(ps)):
        o_fid, o_depth, o_hit = cast_rays(verts, faces, ps[p])
        both = (fid[p] >= 0) & (o_fid >= 0)
        same_status = (fid[p] >= 0) == (o_fid >= 0)
        depth_ok = np.abs(depth[p] - o_depth) <= 1e-4 * np.maximum(o_depth, 1.0)
        agree = same_status & (~both | depth_ok)
        assert agree.mean() >= 0.995, (name, p, agree.mean())
        # Away from edges (every barycentric clearly positive) the face must match.
        interior = both & (bary[p].min(-1) > 1e-3)
        assert interior.sum() > 100
        assert (fid[p] == o_fid)[interior].mean() >= 0.995
        # Interpolating world positions gives the hit point; bary sums to 1.
        np.testing.assert_allclose(hit_pts[p][both & depth_ok], o_hit[both & depth_ok], atol=2e-4)
        np.testing.assert_allclose(bary[p].sum(-1)[fid[p] >= 0], 1.0, atol=1e-5)
        assert np.all(bary[p][fid[p] < 0] == 0) and np.all(depth[p][fid[p] < 0] == 0)


def test_vertex_visibility_against_rays():
    verts, faces, ps, frags, _ = render("torus", seed=7)
    vis = np.asarray(R.vertex_visibility(frags, faces, len(verts)))
    m = trimesh.Trimesh(verts, faces, process=False)
    for p in range(len(ps)):
        # Definition-level oracle: vertices of the faces hit by pixel rays.
        o_fid, _, _ = cast_rays(verts, faces, ps[p])
        by_faces = np.zeros(len(verts), bool)
        by_faces[faces[np.unique(o_fid[o_fid >= 0])].ravel()] = True
        assert (vis[p] == by_faces).mean() >= 0.98, (p, (vis[p] == by_faces).mean())
        # Geometric oracle: a vertex whose own ray from the camera centre hits
        # nothing closer (and that projects into the image) must be visible.
        r_cv, t_cv = geometry.world_to_camera(ps[p])
        centre = -r_cv.T @ t_cv
        dirs = verts - centre
        dist = np.linalg.norm(dirs, axis=-1)
        loc, ray_idx, _ = m.ray.intersects_location(np.broadcast_to(centre, verts.shape),
                                                    dirs / dist[:, None], multiple_hits=False)
        first = np.full(len(verts), np.inf)
        first[ray_idx] = np.linalg.norm(loc - centre, axis=-1)
        xy = np.asarray(screen(verts, ps[p]))[:, :2]
        in_image = np.all((xy > 1) & (xy < np.array([W - 1, H - 1])), -1)
        unoccluded = (first >= dist * (1 - 1e-6)) & in_image
        assert unoccluded.sum() > 20
        assert vis[p][unoccluded].mean() >= 0.97, (p, vis[p][unoccluded].mean())


# --------------------------------------------------------------------------- exactness of the paths


def test_pass_and_block_settings_do_not_change_the_result():
    verts, faces = mesh("cuboid")
    sv = screen(verts, poses(NP, seed=3))
    ref = _render(sv, jnp.asarray(faces), jnp.asarray(verts, jnp.float32))[0]
    # ~100 passes of 37 jobs of 3 x 5 pixel blocks vs one pass of 4 x 4 blocks
    for kw in [dict(block=(3, 5), jobs_per_pass=37)]:
        out = R.rasterize(sv, faces, (H, W), **kw)
        np.testing.assert_array_equal(out.face_id, ref.face_id)
        np.testing.assert_array_equal(out.bary, ref.bary)
        np.testing.assert_array_equal(out.depth, ref.depth)


def test_batch_equals_loop_and_leading_dims():
    verts, faces = mesh("cuboid")
    sv = screen(verts, poses(NP, seed=4))
    attrs = jnp.asarray(verts, jnp.float32)
    frags, feats = _render(sv, jnp.asarray(faces), attrs)
    for p in range(NP):
        f1, x1 = _render(sv[p:p + 1], jnp.asarray(faces), attrs)
        np.testing.assert_array_equal(f1.face_id[0], frags.face_id[p])
        np.testing.assert_allclose(x1[0], feats[p], atol=1e-6)
    vm = jax.vmap(lambda s: R.rasterize(s, faces, (H, W)).face_id)(sv)
    np.testing.assert_array_equal(vm, frags.face_id)
    # extra leading dims, and per-pose attributes broadcast against the batch
    f2 = R.rasterize(sv[None], faces, (H, W))
    np.testing.assert_array_equal(f2.face_id[0], frags.face_id)
    scale = jnp.arange(1, NP + 1.0)
    per_pose = attrs * scale[:, None, None]
    np.testing.assert_allclose(R.interpolate(frags, faces, per_pose),
                               feats * scale[:, None, None, None], rtol=1e-5, atol=1e-5)


def test_no_retrace_on_same_shapes():
    verts, faces = mesh("box")
    traces = []

    @jax.jit
    def f(sv):
        traces.append(1)
        return R.interpolate(R.rasterize(sv, faces, (H, W)), faces, sv[0])

    f(screen(verts, poses(NP, seed=1))).block_until_ready()
    f(screen(verts, poses(NP, seed=2))).block_until_ready()
    assert len(traces) == 1
    from rasterizer import hard
    R.rasterize(screen(verts, poses(NP, seed=1)), faces, (H, W), near=1e-3)
    n = hard._rasterize._cache_size()
    # same shapes, a list image size and another near plane: no new compilation
    R.rasterize(screen(verts, poses(NP, seed=5)), faces, [H, W], near=0.5)
    assert hard._rasterize._cache_size() == n


def test_sharded_batch_matches_single_device(eight_devices):
    verts, faces = mesh("cuboid")
    sv = screen(verts, poses(8, seed=9))
    attrs = jnp.asarray(verts, jnp.float32)
    mesh_ = jax.make_mesh((8,), ("data",))
    sharded = jax.device_put(sv, NamedSharding(mesh_, P("data")))
    frags, out = _render(sharded, jnp.asarray(faces), attrs)
    assert frags.face_id.sharding.spec[0] == "data"
    face_id, out = np.asarray(frags.face_id), np.asarray(out)
    # the per-pose loop on one device is the reference (and compiles the 1-pose shape)
    for p in range(8):
        ref_frags, ref = _render(sv[p:p + 1], jnp.asarray(faces), attrs)
        np.testing.assert_array_equal(face_id[p], ref_frags.face_id[0])
        np.testing.assert_allclose(out[p], ref[0], atol=1e-6)


def test_backface_culling_convention_and_two_sided_default():
    verts, faces, ps, both, _ = render("box", seed=11)
    culled = R.rasterize(screen(verts, ps), faces, (H, W), cull_backfaces=True)
    # closed mesh: back faces are never visible, so culling changes nothing
    np.testing.assert_array_equal(both.face_id, culled.face_id)
    # open mesh (top faces removed, seen from above): its inside shows two-sided.
    # Removed faces are collapsed to a point, keeping the shapes (and compilations).
    normals = trimesh.Trimesh(verts, faces, process=False).face_normals
    open_faces = np.where((normals[:, 2] < 0.5)[:, None], faces, 0)
    above = screen(verts, np.array([[0.3, np.deg2rad(70), 0.0, 3.5]] * NP))
    o_fid, _, _ = cast_rays(verts, faces[normals[:, 2] < 0.5], [0.3, np.deg2rad(70), 0.0, 3.5])
    two = R.rasterize(above, open_faces, (H, W))
    one = R.rasterize(above, open_faces, (H, W), cull_backfaces=True)
    assert ((np.asarray(two.face_id[0]) >= 0) == (o_fid >= 0)).mean() > 0.995
    assert (one.face_id >= 0).sum() < 0.5 * (two.face_id >= 0).sum()


# --------------------------------------------------------------------------- gradients and robustness


def test_gradients_match_finite_differences_float64():
    verts, faces = mesh("icosphere")
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        v64 = jnp.asarray(verts, jnp.float64)
        attrs = jnp.asarray(rng.normal(size=(len(verts), 3)), jnp.float64)
        weights = jnp.asarray(rng.normal(size=(H, W, 3)), jnp.float64)
        table = jnp.asarray(rng.normal(size=(len(verts), H * W)), jnp.float64)

        def loss(pose):
            sv = geometry.project_to_screen(v64, pose, FOCAL, jnp.asarray(PRINCIPAL))
            frags = R.rasterize(sv, faces, (H, W))
            feats = R.interpolate(frags, faces, attrs)
            return (jnp.sum(feats * weights) + jnp.sum(frags.depth * weights[..., 0])
                    + jnp.sum(R.interpolate_score(frags, faces, table)))

        pose = jnp.asarray([0.4, 0.3, 0.1, 3.5], jnp.float64)
        vg = jax.jit(jax.value_and_grad(loss))
        value, grad = vg(pose)
        assert grad.dtype == jnp.float64 and np.all(np.isfinite(grad))
        for direction in np.eye(4):
            d = jnp.asarray(direction)
            eps = 1e-7
            fd = (vg(pose + eps * d)[0] - vg(pose - eps * d)[0]) / (2 * eps)
            np.testing.assert_allclose(jnp.dot(grad, d), fd, rtol=1e-4, atol=1e-4 * abs(value))


def test_interpolate_score_is_folded_interpolation():
    verts, faces, _, frags, _ = render("torus", seed=2)
    rng = np.random.default_rng(1)
    feats_v = jnp.asarray(rng.normal(size=(len(verts), 8)), jnp.float32)
    fmap = jnp.asarray(rng.normal(size=(H, W, 8)), jnp.float32)
    direct = np.sum(np.asarray(R.interpolate(frags, faces, feats_v)) * np.asarray(fmap), -1)
    table = jnp.asarray(np.asarray(feats_v) @ np.asarray(fmap).reshape(-1, 8).T)  # [V, H*W]
    np.testing.assert_allclose(R.interpolate_score(frags, faces, table), direct, atol=1e-4)
    # a table per image, broadcast against the poses: [N, 1, V, HW] x [P, H, W]
    per_image = jnp.asarray(np.stack([table, 2 * table])[:, None])
    out = R.interpolate_score(frags, faces, per_image)
    assert out.shape == (2, NP, H, W)
    np.testing.assert_allclose(out[1], 2 * direct, atol=2e-4)


SOUP_V, SOUP_F = 30, 20      # one shape for the robustness tests (one compilation)


@jax.jit
def _soup(sv, faces):
    def loss(sv):
        frags = R.rasterize(sv, faces, (16, 16))
        return (jnp.sum(frags.bary) + jnp.sum(frags.depth)
                + jnp.sum(R.interpolate(frags, faces, sv)), frags)
    return jax.grad(loss, has_aux=True)(sv)


def _pad_soup(sv, faces):
    """Pads to SOUP_V vertices / SOUP_F faces with collapsed (never drawn) faces."""
    sv = np.concatenate([sv, np.zeros((1, SOUP_V - sv.shape[1], 3), np.float32)], 1)
    faces = np.concatenate([faces, np.zeros((SOUP_F - len(faces), 3), np.int32)])
    return jnp.asarray(sv, jnp.float32), jnp.asarray(faces)


def _finite(grad, frags):
    return all(np.all(np.isfinite(np.asarray(x))) for x in (frags.bary, frags.depth, grad))


def test_near_plane_and_degenerate_faces_are_safe():
    # a face crossing z = 0, one behind the camera, one grazing the near plane,
    # an edge-on (zero-area) face and a regular one, all over the same pixels
    sv = np.asarray([[[2, 2, -1], [14, 2, 2], [2, 14, 2],        # crosses z = 0
                      [2, 2, -2], [14, 2, -1], [2, 14, -3],      # behind
                      [1, 1, 1e-3], [15, 1, 1e-3], [1, 15, 1e-3],  # at the near plane
                      [0, 0, 1], [16, 16, 1], [8, 8, 1],         # edge-on
                      [0, 0, 5], [16, 0, 5], [0, 16, 5]]], np.float32)
    faces = np.arange(15, dtype=np.int32).reshape(5, 3)
    grad, frags = _soup(*_pad_soup(sv, faces))
    assert set(np.unique(np.asarray(frags.face_id)).tolist()) == {-1, 4}
    assert _finite(grad, frags)
    # huge but finite coordinates (a vertex just past the near plane)
    sv[0, 12] = (-1e7, 3e6, 1.5e-3)
    assert _finite(*_soup(*_pad_soup(sv, faces)))


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2 ** 31 - 1))
def test_fuzz_random_soups_are_finite_and_consistent(seed):
    rng = np.random.default_rng(seed)
    sv = np.concatenate([rng.uniform(-8, 24, (1, SOUP_V, 2)), rng.uniform(-1, 3, (1, SOUP_V, 1))], -1)
    sv[0, rng.integers(0, SOUP_V, 5), 2] = rng.choice([0.0, 1e-3, -0.0, 1e-9], 5)
    sv[0, 10:13] = sv[0, 10:11]                                  # collapsed face
    faces = rng.integers(0, SOUP_V, (SOUP_F, 3)).astype(np.int32)
    sv, faces = jnp.asarray(sv, jnp.float32), jnp.asarray(faces)
    grad, frags = _soup(sv, faces)
    assert _finite(grad, frags)
    ok = np.asarray(frags.face_id) >= 0
    tri_z = np.asarray(sv[0])[np.asarray(faces)][..., 2]
    winners = np.asarray(frags.face_id)[ok]
    assert np.all(tri_z[winners].min(-1) > 1e-3)                 # nothing behind the near plane
    np.testing.assert_allclose(np.asarray(frags.bary).sum(-1)[ok], 1.0, atol=1e-3)


def test_benchmark_quick_smoke(tmp_path):
    from benchmarks import rasterizer as bench
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out)])
    records = json.loads(out.read_text())
    assert records[0]["name"] == "matmul_gflops" and records[0]["gflops"] > 0
    fields = {"name", "image", "faces", "poses", "channels", "mode", "frames_per_s",
              "compile_s", "peak_rss_mb", "device"}
    assert len(records) == 3 and all(fields <= set(r) for r in records[1:])
    assert all(r["frames_per_s"] > 0 for r in records[1:])
