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
    object_mesh = load_model_mesh(tmp_path, "car")
    assert object_mesh.verts.shape[1] == 3


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


# --------------------------------------------------------------------------- bad input at the door

def _set_field(path, key, value):
    fields = _ann(path)
    fields[key] = value
    fmt.save_npz(path, **fields)


@pytest.mark.parametrize("key,value,message", [
    ("azimuth", np.float64(270.0), r"'azimuth' = 270 is outside \[-2 pi, 2 pi\].*degrees"),
    ("elevation", np.float64(7.0), r"'elevation' = 7 is outside \[-pi/2, pi/2\]"),
    ("azimuth", np.float64(1e6), r"'azimuth' = 1e\+06 is outside"),
    ("theta", np.float64(-20.0), r"'theta' = -20 is outside"),
    ("azimuth", np.str_("0.5"), r"'azimuth' must be a number, got <U3 value '0.5'"),
    ("principal", np.array(["a", "b"]), r"'principal' must be 2 numbers"),
])
def test_annotation_values_out_of_range_or_not_numbers(tmp_path, key, value, message, caplog):
    names = write_tiny_root(tmp_path, "car", 4, size=(16, 16))
    ann = tmp_path / "annotations/car" / (names[1] + ".npz")
    _set_field(ann, key, value)
    with pytest.raises(DataError, match=message) as err:
        load_pose_set(tmp_path, "car")
    assert str(ann) in str(err.value)
    ps = load_pose_set(tmp_path, "car", skip_bad=True)
    assert ps.names == (names[0], names[2], names[3]) and "skipped 1" in caplog.text


def test_angles_at_their_bounds_load(tmp_path):
    names = write_tiny_root(tmp_path, "car", 3, size=(16, 16))
    for name, (key, v) in zip(names, [("azimuth", 2 * np.pi), ("elevation", -np.pi / 2),
                                      ("theta", -2 * np.pi)]):
        _set_field(tmp_path / "annotations/car" / (name + ".npz"), key, np.float64(v))
    ps = load_pose_set(tmp_path, "car")
    np.testing.assert_allclose([ps.poses[0, 0], ps.poses[1, 1], ps.poses[2, 2]],
                               [2 * np.pi, -np.pi / 2, -2 * np.pi], rtol=1e-6)


@pytest.mark.parametrize("limit", [-1, 0, 1.5, True])
def test_limit_must_be_positive(tmp_path, limit):
    write_tiny_root(tmp_path, "car", 4, size=(16, 16))
    with pytest.raises(ValueError, match="limit must be a positive number of images"):
        load_pose_set(tmp_path, "car", limit=limit)
    assert len(load_pose_set(tmp_path, "car", limit=10)) == 4


@pytest.mark.parametrize("content,message", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", r"not UTF-8 text \(byte \d+"),
    (b"car_0000\ncar\x00\x01junk\n", r"mesh01\.txt:2: list entry .* control characters"),
])
def test_binary_list_file_names_the_file(tmp_path, content, message):
    write_tiny_root(tmp_path, "car", 3, size=(16, 16))
    lst = tmp_path / "lists/car/mesh01.txt"
    lst.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_pose_set(tmp_path, "car")
    assert str(lst) in str(err.value)


@pytest.mark.parametrize("masks", [True, False])
def test_wrong_size_first_image_is_blamed_not_the_mask_or_the_others(tmp_path, masks, caplog):
    """The odd image out (here the first listed) is the bad entry, with or without masks;
    the others, which agree on one size, load."""
    names = write_tiny_root(tmp_path, "car", 4, size=(16, 16), masks=masks)
    odd = tmp_path / "images/car" / (names[0] + ".png")
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(odd)
    with pytest.raises(DataError, match=r"image size \(8, 10\) differs from \(16, 16\)") as err:
        load_pose_set(tmp_path, "car")
    assert str(err.value).startswith(str(odd))
    ps = load_pose_set(tmp_path, "car", skip_bad=True)
    assert ps.names == tuple(names[1:]) and "skipped 1" in caplog.text


def test_mask_of_wrong_size_names_annotation_and_image(tmp_path):
    names = write_tiny_root(tmp_path, "car", 3, size=(16, 16))
    ann = tmp_path / "annotations/car" / (names[0] + ".npz")
    _set_field(ann, "occluder_mask", np.zeros((4, 4), bool))
    with pytest.raises(DataError, match=r"'occluder_mask' has shape \(4, 4\)") as err:
        load_pose_set(tmp_path, "car")
    assert str(ann) in str(err.value) and names[0] + ".png" in str(err.value)


# raw PASCAL3D+: bad viewpoints, crops far off the photo, image sets

