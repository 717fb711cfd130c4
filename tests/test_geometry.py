"""Camera geometry against independent oracles.

The PASCAL3D+ projection oracle below is a step-by-step transcription of the
toolkit's MATLAB ``project_3d.m`` (column vectors, the 3x4 projection matrix,
then the 2D in-plane rotation, the y flip and the principal shift), written in
plain numpy float64 without any helper from nvsm_jax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from nvsm_jax import geometry as geo


def toolkit_project_3d(x3d, azimuth_deg, elevation_deg, theta_deg, distance, focal,
                       viewport, px, py):
    """Transcription of PASCAL3D+ ``project_3d.m`` (angles in degrees, as stored)."""
    a = azimuth_deg * np.pi / 180
    e = elevation_deg * np.pi / 180
    d = distance
    C = np.zeros((3, 1))
    C[0] = d * np.cos(e) * np.sin(a)
    C[1] = -d * np.cos(e) * np.cos(a)
    C[2] = d * np.sin(e)
    a = -a
    e = -(np.pi / 2 - e)
    Rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    Rx = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    R = Rx @ Rz
    M = viewport
    P = np.array([[M * focal, 0, 0], [0, M * focal, 0], [0, 0, -1]]) @ np.hstack([R, -R @ C])
    x = P @ np.vstack([x3d.T, np.ones((1, x3d.shape[0]))])
    x[0, :] = x[0, :] / x[2, :]
    x[1, :] = x[1, :] / x[2, :]
    x = x[:2, :]
    t = theta_deg * np.pi / 180
    R2d = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    x = (R2d @ x).T
    x[:, 1] = -x[:, 1]
    return x + np.array([px, py])


def random_poses(rng, n):
    return np.stack([rng.uniform(0, 2 * np.pi, n), rng.uniform(-1.2, 1.2, n),
                     rng.uniform(-np.pi, np.pi, n), rng.uniform(3, 8, n)], -1)


def test_projection_matches_pascal3d_toolkit_numpy_and_jax():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-1, 1, (50, 3))
    for pose in random_poses(rng, 25):
        a, e, t, d = pose
        focal, viewport, principal = 1.0, 3000.0, np.array([321.5, 187.25])
        want = toolkit_project_3d(pts, *np.degrees([a, e, t]), d, focal, viewport, *principal)
        got_np = geo.project_pascal(pts, a, e, t, d, focal, viewport, principal)
        np.testing.assert_allclose(got_np, want, rtol=1e-9, atol=1e-6)
        got_jax = geo.project_to_screen(jnp.asarray(pts, jnp.float32), jnp.asarray(pose, jnp.float32),
                                        focal * viewport, jnp.asarray(principal, jnp.float32))
        # float32 with focal 3000: a few thousandths of a pixel.
        np.testing.assert_allclose(np.asarray(got_jax[:, :2]), want, atol=5e-3)


def test_depth_is_distance_along_the_optical_axis():
    # The origin sits at depth d on the axis and projects to the principal point.
    pose = np.array([0.7, 0.3, -0.2, 5.0])
    scr = geo.project_to_screen(np.zeros((1, 3)), pose, 3000.0, np.array([10.0, 20.0]))
    np.testing.assert_allclose(scr[0], [10.0, 20.0, 5.0], atol=1e-9)


def test_canonical_view_hand_computed():
    # azimuth 0, elevation 0: the camera sits at (0, -d, 0) looking along +y.
    # World +x appears to the right, world +z (up) appears towards smaller rows.
    f, c = 100.0, np.array([50.0, 50.0])
    pose = np.array([0.0, 0.0, 0.0, 5.0])
    scr = geo.project_to_screen(np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), pose, f, c)
    np.testing.assert_allclose(scr[0], [50 + 20.0, 50.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(scr[1], [50.0, 50 - 20.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(scr[2], [50.0, 50.0, 4.0], atol=1e-9)
    # azimuth 90 deg: the camera moves to +x (rotated +90 deg about z with the
    # scene), so its right-hand direction is now world +y and world -y is left.
    scr = geo.project_to_screen(np.array([[0, -1.0, 0]]), np.array([np.pi / 2, 0, 0, 5.0]), f, c)
    np.testing.assert_allclose(scr[0], [30.0, 50.0, 5.0], atol=1e-9)


def test_rotation_pascal_against_scipy():
    rng = np.random.default_rng(1)
    for a, e, t, _ in random_poses(rng, 20):
        # Rz(t) Rx(e - pi/2) Rz(-a) as intrinsic rotations composed left to right.
        want = (Rotation.from_euler("z", t) * Rotation.from_euler("x", e - np.pi / 2)
                * Rotation.from_euler("z", -a)).as_matrix()
        np.testing.assert_allclose(geo.rotation_pascal(a, e, t), want, atol=1e-12)


def test_world_to_camera_is_a_rigid_camera_at_the_pascal_centre():
    rng = np.random.default_rng(2)
    poses = random_poses(rng, 16)
    r, t = geo.world_to_camera(poses)
    np.testing.assert_allclose(r @ np.swapaxes(r, -1, -2), np.broadcast_to(np.eye(3), r.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-12)
    centre = -np.einsum("pji,pj->pi", r, t)  # C = -R^T t
    np.testing.assert_allclose(centre, geo.camera_center(poses[:, 0], poses[:, 1], poses[:, 3]), atol=1e-12)


def test_rotation_error_against_scipy_and_symmetry():
    rng = np.random.default_rng(3)
    r1 = Rotation.random(200, random_state=4)
    r2 = Rotation.random(200, random_state=5)
    want = (r1.inv() * r2).magnitude()
    got = geo.rotation_error(r1.as_matrix(), r2.as_matrix())
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_allclose(geo.rotation_error(r2.as_matrix(), r1.as_matrix()), got, atol=1e-9)
    # near-identity and near-pi stay accurate
    small = Rotation.from_rotvec([1e-5, 0, 0]).as_matrix()
    assert abs(geo.rotation_error(np.eye(3), small) - 1e-5) < 1e-10
    near_pi = Rotation.from_rotvec([0, np.pi - 1e-4, 0]).as_matrix()
    assert abs(geo.rotation_error(np.eye(3), near_pi) - (np.pi - 1e-4)) < 1e-7
    del rng


def test_pose_error_nan_counts_as_half_pi_and_jax_matches_numpy():
    p = np.array([[0.1, 0.2, 0.3, 5.0], [np.nan, 0.2, 0.3, 5.0], [0.0, np.inf, 0.0, 5.0]])
    q = np.array([[0.1, 0.2, 0.3, 5.0]] * 3)
    got = geo.pose_error(p, q)
    np.testing.assert_allclose(got, [0.0, np.pi / 2, np.pi / 2], atol=1e-6)
    rng = np.random.default_rng(6)
    a, b = random_poses(rng, 30), random_poses(rng, 30)
    np.testing.assert_allclose(np.asarray(geo.pose_error(jnp.asarray(a), jnp.asarray(b))),
                               geo.pose_error(a, b), atol=2e-5)


def test_pose_error_gradient_is_finite_at_zero_and_pi_and_matches_differences():
    import jax

    grad = jax.grad(lambda p, q: geo.pose_error(p, q))
    p = jnp.asarray([0.4, 0.2, 0.1, 5.0], jnp.float32)
    g0 = np.asarray(grad(p, p))                           # zero error: the kink
    assert np.all(np.isfinite(g0)) and np.allclose(g0, 0.0)
    flipped = jnp.asarray([0.4 + np.pi, 0.0, 0.0, 5.0])   # exactly pi about the vertical
    assert np.all(np.isfinite(np.asarray(grad(flipped, jnp.asarray([0.4, 0.0, 0.0, 5.0])))))
    # away from the kink: central differences in float64 numpy
    rng = np.random.default_rng(3)
    for _ in range(5):
        a, b = random_poses(rng, 1)[0], random_poses(rng, 1)[0]
        g = np.asarray(grad(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
        for k in range(3):
            e = np.zeros(4)
            e[k] = 1e-6
            fd = (geo.pose_error(a + e, b) - geo.pose_error(a - e, b)) / 2e-6
            assert abs(g[k] - fd) < 2e-3, (k, g[k], fd)
        assert g[3] == 0.0                                # distance plays no part


def test_pose_error_against_scipy_and_single_field_changes():
    """pose_error vs an oracle built from scipy alone: each pose's rotation composed as
    ``Rz(theta) Rx(e - pi/2) Rz(-a)`` with ``Rotation.from_euler`` and the error taken
    as ``|R1^-1 R2|`` (scipy's rotation magnitude). Then by hand: changing only theta
    (a rotation about the optical axis) or only the elevation (at theta 0, a rotation
    about the camera's x axis) by delta gives an error of exactly delta, and the
    distance plays no part."""
    def scipy_rot(p):
        return (Rotation.from_euler("z", p[2]) * Rotation.from_euler("x", p[1] - np.pi / 2)
                * Rotation.from_euler("z", -p[0]))

    rng = np.random.default_rng(11)
    a, b = random_poses(rng, 40), random_poses(rng, 40)
    want = [(scipy_rot(p).inv() * scipy_rot(q)).magnitude() for p, q in zip(a, b)]
    np.testing.assert_allclose(geo.pose_error(a, b), want, atol=1e-9)
    np.testing.assert_allclose(geo.pose_error(b, a), want, atol=1e-9)
    base = np.array([1.2, 0.4, 0.0, 5.0])
    for field in (1, 2):
        for delta in (0.05, 0.7, 2.0):
            other = base.copy()
            other[field] += delta
            assert abs(geo.pose_error(base, other) - delta) < 1e-9, (field, delta)
    far = base.copy()
    far[3] = 50.0
    assert geo.pose_error(base, far) < 1e-12


def test_azimuth_difference_is_the_geodesic_error_at_zero_elevation():
    a = np.array([0.0, 0.0, 0.0, 5.0])
    for delta in [0.1, 1.0, 2.5]:
        b = a.copy()
        b[0] = delta
        assert abs(geo.pose_error(a, b) - delta) < 1e-9


def test_rotation_to_pose_round_trip_including_poles():
    rng = np.random.default_rng(7)
    poses = random_poses(rng, 200)
    poses[:, 1] = rng.uniform(-np.pi / 2 + 1e-3, np.pi / 2 - 1e-3, 200)
    r = geo.rotation_pascal(poses[:, 0], poses[:, 1], poses[:, 2])
    a, e, t = geo.rotation_to_pose(r)
    np.testing.assert_allclose(geo.rotation_pascal(a, e, t), r, atol=1e-9)
    np.testing.assert_allclose(e, poses[:, 1], atol=1e-9)
    assert np.all((a >= 0) & (a < 2 * np.pi))
    for elev in (np.pi / 2, -np.pi / 2):
        r = geo.rotation_pascal(1.1, elev, 0.4)
        a, e, t = geo.rotation_to_pose(r)
        np.testing.assert_allclose(geo.rotation_pascal(a, e, t), r, atol=1e-9)
        assert t == 0.0


def test_nemo_pose_grid():
    grid = geo.nemo_pose_grid()
    assert grid.shape == (144, 4)
    assert len(np.unique(np.round(grid[:, 0], 5))) == 12
    np.testing.assert_allclose(np.unique(np.round(grid[:, 1], 6)),
                               np.round(np.linspace(-np.pi / 6, np.pi / 3, 4), 6), atol=1e-6)
    np.testing.assert_allclose(np.unique(np.round(grid[:, 2], 6)), [-np.pi / 6, 0, np.pi / 6], atol=1e-6)
    assert np.all(grid[:, 3] == 5.0)


@pytest.mark.parametrize("use_jax", [False, True])
def test_sample_poses_at_angle_has_the_requested_geodesic_distance(use_jax):
    pose = np.array([1.0, 0.3, 0.1, 5.0], np.float32)
    rng = jax.random.key(0) if use_jax else np.random.default_rng(0)
    for angle in [np.pi / 18, np.pi / 6, 1.0]:
        samples = geo.sample_poses_at_angle(rng, pose, angle, 64)
        assert samples.shape == (64, 4)
        err = geo.pose_error(np.asarray(samples, np.float64), np.asarray(pose, np.float64)[None])
        np.testing.assert_allclose(err, angle, atol=1e-3 if use_jax else 1e-6)
        np.testing.assert_allclose(np.asarray(samples)[:, 3], 5.0)
    # axes are spread out: the samples are not all the same pose
    assert np.std(np.asarray(samples)[:, :3], axis=0).min() > 0.05


def test_geometry_is_jittable_vmappable_and_differentiable():
    pts = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, (10, 3)), jnp.float32)
    poses = jnp.asarray(geo.nemo_pose_grid()[:8])
    f = jax.jit(jax.vmap(lambda p: geo.project_to_screen(pts, p, 500.0, jnp.array([64.0, 64.0]))))
    out = f(poses)
    assert out.shape == (8, 10, 3)
    want = geo.project_to_screen(pts, poses, 500.0, jnp.array([64.0, 64.0]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-3)
    g = jax.grad(lambda p: geo.project_to_screen(pts, p, 500.0, jnp.zeros(2))[..., :2].sum())(poses[3])
    assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0
    ge = jax.grad(lambda p: geo.pose_error(p, poses[4]))(poses[3])
    assert np.all(np.isfinite(np.asarray(ge)))


def test_intrinsics_presets():
    intr = geo.nemo_intrinsics((256, 672), stride=8)
    assert intr.focal == pytest.approx(375.0)
    np.testing.assert_allclose(intr.principal, [42.0, 16.0])
    half = geo.scale_intrinsics(intr, 0.5)
    assert half.focal == pytest.approx(187.5)
    np.testing.assert_allclose(half.principal, [21.0, 8.0])


def test_points_behind_the_camera_stay_finite():
    pts = np.array([[0.0, -5.0, 0.0], [0.0, -6.0, 0.1]])  # at and behind the camera centre
    scr = geo.project_to_screen(pts, np.array([0.0, 0.0, 0.0, 5.0]), 3000.0, np.zeros(2))
    assert np.all(np.isfinite(scr))
    assert scr[0, 2] <= 0 and scr[1, 2] < 0
