"""Loaders on fixtures written in every supported format, and bad-input errors."""

import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from nvsm_jax import geometry, meshes
from nvsm_jax.data import DataError, load_model_mesh, load_pose_set
from nvsm_jax.data import format as fmt
from nvsm_jax.data import kitti, pascal3d
from nvsm_jax.data.testing import write_tiny_root


def _ann(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_roundtrip_png_with_masks(tmp_path):
    names = write_tiny_root(tmp_path, "car", 5, size=(20, 30))
    ps = load_pose_set(tmp_path, "car")
    assert ps.names == tuple(names)
    assert ps.images.shape == (5, 20, 30, 3) and ps.images.dtype == np.uint8
    assert ps.poses.shape == (5, 4) and ps.poses.dtype == np.float32
    assert ps.focal.shape == (5,) and np.allclose(ps.focal, 200.0)
    assert np.allclose(ps.principal, [15, 10])
    assert ps.object_mask.shape == (5, 20, 30) and ps.object_mask.dtype == bool
    assert not ps.occluder_mask.any()
    ann = _ann(tmp_path / "annotations/car/car_0000.npz")
    assert np.isclose(ps.poses[0, 0], ann["azimuth"]) and np.isclose(ps.poses[0, 3], ann["distance"])
    assert load_pose_set(tmp_path, "car", limit=2).names == tuple(names[:2])
    mesh = load_model_mesh(tmp_path, "car")
    assert mesh.verts.shape[1] == 3


def test_occluded_pascal_jpeg_no_masks(tmp_path):
    """NeMo-preprocessed OccludedPASCAL3D+: FGLk_BGLk folders, JPEG, no masks."""
    write_tiny_root(tmp_path, "bus", 4, occlusion="L2", masks=False, ext=".JPEG")
    assert os.path.isdir(tmp_path / "images/busFGL2_BGL2")
    ps = load_pose_set(tmp_path, "bus", "L2")
    assert len(ps) == 4 and ps.object_mask is None and ps.occluder_mask is None
    assert load_pose_set(tmp_path, "bus", "FGL2_BGL2").names == ps.names
    with pytest.raises(DataError):
        load_pose_set(tmp_path, "bus", "L1")


def test_list_names_with_extensions_and_several_lists(tmp_path):
    names = write_tiny_root(tmp_path, "car", 4)
    os.remove(tmp_path / "lists/car/mesh01.txt")
    fmt.write_list(tmp_path / "lists/car/mesh01.txt", [n + ".png" for n in names[:2]])
    fmt.write_list(tmp_path / "lists/car/mesh02.txt", names[2:])
    assert load_pose_set(tmp_path, "car").names == tuple(names)


def test_npz_is_deterministic(tmp_path):
    fmt.save_npz(tmp_path / "a.npz", x=np.arange(3), y=np.float64(2))
    fmt.save_npz(tmp_path / "b.npz", y=np.float64(2), x=np.arange(3))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    z = _ann(tmp_path / "a.npz")
    assert list(z["x"]) == [0, 1, 2]


@pytest.mark.parametrize("damage", ["missing_image", "corrupt_image", "missing_key", "nan",
                                    "list_names_missing", "size_mismatch", "bad_mask"])
def test_bad_input_raises_naming_file_or_skips(tmp_path, damage, caplog):
    names = write_tiny_root(tmp_path, "car", 4, size=(16, 16))
    bad = names[2]
    img = tmp_path / "images/car" / (bad + ".png")
    ann = tmp_path / "annotations/car" / (bad + ".npz")
    if damage == "missing_image":
        os.remove(img)
        culprit = str(tmp_path / "images/car" / bad)
    elif damage == "corrupt_image":
        img.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        culprit = str(img)
    elif damage in ("missing_key", "nan", "bad_mask"):
        fields = _ann(ann)
        if damage == "missing_key":
            del fields["elevation"]
        elif damage == "nan":
            fields["azimuth"] = np.float64(np.nan)
        else:
            fields["object_mask"] = np.zeros((3, 3), bool)
        fmt.save_npz(ann, **fields)
        culprit = str(ann)
    elif damage == "list_names_missing":
        fmt.write_list(tmp_path / "lists/car/mesh01.txt", names + ["ghost"])
        bad = "ghost"
        culprit = str(tmp_path / "annotations/car/ghost.npz")
    else:
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
        culprit = str(img)
    with pytest.raises(DataError) as err:
        load_pose_set(tmp_path, "car")
    assert culprit in str(err.value)
    ps = load_pose_set(tmp_path, "car", skip_bad=True)
    assert bad not in ps.names and len(ps) == len(names) - (damage != "list_names_missing")
    assert "skipped 1" in caplog.text


def test_missing_mesh_names_file(tmp_path):
    write_tiny_root(tmp_path, "car", 2)
    with pytest.raises(DataError, match="02.off"):
        load_model_mesh(tmp_path, "car", cad_index=2)


# --------------------------------------------------------------------------- raw PASCAL3D+

def _write_pascal_raw(root, cat="car"):
    """One 200x300 image with two objects (one car, one other class) + a CAD model."""
    os.makedirs(root / "Annotations" / f"{cat}_imagenet")
    os.makedirs(root / "Images" / f"{cat}_imagenet")
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, :, 0] = np.arange(300)[None, :] % 256
    img[:, :, 1] = np.arange(200)[:, None]
    Image.fromarray(img).save(root / "Images" / f"{cat}_imagenet" / "n0001.JPEG", quality=98)
    vp = {"azimuth": 30.0, "elevation": 10.0, "theta": 5.0, "distance": 6.5, "focal": 1.0,
          "px": 140.0, "py": 95.0, "viewport": 2000.0}
    dtype = [("class", object), ("bbox", object), ("cad_index", object), ("truncated", object),
             ("occluded", object), ("difficult", object), ("viewpoint", object)]
    objs = np.zeros((2,), dtype=dtype)
    objs[0] = (cat, np.array([60.0, 40, 220, 150]), 2, 0, 0, 0, vp)
    objs[1] = ("person", np.array([1.0, 1, 10, 10]), 1, 0, 0, 0, vp)
    scipy.io.savemat(root / "Annotations" / f"{cat}_imagenet" / "n0001.mat",
                     {"record": {"filename": "n0001.JPEG", "objects": objs}})
    cub = meshes.cuboid_mesh([-0.3, -0.6, -0.25], [0.3, 0.6, 0.25], 300)
    for k in (1, 2):
        meshes.save_off(root / "CAD" / cat / f"{k:02d}.off", *cub)
    return vp