def _write_pascal_objects(raw, viewpoints, cat="car"):
    """Rewrites the fixture's record with one car per viewpoint (overrides of the good one)."""
    good = {"azimuth": 30.0, "elevation": 10.0, "theta": 5.0, "distance": 6.5, "focal": 1.0,
            "px": 140.0, "py": 95.0, "viewport": 2000.0}
    dtype = [("class", object), ("bbox", object), ("cad_index", object), ("truncated", object),
             ("occluded", object), ("difficult", object), ("viewpoint", object)]
    objs = np.zeros((len(viewpoints),), dtype=dtype)
    for k, over in enumerate(viewpoints):
        objs[k] = (cat, np.array([60.0, 40, 220, 150]), 1, 0, 0, 0, {**good, **over})
    scipy.io.savemat(raw / "Annotations" / f"{cat}_imagenet" / "n0001.mat",
                     {"record": {"filename": "n0001.JPEG", "objects": objs}})


@pytest.mark.parametrize("bad,message", [
    ({"viewport": 0.0}, r"object 1: viewpoint viewport = 0 must be positive"),
    ({"viewport": -5.0}, r"object 1: viewpoint viewport = -5 must be positive"),
    ({"px": 1e6}, r"object 1 \(px 1e\+06.*entirely off the 300 x 200 photo"),
    ({"py": -1e6}, r"object 1 .*entirely off the 300 x 200 photo"),
    ({"azimuth": 1e6}, r"object 1: viewpoint azimuth = 1e\+06 degrees is outside"),
    ({"viewport": 1e8}, r"object 1 .*more than 64 times its area.*implausible"),
])
def test_prepare_pascal3d_bad_object_named_and_skipped(tmp_path, bad, message, caplog):
    raw = tmp_path / "raw"
    _write_pascal_raw(raw)
    _write_pascal_objects(raw, [{}, bad, {"azimuth": 200.0}])
    mat = str(raw / "Annotations/car_imagenet/n0001.mat")
    with pytest.raises(DataError, match=message) as err:
        pascal3d.prepare_pascal3d(raw, tmp_path / "strict", ["car"], crop_hw=(64, 80),
                                  target_focal=600.0, skip_bad=False)
    assert str(err.value).startswith(mat)
    counts = pascal3d.prepare_pascal3d(raw, tmp_path / "out", ["car"], crop_hw=(64, 80),
                                       target_focal=600.0)
    assert counts == {"train/car/mesh01": 2}
    assert (tmp_path / "out/train/lists/car/mesh01.txt").read_text().split() == \
        ["n0001_00", "n0001_02"]
    assert f"skipping {mat}: object 1" in caplog.text
    ps = load_pose_set(tmp_path / "out/train", "car")
    np.testing.assert_allclose(ps.poses[:, 0], np.deg2rad([30.0, 200.0]), atol=1e-6)


def test_prepare_pascal3d_warns_on_empty_image_set(tmp_path, caplog):
    raw = tmp_path / "raw"
    _write_pascal_raw(raw)
    os.makedirs(raw / "Image_sets")
    (raw / "Image_sets/car_imagenet_train.txt").write_text("\n")
    (raw / "Image_sets/car_imagenet_val.txt").write_text("n0002\n")
    counts = pascal3d.prepare_pascal3d(raw, tmp_path / "out", ["car"], crop_hw=(64, 80),
                                       target_focal=600.0)
    assert counts == {}
    assert f"{raw / 'Image_sets/car_imagenet_train.txt'}: the image set list is empty" in caplog.text
    assert "1 records are in neither Image_sets list" in caplog.text
    assert "no crops written for car" in caplog.text


def _crop_by_padding_the_whole_photo(image, principal, scale, out_hw):
    """The reference: zero-pad the whole photo, then resize the window (as before)."""
    H, W = out_hw
    o = scale * np.asarray(principal, np.float64) - np.array([W / 2.0, H / 2.0])
    x0, y0 = o / scale
    x1, y1 = (o + np.array([W, H])) / scale
    h, w = image.shape[:2]
    pad = int(np.ceil(max(0.0, -x0, -y0, x1 - w, y1 - h))) + 2
    src = Image.fromarray(np.pad(image, ((pad, pad), (pad, pad), (0, 0))))
    resample = Image.BILINEAR if scale >= 1 else Image.BOX
    return np.asarray(src.resize((W, H), resample, box=(x0 + pad, y0 + pad, x1 + pad, y1 + pad)))


