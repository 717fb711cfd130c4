"""Neural view synthesis against feature maps rendered directly at the target pose.

The oracle: a cuboid carrying a smooth per-vertex feature field. Its feature map
rendered at the anchor pose plays the backbone's output F_A; synthesising from
F_A at a new pose must reproduce the field rendered directly at that pose
wherever the synthesised view is valid.
"""

import jax.numpy as jnp
import numpy as np

import rasterizer
from nvsm_jax.nemo import features
from nvsm_jax import geometry, meshes
from nvsm_jax.nvsm import synthesis

MAP_HW = (32, 32)
FOCAL = 160.0            # the cuboid spans ~2/3 of the 32 x 32 map at distance 5
PRINCIPAL = np.array([16.0, 16.0], np.float32)


def _scene():
    object_mesh = meshes.cuboid_mesh([-0.5, -0.25, -0.2], [0.5, 0.25, 0.2], 600)
    v = object_mesh.verts
    field = np.stack([np.sin(2.5 * v[:, 0]), np.cos(3.0 * v[:, 1]), np.sin(4.0 * v[:, 2] + 1.0),
                      np.cos(2.0 * v[:, 0] + 3.0 * v[:, 2]), np.ones(len(v))], -1)
    field /= np.linalg.norm(field, axis=-1, keepdims=True)
    return jnp.asarray(v), jnp.asarray(object_mesh.faces), jnp.asarray(object_mesh.verts), jnp.asarray(field, jnp.float32)


def _render(verts, faces, field, pose):
    screen = geometry.project_to_screen(verts, pose, FOCAL, PRINCIPAL)
    frags = rasterizer.rasterize(screen, faces, MAP_HW)
    return rasterizer.interpolate(frags, faces, field), frags.face_id >= 0


def _anchor_vertex_features(verts, faces, field, pose):
    fmap, _ = _render(verts, faces, field, pose)
    normals = jnp.asarray(meshes.vertex_normals(np.asarray(verts), np.asarray(faces)))
    vf = features.vertex_features(fmap[None], verts, faces, normals, pose[None],
                                  jnp.array([FOCAL]), jnp.asarray(PRINCIPAL)[None], stride=1)
    return fmap, vf.features[0], vf.visible[0]


def _mean_cosine(a, b, mask):
    a = np.asarray(a)[mask]
    b = np.asarray(b)[mask]
    cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-9)
    return cos.mean(), np.percentile(cos, 5)


def test_zero_offset_reproduces_the_anchor_map_on_the_object():
    verts, faces, _, field = _scene()
    pose = jnp.array([0.6, 0.35, 0.05, 5.0])
    fmap, vfeat, vis = _anchor_vertex_features(verts, faces, field, pose)
    feats, mask = synthesis.synthesize_views(vfeat, vis, verts, faces, pose[None], FOCAL,
                                             jnp.asarray(PRINCIPAL), MAP_HW)
    _, sil = _render(verts, faces, field, pose)
    mask, sil = np.asarray(mask[0]), np.asarray(sil)
    assert mask.sum() >= 0.9 * sil.sum()           # almost every object pixel is valid
    assert not np.any(mask & ~sil)                 # never outside the object
    mean, p5 = _mean_cosine(feats[0], fmap, mask)
    assert mean > 0.995 and p5 > 0.97, (mean, p5)


def test_new_views_match_the_field_rendered_at_the_target_pose():
    verts, faces, _, field = _scene()
    anchor = jnp.array([0.6, 0.35, 0.0, 5.0])
    targets = anchor[None] + jnp.array([[0.35, 0.0, 0, 0], [-0.35, 0.1, 0, 0], [0.0, -0.2, 0, 0]])
    _, vfeat, vis = _anchor_vertex_features(verts, faces, field, anchor)
    feats, mask = synthesis.synthesize_views(vfeat, vis, verts, faces, targets, FOCAL,
                                             jnp.asarray(PRINCIPAL), MAP_HW)
    for k in range(3):
        direct, sil = _render(verts, faces, field, targets[k])
        m = np.asarray(mask[k])
        assert m.sum() > 0.5 * np.asarray(sil).sum()
        mean, p5 = _mean_cosine(feats[k], direct, m)
        assert mean > 0.99 and p5 > 0.95, (k, mean, p5)
    # pixels whose face was hidden from the anchor are masked out: turning the
    # object around (180 deg) leaves little valid
    _, far_mask = synthesis.synthesize_views(vfeat, vis, verts, faces, (anchor + jnp.array([np.pi, 0, 0, 0]))[None],
                                             FOCAL, jnp.asarray(PRINCIPAL), MAP_HW)
    assert np.asarray(far_mask).sum() < 0.5 * np.asarray(mask[0]).sum()


