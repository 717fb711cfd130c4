"""Geometry and data that used to go wrong quietly (issue 30, finding 5 and the mesh of
random bytes): each case asserts the refusal, the warning or the corrected value."""

import logging
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from nvsm_jax import meshes
from nvsm_jax.data import DataError, load_model_mesh, load_pose_set
from nvsm_jax.data.format import save_npz
from nvsm_jax.data.loaders import load_annotation, load_image
from nvsm_jax.data.testing import write_tiny_root


def _mesh_path(root):
    return os.path.join(root, "CAD_single", "car", "01.off")


def _edit_annotation(root, name, **fields):
    path = os.path.join(root, "annotations", "car", name + ".npz")
    with np.load(path) as z:
        ann = {k: z[k] for k in z.files}
    ann.update(fields)
    save_npz(path, **ann)
    return path


def _png16(path, a):
    """Writes a 16-bit PNG ([H, W] grey or [H, W, 3] colour uint16) by hand."""
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + \
            struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", w, h, 16, 2 if a.ndim == 3 else 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))


def test_mesh_scaled_x100_puts_the_camera_inside_and_is_refused(tmp_path):
    write_tiny_root(tmp_path, num=4)
    train = load_pose_set(tmp_path, "car")
    object_mesh = load_model_mesh(tmp_path, "car", pose_set=train)      # the tiny root is fine
    meshes.save_off(_mesh_path(tmp_path), object_mesh.verts * 100, object_mesh.faces)
    with pytest.raises(meshes.MeshError, match=r"01\.off: the camera is inside the mesh's "
                       r"bounding box .* for 4 of 4 images") as info:
        load_model_mesh(tmp_path, "car", pose_set=train)
    assert "car_000" in str(info.value) and len(str(info.value).splitlines()) <= 3


def test_a_long_mesh_seen_from_close_by_passes_and_a_few_inside_warn(caplog):
    """The box, not a sphere about the origin: a bus-like box seen side-on from 1.0 (0.7
    outside its side face) passes, though its farthest vertex is 1.3 away; one camera
    of 4 inside is a warning naming it, 3 of 4 a refusal."""
    bus = meshes.cuboid_mesh([-0.3, -1.2, -0.35], [0.3, 1.2, 0.35], 200)
    side = np.array([[np.pi / 2, 0.0, 0.0, 1.0]])                    # camera at x = 1
    meshes.check_camera_outside(bus, side, source="bus.off")
    inside = np.array([[0.0, 0.0, 0.0, 0.5]])                        # camera at y = -0.5
    with caplog.at_level("WARNING"):
        meshes.check_camera_outside(bus, np.concatenate([side, side, side, inside]),
                                    source="bus.off", names=["a", "b", "c", "d"])
    assert "bus.off: the camera is inside" in caplog.text and "image d" in caplog.text
    with pytest.raises(meshes.MeshError, match=r"for 3 of 4 images"):
        meshes.check_camera_outside(bus, np.concatenate([side, inside, inside, inside]),
                                    source="bus.off")


def test_flattened_mesh_warns_with_the_count_of_dropped_faces(tmp_path, caplog):
    write_tiny_root(tmp_path, num=2)
    object_mesh = load_model_mesh(tmp_path, "car")
    flat = object_mesh.verts.copy()
    flat[:, 2] = 0.0
    meshes.save_off(_mesh_path(tmp_path), flat, object_mesh.faces)
    tri = flat[object_mesh.faces].astype(np.float64)
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=-1)
    dropped = int(np.sum(area <= 2e-12))
    assert 0 < dropped < len(object_mesh.faces)
    with caplog.at_level(logging.WARNING, logger="nvsm_jax.meshes"):
        back = load_model_mesh(tmp_path, "car")
    assert len(back.faces) == len(object_mesh.faces) - dropped
    assert f"01.off: dropped {dropped} of {len(object_mesh.faces)} degenerate faces" in caplog.text


def test_mesh_with_only_degenerate_faces_is_refused():
    line = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], float)
    with pytest.raises(meshes.MeshError, match=r"line\.off: every one of its 2 faces is "
                       "degenerate"):
        meshes.validate_mesh(line, [[0, 1, 2], [1, 2, 3]], source="line.off")


