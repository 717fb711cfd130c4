"""Mesh loading/validation and the NeMo cuboid, checked with trimesh as the oracle."""

import numpy as np
import pytest
import trimesh

from nvsm_jax import meshes


def test_cuboid_is_a_closed_outward_box_with_about_n_vertices():
    lower, upper = np.array([-1.0, -0.4, -0.3]), np.array([1.0, 0.4, 0.5])
    m = meshes.cuboid_mesh(lower, upper, num_vertices=1000)
    assert abs(len(m.verts) - 1000) < 120
    np.testing.assert_allclose(m.verts.min(0), lower, atol=1e-6)
    np.testing.assert_allclose(m.verts.max(0), upper, atol=1e-6)
    # merge the duplicated edge vertices: a closed, consistently outward box
    tm = trimesh.Trimesh(m.verts, m.faces, process=True)
    assert tm.is_watertight and tm.is_winding_consistent
    assert tm.volume == pytest.approx(np.prod(upper - lower), rel=1e-5)  # > 0: outward
    # every face normal points away from the centre
    centres = m.verts[m.faces].mean(1)
    normals = trimesh.Trimesh(m.verts, m.faces, process=False).face_normals
    assert np.all(np.einsum("fi,fi->f", normals, centres - (lower + upper) / 2) > 0)


def test_cuboid_for_points_covers_the_requested_fraction():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(20000, 3)) * [1.0, 0.5, 0.3]
    m = meshes.cuboid_for_points(pts, coverage=0.98, symmetric_axes=(0,))
    lo, hi = m.verts.min(0), m.verts.max(0)
    per_axis = [np.mean((pts[:, k] >= lo[k]) & (pts[:, k] <= hi[k])) for k in range(3)]
    assert all(0.975 <= f <= 0.99 for f in per_axis[1:]), per_axis
    assert lo[0] == pytest.approx(-hi[0])


def test_load_off_round_trip_and_errors(tmp_path):
    m = meshes.cuboid_mesh([-1, -1, -1], [1, 1, 1], 200)
    path = tmp_path / "cad" / "01.off"
    meshes.save_off(path, m.verts, m.faces)
    back = meshes.load_mesh(path)
    np.testing.assert_allclose(back.verts, m.verts, atol=1e-5)
    np.testing.assert_array_equal(back.faces, m.faces)
    with pytest.raises(meshes.MeshError, match="not found"):
        meshes.load_mesh(tmp_path / "missing.off")
    bad = tmp_path / "bad.off"
    bad.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 7\n")
    with pytest.raises(meshes.MeshError, match="bad.off"):
        meshes.load_mesh(bad)
    garbage = tmp_path / "garbage.off"
    garbage.write_bytes(b"\x00\x01 not a mesh")
    with pytest.raises(meshes.MeshError, match="garbage.off"):
        meshes.load_mesh(garbage)


def test_validate_mesh_reports_and_removes_degenerate_faces():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0]], float)
    f = np.array([[0, 1, 2], [0, 1, 3], [1, 1, 2]])
    m = meshes.validate_mesh(v, f)
    np.testing.assert_array_equal(m.faces, [[0, 1, 2]])
    with pytest.raises(meshes.MeshError, match="degenerate"):
        meshes.validate_mesh(v, f, remove_degenerate=False)
    with pytest.raises(meshes.MeshError, match="not finite"):
        meshes.validate_mesh(np.array([[0, 0, np.nan], [1, 0, 0], [0, 1, 0]]), [[0, 1, 2]])
    with pytest.raises(meshes.MeshError, match="triangles"):
        meshes.validate_mesh(v, [[0, 1, 2, 3]])
    with pytest.raises(meshes.MeshError, match="V > 0"):
        meshes.validate_mesh(np.zeros((0, 3)), [[0, 1, 2]])