def test_synthesize_many_equals_a_loop_over_anchors():
    verts, faces, _, field = _scene()
    anchors = jnp.array([[0.6, 0.35, 0.0, 5.0], [2.0, 0.1, 0.1, 5.0]])
    offs = jnp.array([[0.0, 0, 0, 0], [0.3, 0, 0, 0]])
    vf, vv = zip(*[_anchor_vertex_features(verts, faces, field, a)[1:] for a in anchors])
    vf, vv = jnp.stack(vf), jnp.stack(vv)
    targets = anchors[:, None] + offs[None]
    f_all, m_all = synthesis.synthesize_many(vf, vv, verts, faces, targets, jnp.full((2,), FOCAL),
                                             jnp.tile(jnp.asarray(PRINCIPAL), (2, 1)), MAP_HW)
    for a in range(2):
        f, m = synthesis.synthesize_views(vf[a], vv[a], verts, faces, targets[a], FOCAL,
                                          jnp.asarray(PRINCIPAL), MAP_HW)
        np.testing.assert_allclose(np.asarray(f_all[a]), np.asarray(f), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(m_all[a]), np.asarray(m))


def test_partly_seen_faces_average_only_their_seen_vertices():
    """Hand-placed vertex features (the smooth field at each vertex) with only the
    vertices at x < 0.1 marked as seen by the anchor, synthesised at a new pose.

    The oracle is the rule written out in numpy from the rasteriser's fragments at
    that pose (face and barycentrics b of every pixel): with s_j = 1 for a seen
    vertex, the weight is w = sum_j b_j s_j, the pixel is valid iff it is on the
    object and w >= 0.5, and its feature is sum_j b_j s_j f_j / w (the seen
    vertices' features with renormalised barycentrics), zero elsewhere. The target
    pose shows the seen/unseen border, so many pixels have 0.5 <= w < 1, where
    skipping the renormalisation or letting unseen vertices contribute changes the
    value (a cosine comparison would not notice the first)."""
    verts, faces, _, field = _scene()
    seen = np.asarray(verts)[:, 0] < 0.1
    target = jnp.array([0.9, 0.3, 0.0, 5.0])
    feats, mask = synthesis.synthesize_views(field, jnp.asarray(seen), verts, faces, target[None],
                                             FOCAL, jnp.asarray(PRINCIPAL), MAP_HW)
    feats, mask = np.asarray(feats[0], np.float64), np.asarray(mask[0])
    frags = rasterizer.rasterize(geometry.project_to_screen(verts, target, FOCAL, PRINCIPAL),
                                 faces, MAP_HW)
    fid, bary = np.asarray(frags.face_id), np.asarray(frags.bary, np.float64)
    f, tri = np.asarray(field, np.float64), np.asarray(faces)
    want = np.zeros_like(feats)
    want_mask = np.zeros(MAP_HW, bool)
    weight = np.zeros(MAP_HW)
    for r in range(MAP_HW[0]):
        for c in range(MAP_HW[1]):
            if fid[r, c] < 0:
                continue
            corner = tri[fid[r, c]]
            bs = bary[r, c] * seen[corner]
            weight[r, c] = bs.sum()
            want_mask[r, c] = weight[r, c] >= 0.5
            if want_mask[r, c]:
                want[r, c] = bs @ f[corner] / weight[r, c]
    partial = want_mask & (weight < 0.99)
    assert partial.sum() >= 10, partial.sum()                    # the border is in view
    assert np.sum((fid >= 0) & (weight < 0.5) & (weight > 0)) >= 5
    assert want_mask.sum() >= 60 and np.sum((fid >= 0) & ~want_mask) >= 60
    sure = np.abs(weight - 0.5) > 1e-4                           # no float ties at the cut
    np.testing.assert_array_equal(mask[sure], want_mask[sure])
    np.testing.assert_allclose(feats[mask & sure], want[mask & sure], atol=1e-5)
    assert np.all(feats[~mask] == 0)
    # at the border the renormalised average is not the raw barycentric sum
    raw = np.einsum("hwk,hwkd->hwd", bary * seen[tri[np.maximum(fid, 0)]],
                    f[tri[np.maximum(fid, 0)]])
    assert np.max(np.abs(raw[partial] - want[partial])) > 0.05
