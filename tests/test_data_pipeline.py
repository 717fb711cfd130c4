"""Few-shot splits, the batch iterator, flip augmentation and sharding."""

import dataclasses

import jax
import numpy as np
import pytest

from nvsm_jax import geometry, parallel
from nvsm_jax.data import (Augment, BatchIterator, PoseSet, UnlabelledSet, flip_pose,
                           hidden_poses, load_pose_set, make_fewshot_split, shard)
from nvsm_jax.data.fewshot import anchor_order
from nvsm_jax.data.testing import write_tiny_root


def _pool(n=120, seed=0, hw=(8, 10)):
    rng = np.random.default_rng(seed)
    poses = np.stack([rng.uniform(0, 2 * np.pi, n), np.deg2rad(rng.uniform(-10, 40, n)),
                      np.deg2rad(rng.normal(0, 5, n)), rng.uniform(4.5, 5.5, n)], 1).astype(np.float32)
    h, w = hw
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    masks = rng.random((n, h, w)) < 0.5
    return PoseSet("car", tuple(f"im{i:04d}" for i in range(n)), images, poses,
                   np.full(n, 300.0, np.float32), np.tile(np.float32([w / 2, h / 2]), (n, 1)),
                   masks, np.zeros_like(masks))


def test_fewshot_nested_and_no_pose_in_unlabelled():
    pool = _pool()
    splits = {k: make_fewshot_split(pool, k) for k in (7, 20, 50)}
    l7, l20, l50 = (splits[k].labelled.names for k in (7, 20, 50))
    assert l7 == l20[:7] and l20 == l50[:20]
    for k, sp in splits.items():
        assert len(sp.labelled) == k and len(sp.unlabelled) == len(pool) - k
        assert not set(sp.labelled.names) & set(sp.unlabelled.names)
        assert set(sp.labelled.names) | set(sp.unlabelled.names) == set(pool.names)
    u = splits[7].unlabelled
    assert isinstance(u, UnlabelledSet)
    fields = {f.name for f in dataclasses.fields(u)}
    assert fields == {"category", "names", "images", "focal", "principal"}
    for value in vars(u).values():                 # no array that could hold poses
        assert not (isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 4)
    np.testing.assert_array_equal(hidden_poses(pool, u.names),
                                  pool.poses[[pool.names.index(n) for n in u.names]])
    with pytest.raises(KeyError):
        hidden_poses(pool, ["nope"])
    # the anchors cover the pose space: 7 anchors spread over azimuth
    az = np.sort(splits[7].anchors.poses[:, 0])
    gaps = np.diff(np.concatenate([az, az[:1] + 2 * np.pi]))
    assert gaps.max() < np.deg2rad(150)
    # deterministic, and spread better than a random pick
    assert make_fewshot_split(pool, 7).labelled.names == l7
    def min_pair(p):
        e = geometry.pose_error(p[:, None], p[None, :], xnp=np)
        return (e + 10 * np.eye(len(p))).min()
    rand = pool.poses[anchor_order(pool.poses, rule="random", count=7)]
    assert min_pair(splits[7].anchors.poses) > min_pair(rand)
    fps = pool.poses[anchor_order(pool.poses, rule="pose_coverage", count=7)]
    assert min_pair(fps) > min_pair(rand)