def test_mesh_of_random_bytes_is_named_not_a_missing_module(tmp_path):
    write_tiny_root(tmp_path, num=2)
    rng = np.random.default_rng(0)
    with open(_mesh_path(tmp_path), "wb") as f:
        f.write(b"\xff\xfe" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(meshes.MeshError, match=r"01\.off: not a text mesh file \(byte 0 is not "
                       r"UTF-8"):
        meshes.load_mesh(_mesh_path(tmp_path))
    with pytest.raises(DataError, match=r"01\.off: not a text mesh file"):
        load_model_mesh(tmp_path, "car")


@pytest.mark.parametrize("lazy", [False, True])
def test_principal_point_outside_the_image_is_refused(tmp_path, lazy):
    names = write_tiny_root(tmp_path, num=3)                  # images 32 x 48
    _edit_annotation(tmp_path, names[1], principal=np.array([1e6, 1e6]))
    with pytest.raises(DataError, match=r"car_0001\.npz: principal point \(1e\+06, 1e\+06\) "
                       r"lies outside its image .*car_0001\.png \(48x32\)"):
        load_pose_set(tmp_path, "car", lazy_images=lazy)
    assert load_pose_set(tmp_path, "car", skip_bad=True, lazy_images=lazy).names == \
        (names[0], names[2])
    _edit_annotation(tmp_path, names[1], principal=np.array([48.0, 0.0]))  # on the edge: fine
    assert len(load_pose_set(tmp_path, "car", lazy_images=lazy)) == 3


def test_16_bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    grey = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as im:
        assert im.mode == "I;16"
    img = load_image(tmp_path / "grey16.png")
    assert img.shape == (32, 48, 3) and img.dtype == np.uint8
    expected = np.round(grey / 257.0).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], expected)
    assert 120 < img.mean() < 135                               # PIL's clip gave ~254
    _png16(tmp_path / "grey16b.png", np.full((4, 5), 30000, np.uint16))
    np.testing.assert_array_equal(load_image(tmp_path / "grey16b.png"), 117)


def test_16_bit_colour_png_is_scaled(tmp_path):
    _png16(tmp_path / "rgb16.png", np.full((4, 5, 3), [1000, 30000, 65535], np.uint16))
    img = load_image(tmp_path / "rgb16.png")
    np.testing.assert_allclose(img.reshape(-1, 3), [[4, 117, 255]] * 20, atol=1)


def test_float_image_of_unknown_range_is_refused(tmp_path):
    Image.fromarray(np.full((4, 5), 0.5, np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f\.tiff: float image \(PIL mode F\) of unknown range"):
        load_image(tmp_path / "f.tiff")


@pytest.mark.parametrize("key", ["azimuth", "distance", "focal"])
def test_boolean_annotation_is_refused(tmp_path, key):
    names = write_tiny_root(tmp_path, num=2)
    path = _edit_annotation(tmp_path, names[0], **{key: np.bool_(True)})
    with pytest.raises(DataError, match=rf"car_0000\.npz: annotation '{key}' is a boolean "
                       r"\(True\), not a number"):
        load_annotation(path)
    with pytest.raises(DataError, match=r"car_0000\.npz: annotation '%s'" % key):
        load_pose_set(tmp_path, "car")


def test_boolean_principal_and_non_finite_poses_are_refused(tmp_path):
    names = write_tiny_root(tmp_path, num=2)
    path = _edit_annotation(tmp_path, names[0], principal=np.array([True, False]))
    with pytest.raises(DataError, match=r"car_0000\.npz: annotation 'principal' must be 2 "
                       "numbers, got bool"):
        load_annotation(path)
    for key, value in (("azimuth", np.nan), ("elevation", -np.inf), ("distance", np.inf)):
        path = _edit_annotation(tmp_path, names[0], principal=np.array([24.0, 16.0]),
                                **{key: np.float64(value)})
        with pytest.raises(DataError, match=rf"car_0000\.npz: annotation '{key}' is not finite"):
            load_annotation(path)
        _edit_annotation(tmp_path, names[0], **{key: np.float64(0.5 if key != "distance" else 5)})
    assert len(load_pose_set(tmp_path, "car")) == 2