def test_prepare_pascal3d_projection_lands_on_object(tmp_path):
    raw = tmp_path / "raw"
    _write_pascal_raw(raw)
    out = tmp_path / "out"
    pascal3d.prepare_pascal3d(raw, out, ["car"], crop_hw=(128, 160), target_focal=600.0)
    root = out / "train"
    assert (root / "lists/car/mesh02.txt").read_text().split() == ["n0001_00"]
    ps = load_pose_set(root, "car")
    assert ps.images.shape == (1, 128, 160, 3) and ps.object_mask is None
    np.testing.assert_allclose(ps.poses[0, :3], np.deg2rad([30, 10, 5]), atol=1e-6)
    ann = _ann(root / "annotations/car/n0001_00.npz")
    assert int(ann["cad_index"]) == 2
    s = 6.5 / 5 * 600 / 2000
    assert np.isclose(ps.focal[0], 2000 * s) and np.isclose(ps.focal[0] / ps.poses[0, 3], 600 / 5)
    # A world point projected with the raw MATLAB toolkit fields (1-based) vs with the
    # stored fields, carried through the scale and crop: they must agree exactly.
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (20, 3))
    raw_uv = geometry.project_pascal(pts, *np.deg2rad([30, 10, 5]), 6.5, 1.0, 2000.0,
                                     np.array([140.0, 95.0]), xnp=np)   # MATLAB 1-based
    screen = raw_uv - 0.5
    offset = s * np.array([139.5, 94.5]) - np.array([80.0, 64.0])
    stored_uv = geometry.project_pascal(pts, *ps.poses[0], 1.0, ps.focal[0], ps.principal[0], xnp=np)
    np.testing.assert_allclose(stored_uv, s * screen - offset, atol=1e-3)
    # the crop content moved the same way: the image gradient encodes the source column
    col = 100  # source pixel column 100 (centre 100.5) -> crop x
    x_crop = s * 100.5 - offset[0]
    c = int(np.floor(x_crop))
    assert abs(int(ps.images[0, 64, c, 0]) - col) <= 3
    np.testing.assert_allclose(ann["bbox"], np.array([59, 39, 220, 150]) * s - np.tile(offset, 2))
    cub = load_model_mesh(root, "car")
    assert np.allclose(cub.verts.max(0), [0.3, 0.6, 0.25], atol=0.02)
    from experiments import show_data             # the contact sheet works on real-format roots
    assert os.path.getsize(show_data.contact_sheet(root, tmp_path / "sheet.png", tile=64)) > 500


def test_read_record_single_object_and_missing_viewpoint(tmp_path):
    path = tmp_path / "x.mat"
    scipy.io.savemat(path, {"record": {"filename": "x.JPEG", "objects": {
        "class": "car", "bbox": np.array([1.0, 2, 3, 4]), "cad_index": 1, "truncated": 0,
        "occluded": 1, "difficult": 0, "viewpoint": np.zeros((0, 0))}}})
    name, objs = pascal3d.read_record(path)
    assert name == "x.JPEG" and len(objs) == 1 and objs[0]["occluded"]
    assert np.isnan(objs[0]["azimuth"])


# --------------------------------------------------------------------------- KITTI

P2 = np.array([[700.0, 0, 600, 45.0], [0, 700.0, 180, -0.3], [0, 0, 1, 0.005]])


def _kitti_line(ry, loc, dims=(1.5, 1.6, 3.9), occ=0, trunc=0.0, box=(400, 100, 700, 300)):
    h, w, l = dims
    alpha = ry - np.arctan2(loc[0], loc[2])
    return (f"Car {trunc:.2f} {occ} {alpha:.4f} {box[0]:.2f} {box[1]:.2f} {box[2]:.2f} {box[3]:.2f} "
            f"{h:.2f} {w:.2f} {l:.2f} {loc[0]:.2f} {loc[1]:.2f} {loc[2]:.2f} {ry:.4f}")