def test_azimuth_ring_anchors_against_azimuth_distances():
    # At one elevation and theta 0 the geodesic angle between two views is their
    # azimuth difference, so the rule's picks can be checked on azimuths alone.
    rng = np.random.default_rng(3)
    n = 90
    az = rng.uniform(0, 2 * np.pi, n)
    poses = np.stack([az, np.full(n, 0.2), np.zeros(n), np.full(n, 5.0)], 1)
    def circ(a, b):
        return np.abs((a - b + np.pi) % (2 * np.pi) - np.pi)
    order = anchor_order(poses, rule="azimuth_ring", count=50)
    expect = []
    for k in range(7):
        d = circ(az, 2 * np.pi * k / 7)
        d[expect] = np.inf
        expect.append(int(np.argmin(d)))
    assert order[:7].tolist() == expect
    # then farthest-point sampling from those 7
    mind = np.min([circ(az, az[i]) for i in expect], axis=0)
    mind[expect] = -1
    assert order[7] == np.argmax(mind)
    assert len(set(order.tolist())) == 50
    for count in (3, 7, 20):                      # nested, whatever the count
        np.testing.assert_array_equal(anchor_order(poses, rule="azimuth_ring", count=count),
                                      order[:count])
    with pytest.raises(ValueError, match="anchor rule 'nope'"):
        anchor_order(poses, rule="nope")
    for rule in ("azimuth_ring", "pose_coverage", "random"):
        assert anchor_order(poses, rule=rule, count=0).shape == (0,)


def test_split_from_config_uses_the_configured_rule():
    import ml_collections
    from nvsm_jax.data.fewshot import split_from_config
    pool = _pool()
    cfg = ml_collections.ConfigDict({"seed": 0, "anchor_rule": "pose_coverage"})
    fps = split_from_config(pool, 7, cfg).labelled.names
    assert fps == make_fewshot_split(pool, 7, rule="pose_coverage").labelled.names
    assert fps != make_fewshot_split(pool, 7).labelled.names      # default: azimuth_ring
    assert (split_from_config(pool, 7, ml_collections.ConfigDict({"seed": 0})).labelled.names
            == make_fewshot_split(pool, 7, rule="azimuth_ring").labelled.names)


def _project(points, pose, focal, principal):
    return geometry.project_to_screen(points, pose, focal, principal, xnp=np)[..., :2]


def test_flip_rule_by_projection():
    """Mirroring the image == projecting the x-mirrored object under the flipped pose."""
    rng = np.random.default_rng(3)
    half = rng.uniform(-0.5, 0.5, (30, 3))
    pts = np.concatenate([half, half * [-1, 1, 1]])           # symmetric about x = 0
    w = 64
    for _ in range(10):
        pose = np.array([rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.7), rng.normal(0, 0.2),
                         rng.uniform(4.5, 5.5)], np.float32)
        principal = np.array([rng.uniform(20, 44), rng.uniform(20, 44)], np.float32)
        uv = _project(pts, pose, 200.0, principal)
        fpose, fprin = flip_pose(pose, principal, w)
        uv_f = _project(pts * [-1, 1, 1], fpose, 200.0, fprin)
        np.testing.assert_allclose(uv_f[:, 0], w - uv[:, 0], atol=1e-3)
        np.testing.assert_allclose(uv_f[:, 1], uv[:, 1], atol=1e-3)
        # and therefore the symmetric point *set* projects onto the mirrored set
        uv_set = _project(pts, fpose, 200.0, fprin)
        mirrored = np.stack([w - uv[:, 0], uv[:, 1]], 1)
        d = np.linalg.norm(uv_set[:, None] - mirrored[None], axis=-1).min(1)
        assert d.max() < 1e-3


def _keypoint_images(n, hw, seed):
    """PoseSet of ``n`` black images with one coloured pixel per keypoint.

    The object is 16 keypoints, mirror-symmetric about its x = 0 plane: point
    ``k`` and point ``k + 8`` are mirror images. Keypoint ``k`` is painted with
    colour ``(40 + 10 k, 255, 0)`` on the pixel containing its projection under
    the image's own pose (pixel (r, c) covers [c, c + 1) x [r, r + 1)). Poses
    are drawn until no two keypoints share a pixel. Returns (set, points, colours).
    """
    h, w = hw
    rng = np.random.default_rng(seed)
    half = rng.uniform([0.15, -0.6, -0.6], [0.6, 0.6, 0.6], (8, 3))
    pts = np.concatenate([half, half * [-1, 1, 1]])
    colours = np.stack([40 + 10 * np.arange(16), np.full(16, 255), np.zeros(16)], 1)
    images, poses, principal = [], [], []
    while len(images) < n:
        pose = np.array([rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.7), rng.normal(0, 0.3),
                         rng.uniform(4.5, 5.5)], np.float32)
        prin = np.array([rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h], np.float32)
        uv = _project(pts, pose, 40.0, prin)
        cols, rows = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        if len(set(zip(rows, cols))) < 16 or not ((cols >= 0) & (cols < w) & (rows >= 0)
                                                   & (rows < h)).all():
            continue
        img = np.zeros((h, w, 3), np.uint8)
        img[rows, cols] = colours
        images.append(img)
        poses.append(pose)
        principal.append(prin)
    data = PoseSet("car", tuple(f"k{i}" for i in range(n)), np.stack(images), np.stack(poses),
                   np.full(n, 40.0, np.float32), np.stack(principal))
    return data, pts, colours