def test_scale_and_crop_cuts_only_the_window(tmp_path):
    from nvsm_jax.data import crop
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    for p, s in [((60, 45), 1.0), ((-20, 30), 0.7), ((125, 95), 2.5), ((10, 5), 0.13),
                 ((119, 1), 3.0)]:
        got, off = crop.scale_and_crop(img, p, s, (40, 56))
        want = _crop_by_padding_the_whole_photo(img, p, s, (40, 56))
        assert got.shape == (40, 56, 3)
        np.testing.assert_allclose(off, s * np.asarray(p, float) - [28, 20])
        # PIL takes the window as float32: the shifted origin rounds differently (<= 1 level)
        assert np.abs(got.astype(int) - want).max() <= 1
    # content: the crop centre is the photo at the principal point (scale 1, no resampling)
    got, _ = crop.scale_and_crop(img, (60.0, 45.0), 1.0, (40, 56))
    np.testing.assert_array_equal(got, img[25:65, 32:88])
    for p, s, message in [((60, 45), 0.0, "positive finite"), ((60, 45), np.nan, "positive"),
                          ((np.inf, 45), 1.0, "finite"), ((1e6, 45), 0.39, "entirely off"),
                          ((60, -1e6), 1.0, "entirely off"), ((60, 45), 1e-4, "implausible")]:
        with pytest.raises(ValueError, match=message):
            crop.scale_and_crop(img, p, s, (40, 56))


# KITTI: bad labels and calibrations name file:line

def _kitti_root(tmp_path, lines, calib=None):
    root = tmp_path / "kitti"
    for d in ("label_2", "calib", "image_2"):
        os.makedirs(root / d, exist_ok=True)
    (root / "label_2/000001.txt").write_text("\n".join(lines) + "\n")
    (root / "calib/000001.txt").write_text(
        "P0: " + " ".join(["0"] * 12) + "\n" +
        (calib or "P2: " + " ".join(f"{v:.6f}" for v in P2.ravel())) + "\n")
    Image.fromarray(np.full((375, 1242, 3), 128, np.uint8)).save(root / "image_2/000001.png")
    return root


_T2 = np.linalg.solve(P2[:, :3], P2[:, 3])
_ON_AXIS = np.array([0.0, 0.75, 10.0]) - _T2


@pytest.mark.parametrize("bad,message", [
    (_kitti_line(0.4, [0.0, 0.75, np.nan]), r"000001\.txt:2: non-finite field\(s\).*z = nan"),
    (_kitti_line(0.4, _ON_AXIS, box=(np.nan, 100, 700, 300)),
     r"000001\.txt:2: non-finite field\(s\) x1 = nan"),
    (_kitti_line(0.4, [0.0, 0.75, -10.0]), r"000001\.txt:2: the box centre is behind camera 2"),
    (_kitti_line(0.4, _ON_AXIS, box=(700, 100, 400, 300)), r"000001\.txt:2: 2D box .* inverted"),
    (_kitti_line(0.4, _ON_AXIS, dims=(1.5, -1.6, 3.9)), r"000001\.txt:2: 3D box dimensions"),
    ("Car 0.00 0 0.1 400 100 700 300 1.5 1.6 3.9 0 0.75 abc 0.4", r"000001\.txt:2: could not"),
])
def test_prepare_kitti_bad_label_line_named_and_skipped(tmp_path, bad, message, caplog):
    root = _kitti_root(tmp_path, [_kitti_line(0.4, _ON_AXIS), bad])
    with pytest.raises(DataError, match=message):
        kitti.prepare_kitti(root, tmp_path / "strict", crop_hw=(48, 80), target_focal=300.0,
                            skip_bad=False)
    counts = kitti.prepare_kitti(root, tmp_path / "out", crop_hw=(48, 80), target_focal=300.0)
    assert counts == {"car": 1}
    assert load_pose_set(tmp_path / "out/train", "car").names == ("000001_00",)
    assert f"skipping {root / 'label_2/000001.txt'}:2" in caplog.text


@pytest.mark.parametrize("calib,message", [
    ("P2: 700 0 abc 45 0 700 180 -0.3 0 0 1 0.005", r"000001\.txt:2: P2 must be 12 numbers"),
    ("P2: " + " ".join(["0"] * 12), r"000001\.txt:2: P2's left 3x3 block .* not a camera"),
    ("P2: 700 0 600 45 0 700 180", r"000001\.txt:2: P2 needs 12 numbers, got 7"),
    ("P2: 700 0 600 nan 0 700 180 -0.3 0 0 1 0.005", r"000001\.txt:2: P2 holds non-finite"),
])
def test_prepare_kitti_bad_calibration_named(tmp_path, calib, message, caplog):
    root = _kitti_root(tmp_path, [_kitti_line(0.4, _ON_AXIS)], calib=calib)
    with pytest.raises(DataError, match=message) as err:
        kitti.prepare_kitti(root, tmp_path / "strict", crop_hw=(48, 80), skip_bad=False)
    assert str(root / "calib/000001.txt") in str(err.value)
    assert kitti.prepare_kitti(root, tmp_path / "out", crop_hw=(48, 80)) == {}
    assert f"skipping {root / 'calib/000001.txt'}:2" in caplog.text