def test_kitti_pose_hand_computed():
    t = np.linalg.solve(P2[:, :3], P2[:, 3])
    # object centre straight ahead of camera 2 at its height, 10 m away
    def obj(ry, x=0.0, z=10.0):
        loc = np.array([x, 0.75, z]) - t        # bottom centre; box centre at y = 0
        return kitti.KittiObject(type="Car", truncated=0, occluded=0, alpha=0, bbox=np.zeros(4),
                                 dims=np.array([1.5, 1.6, 3.9]), location=loc, rotation_y=ry)
    # heading right in the image -> right side visible -> azimuth 270 deg
    np.testing.assert_allclose(kitti.kitti_pose(obj(0.0), P2, 4.0), [1.5 * np.pi, 0, 0, 2.5], atol=1e-9)
    # heading towards the camera -> front view, azimuth 0; away -> back view, pi
    assert np.isclose(np.cos(kitti.kitti_pose(obj(np.pi / 2), P2)[0]), 1.0)
    assert np.isclose(kitti.kitti_pose(obj(-np.pi / 2), P2)[0], np.pi)
    # 45 deg to the right, heading right: rear-right quarter, azimuth = alpha + 3pi/2 = 225 deg
    a = kitti.kitti_pose(obj(0.0, x=10.0, z=10.0), P2)[0]
    assert np.isclose(a, np.deg2rad(225))
    # camera above the object -> positive elevation
    o = obj(0.3)
    o["location"] = o["location"] + np.array([0, 1.0, 0])
    assert kitti.kitti_pose(o, P2)[1] > 0


def test_prepare_kitti_levels_filters_and_projection(tmp_path):
    root = tmp_path / "kitti"
    for d in ("label_2", "calib", "image_2"):
        os.makedirs(root / d)
    t = np.linalg.solve(P2[:, :3], P2[:, 3])
    on_axis = np.array([0.0, 0.75, 10.0]) - t          # box centre on camera 2's optical axis
    lines = [_kitti_line(0.4, on_axis, occ=0),
             _kitti_line(1.0, [3.0, 1.6, 15.0], occ=1),
             _kitti_line(2.0, [-3.0, 1.6, 12.0], occ=2),
             _kitti_line(0.0, [1.0, 1.6, 20.0], occ=0, box=(400, 100, 480, 160)),   # too small
             _kitti_line(0.0, [1.0, 1.6, 20.0], occ=0, trunc=0.5),                  # truncated
             "Pedestrian 0.00 0 0.0 400 100 700 300 1.7 0.6 0.8 1 1.6 8 0.0"]
    (root / "label_2/000001.txt").write_text("\n".join(lines) + "\n")
    (root / "calib/000001.txt").write_text(
        "P0: " + " ".join(["0"] * 12) + "\nP2: " + " ".join(f"{v:.6f}" for v in P2.ravel()) + "\n")
    Image.fromarray(np.full((375, 1242, 3), 128, np.uint8)).save(root / "image_2/000001.png")
    counts = kitti.prepare_kitti(root, tmp_path / "out", crop_hw=(96, 160), target_focal=300.0)
    assert counts == {"car": 1, "carFGL1_BGL1": 1, "carFGL2_BGL2": 1}
    out = tmp_path / "out/train"
    ps = load_pose_set(out, "car")
    assert ps.names == ("000001_00",) and ps.images.shape == (1, 96, 160, 3)
    assert np.isclose(ps.focal[0] / ps.poses[0, 3], 300.0 / 5)
    # on-axis object: the stored fields reproduce the KITTI projection of the box exactly
    o = kitti.read_label(root / "label_2/000001.txt")[0]
    corners_model = kitti.box_corners_pascal(o, 4.0)
    stored = geometry.project_pascal(corners_model, *ps.poses[0], 1.0, ps.focal[0], ps.principal[0], xnp=np)
    h, w, l = o["dims"]
    xs, ys, zs = np.meshgrid([-l / 2, l / 2], [-h / 2, h / 2], [-w / 2, w / 2], indexing="ij")
    local = np.stack([xs.ravel(), ys.ravel(), zs.ravel()], 1)
    c = o["location"] - np.array([0, h / 2, 0])
    cam = local @ kitti._ry(o["rotation_y"]).T + c
    uvw = np.c_[cam, np.ones(8)] @ P2.T
    pix = uvw[:, :2] / uvw[:, 2:] + 0.5                         # screen coordinates
    ctr = P2 @ np.append(c, 1)
    ctr = ctr[:2] / ctr[2] + 0.5
    s = ann_scale = float(_ann(out / "annotations/car/000001_00.npz")["scale"])
    expected = s * (pix - ctr) + np.array([80.0, 48.0])
    np.testing.assert_allclose(stored, expected, atol=1e-3 * ann_scale * 700)
    assert load_pose_set(out, "car", "L2").names == ("000001_02",)
    assert load_model_mesh(out, "car").verts.shape[0] > 100