def test_flipped_batches_keep_keypoints_on_their_pixels():
    """End to end through BatchIterator: after a (random, per row) horizontal flip the
    batch's pose and principal point still put every keypoint on its own pixel.

    Oracle: mirroring the image sends keypoint k's pixel to the mirrored pixel, which
    is where the mirrored keypoint (k + 8 mod 16, the object being symmetric about
    x = 0) projects under the flipped pose. So in a flipped row, the pixel under
    which point ``(k + 8) % 16`` projects with the batch's pose / principal must hold
    colour k; in an unflipped row point k's pixel holds colour k. The image is not
    square (24 x 40), so mixing up the height and the width fails too.
    """
    data, pts, colours = _keypoint_images(8, (24, 40), seed=4)
    it = BatchIterator(data, 8, seed=1, shuffle=False, augment=Augment(flip_prob=0.5, jitter=0.0))
    seen = set()
    for step in range(3):
        b = it.batch(step)
        seen.update(b["flipped"].tolist())
        for row in range(8):
            uv = _project(pts, b["pose"][row], b["focal"][row], b["principal"][row])
            cols, rows = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
            assert ((cols >= 0) & (cols < 40) & (rows >= 0) & (rows < 24)).all()
            src = (np.arange(16) + 8) % 16 if b["flipped"][row] else np.arange(16)
            np.testing.assert_array_equal(b["image"][row][rows, cols], colours[src])
            # and nothing else is painted
            assert (b["image"][row].any(-1)).sum() == 16
    assert seen == {False, True}


def test_unlabelled_flip_mirrors_image_and_principal():
    """An UnlabelledSet has no pose, but a flip must still mirror its principal point
    (``px -> W - px``, ``py`` kept) with the image; with the hidden pose flipped by
    flip_pose the keypoints then land on their pixels (as for a PoseSet)."""
    data, pts, colours = _keypoint_images(4, (24, 40), seed=5)
    unl = UnlabelledSet("car", data.names, data.images, data.focal, data.principal)
    b = BatchIterator(unl, 4, seed=0, shuffle=False,
                      augment=Augment(flip_prob=1.0, jitter=0.0)).batch(0)
    assert b["flipped"].all() and "pose" not in b
    np.testing.assert_allclose(b["principal"][:, 0], 40 - data.principal[:, 0])
    np.testing.assert_allclose(b["principal"][:, 1], data.principal[:, 1])
    np.testing.assert_array_equal(b["image"], data.images[:, :, ::-1])
    for row in range(4):
        pose, _ = flip_pose(data.poses[row], data.principal[row], 40)
        uv = _project(pts, pose, 40.0, b["principal"][row])
        cols, rows = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        np.testing.assert_array_equal(b["image"][row][rows, cols], colours[(np.arange(16) + 8) % 16])


def test_color_jitter_keeps_greys_hues_and_brightness_range():
    """Colour jitter against facts of its three effects (strength 0.3 each):

    * a constant grey image stays grey and only brightness acts on it (contrast
      and saturation move nothing when every pixel equals the mean), so its value
      is ``rint(g * f)`` with ``f`` in [0.7, 1.3]; over 64 images f spreads over
      both halves of the range;
    * saturation, contrast and brightness (with factors > 0) never reorder a
      pixel's channels, so the strongest channel of a clearly coloured pixel
      stays the strongest;
    * strength 0 is the identity.
    """
    from nvsm_jax.data.pipeline import color_jitter

    grey = np.full((64, 4, 5, 3), 120, np.uint8)
    out = color_jitter(grey, np.random.default_rng(0), 0.3, 0.3, 0.3)
    assert (out == out[..., :1]).all()
    assert (out == out[:, :1, :1]).all()
    factor = out[:, 0, 0, 0] / 120.0
    assert factor.min() >= 0.7 - 1 / 120 and factor.max() <= 1.3 + 1 / 120
    assert factor.min() < 0.9 and factor.max() > 1.1

    rng = np.random.default_rng(1)
    images = rng.integers(40, 200, (32, 6, 6, 3), dtype=np.uint8)
    strongest = np.sort(images.astype(int), -1)
    clear = (strongest[..., 2] - strongest[..., 1] > 40)
    out = color_jitter(images, np.random.default_rng(2), 0.3, 0.3, 0.3)
    unclipped = (out < 255).all(-1) & (out > 0).all(-1)
    keep = clear & unclipped
    assert keep.sum() > 500
    np.testing.assert_array_equal(out.argmax(-1)[keep], images.argmax(-1)[keep])
    np.testing.assert_array_equal(color_jitter(images, np.random.default_rng(3), 0, 0, 0), images)


def test_iterator_reproducible_resumable_static_batches():
    pool = _pool(23)
    it = BatchIterator(pool, 8, seed=5, augment=Augment(0.5, 0.2))
    a = [it.batch(s) for s in range(7)]
    b = list(BatchIterator(pool, 8, seed=5, augment=Augment(0.5, 0.2)).iterate(3, 4))
    for x, y in zip(a[3:], b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    for batch in a:
        assert batch["image"].shape == (8, 8, 10, 3) and batch["image"].dtype == np.uint8
        assert batch["pose"].shape == (8, 4) and batch["index"].dtype == np.int32
    # each epoch visits every row once
    idx = np.concatenate([BatchIterator(pool, 8, seed=5).indices(s) for s in range(23)])
    for e in range(8):
        assert sorted(idx[e * 23:(e + 1) * 23]) == list(range(23))
    # epochs differ, seeds differ
    assert not np.array_equal(idx[:23], idx[23:46])
    assert not np.array_equal(BatchIterator(pool, 8, seed=6).indices(0), idx[:8])
    # sets smaller than a batch (7 anchors) still give full batches
    small = BatchIterator(pool.subset(np.arange(7)), 16, seed=0)
    assert small.batch(0)["image"].shape[0] == 16


def test_iterator_flip_and_float_images():
    pool = _pool(10)
    it = BatchIterator(pool, 10, seed=0, shuffle=False, augment=Augment(flip_prob=1.0, jitter=0.0),
                       image_dtype="float32", include_masks=True)
    b = it.batch(0)
    assert b["flipped"].all()
    np.testing.assert_allclose(b["pose"][:, 0], np.mod(2 * np.pi - pool.poses[:, 0], 2 * np.pi), atol=1e-6)
    np.testing.assert_allclose(b["pose"][:, 2], -pool.poses[:, 2])
    np.testing.assert_allclose(b["principal"][:, 0], 10 - pool.principal[:, 0])
    np.testing.assert_array_equal(b["object_mask"], pool.object_mask[:, :, ::-1])
    assert b["image"].dtype == np.float32
    ref = (pool.images[:, :, ::-1].astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(b["image"], ref, atol=1e-5)


def test_unlabelled_iterator_has_no_pose():
    sp = make_fewshot_split(_pool(30), 7)
    b = BatchIterator(sp.unlabelled, 4, seed=0, augment=Augment()).batch(2)
    assert "pose" not in b and b["image"].shape == (4, 8, 10, 3)


def test_shard_over_devices():
    n = jax.device_count()
    mesh = parallel.make_mesh()
    batch = BatchIterator(_pool(20), 2 * n, seed=0).batch(0)
    g, count = shard(batch, mesh)
    assert count == len(batch["image"])
    assert g["image"].shape == batch["image"].shape
    assert len(g["image"].sharding.device_set) == n
    np.testing.assert_array_equal(np.asarray(g["pose"]), batch["pose"])
    odd = {k: v[:5] for k, v in batch.items()}
    g2, count2 = shard(odd, mesh)
    assert count2 == 5 and g2["image"].shape[0] % n == 0


def test_loader_to_split_to_iterator(tmp_path):
    write_tiny_root(tmp_path, "car", 30, size=(16, 16))
    pool = load_pose_set(tmp_path, "car")
    sp = make_fewshot_split(pool, 7)
    b = BatchIterator(sp.labelled, 4).batch(0)
    assert set(b["index"]) <= set(range(7))


def test_hue_rotation_against_channel_cycles_and_hsv():
    from nvsm_jax.data.pipeline import hue_rotation
    import colorsys

    # A third of a turn about the grey axis cycles the primaries: R -> G -> B -> R.
    m = hue_rotation(np.array([2 * np.pi / 3, -2 * np.pi / 3, 0.0]))
    np.testing.assert_allclose(m[0] @ [1.0, 0.0, 0.0], [0, 1, 0], atol=1e-6)
    np.testing.assert_allclose(m[0] @ [0.2, 0.5, 0.9], [0.9, 0.2, 0.5], atol=1e-6)
    np.testing.assert_allclose(m[1] @ [0.2, 0.5, 0.9], [0.5, 0.9, 0.2], atol=1e-6)
    np.testing.assert_allclose(m[2], np.eye(3), atol=1e-7)
    # Any angle keeps greys and turns the HSV hue of a primary by the angle (colorsys);
    # 60 degrees maps pure red onto the R-G-B hexagon's yellow-ward edge direction.
    for deg in (20.0, 75.0, 140.0):
        mm = hue_rotation(np.array([np.radians(deg)]))[0]
        np.testing.assert_allclose(mm @ [0.4, 0.4, 0.4], [0.4] * 3, atol=1e-6)
        rgb = mm @ np.array([1.0, 0.0, 0.0])
        h, _, _ = colorsys.rgb_to_hsv(*np.clip(rgb - rgb.min(), 0, None))
        assert np.isclose(h * 360, deg, atol=8.0), (deg, h * 360)


def test_recolor_hue_and_grayscale():
    from nvsm_jax.data.pipeline import augment_from_config, recolor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)
    same = recolor(images, np.random.default_rng(1), hue=0.0, grayscale_prob=0.0)
    assert same is images
    grey = recolor(images, np.random.default_rng(1), hue=0.0, grayscale_prob=1.0)
    np.testing.assert_allclose(grey[..., 0], images.astype(np.float32).mean(-1), atol=0.51)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    turned = recolor(images, np.random.default_rng(1), hue=1.0)
    assert turned.dtype == np.uint8 and turned.shape == images.shape
    assert not np.array_equal(turned, images)
    # the channel sum (brightness) survives a hue turn, up to rounding and clipping
    inside = (turned > 0).all(-1) & (turned < 255).all(-1)
    diff = turned.astype(int).sum(-1) - images.astype(int).sum(-1)
    assert np.abs(diff[inside]).max() <= 2
    # config blocks: missing fields keep defaults, all-off gives no augmentation
    assert augment_from_config(None) is None
    assert augment_from_config({"flip_prob": 0.0, "jitter": 0.0}) is None
    a = augment_from_config({"flip_prob": 0.5, "jitter": 0.2, "hue": 1.0})
    assert a == Augment(flip_prob=0.5, jitter=0.2, hue=1.0, grayscale_prob=0.0)
    it = BatchIterator(_pool(8), 8, seed=3, shuffle=False, augment=a)
    np.testing.assert_array_equal(it.batch(2)["image"], it.batch(2)["image"])
