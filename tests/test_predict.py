"""``nvsm-predict`` (nvsm_jax.nemo.predict): poses of image files from a trained workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nvsm_jax import errors, geometry, meshes
from nvsm_jax.nemo import predict
from nvsm_jax.nemo.pose_solver import SolverConfig
from nvsm_jax.data import DataError, loaders, subset_name
from nvsm_jax.data.testing import write_tiny_root

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A NeMo workdir (config.json + a checkpoint) of the tiny model on a tiny root, and
    a test root of 6 images; the model is not trained (its poses are still a
    deterministic function of the images, which is what is compared)."""
    from experiments.configs import nemo as nemo_config
    from nvsm_jax import parallel, training
    from nvsm_jax.nemo import train

    base = tmp_path_factory.mktemp("predict")
    train_root, test_root = str(base / "train"), str(base / "test")
    write_tiny_root(train_root, "car", num=4, size=(32, 32))
    write_tiny_root(test_root, "car", num=6, size=(32, 32), seed=1)
    cfg = nemo_config.get_config("tiny")
    cfg.data_root, cfg.test_root = train_root, test_root
    cfg.eval_batch_size = 4
    work = str(base / "work")
    object_mesh = meshes.load_mesh(os.path.join(train_root, "CAD_single", "car", "01.off"))
    model = train.build_model(cfg.model)
    # (64, 64): the size train.load_model initialises with, so its initialiser is reused
    state = train.init_state(cfg, model, len(object_mesh.verts), (64, 64), parallel.make_mesh(1),
                             pretrained=False)
    training.save_config(cfg, work)
    ckpt = training.Checkpointer(os.path.join(work, "checkpoints"))
    ckpt.save(3, state)
    ckpt.close()
    return work, test_root


def _test_images(test_root):
    d = os.path.join(test_root, "images", subset_name("car", "L0"))
    return [os.path.join(d, n) for n in sorted(os.listdir(d))]


def test_predict_images_equals_evaluation_and_writes_outputs(workdir, tmp_path):
    """Plain PNG crops of the test root, no box: the same poses as ``train.predict`` on
    the loaded test set (the evaluation's path) to 0.1 deg; the records, overlays and
    contact sheet are written."""
    from nvsm_jax.nemo import train
    from nvsm_jax.data import loaders

    work, test_root = workdir
    nemo = train.load_model(work)
    test = loaders.load_pose_set(test_root, "car", "L0")
    ref = train.predict(nemo, test, batch_size=4)
    out = str(tmp_path / "out")
    recs = predict.predict_images(work, _test_images(test_root), out_dir=out, progress=False)
    assert [os.path.basename(r["image"])[:-4] for r in recs] == list(test.names)
    got = np.radians([[r["azimuth"], r["elevation"], r["theta"]] for r in recs])
    assert np.degrees(geometry.pose_error(got, ref.pose.astype(np.float64), xnp=np)).max() < 0.1
    np.testing.assert_allclose([r["distance"] for r in recs], ref.pose[:, 3], atol=1e-3)
    np.testing.assert_allclose([r["score"] for r in recs], ref.score, atol=1e-4)
    for r in recs:
        assert 0 <= r["azimuth"] < 360 and -180 < r["theta"] <= 180
        sec = np.radians([r["second"][k] for k in ("azimuth", "elevation", "theta")])
        first = np.radians([r["azimuth"], r["elevation"], r["theta"]])
        assert np.degrees(geometry.pose_error(sec, first, xnp=np)) > 45
    lines = open(os.path.join(out, "predictions.jsonl")).read().splitlines()
    assert [json.loads(x)["azimuth"] for x in lines] == [r["azimuth"] for r in recs]
    ov = np.asarray(Image.open(recs[0]["overlay"]))
    assert ov.shape == (256, 256, 3)                # 32 px crops drawn 8x larger
    sheet = Image.open(os.path.join(out, "contact_sheet.png"))
    assert sheet.size[0] == 4 * 208 and sheet.size[1] > 200    # 4 thumbnails of 200 px


def test_box_crop_reproduces_the_camera(workdir):
    """A test crop pasted into a larger photo, with a box centred on it whose diagonal is
    the reference one: scale 1, the crop is the original image exactly, and its pose
    is the one predicted from the crop itself."""
    work, test_root = workdir
    path = _test_images(test_root)[0]
    img = np.asarray(Image.open(path).convert("RGB"))
    nemo = predict.load_predictor(work)
    cam = predict.model_camera(nemo.config)
    assert cam.image_hw == (32, 32) and cam.focal == pytest.approx(200.0)
    train = loaders.load_pose_set(nemo.config.data_root, "car", "L0")   # the size focal, by hand
    assert cam.size_focal == pytest.approx(np.median(train.focal * 5.0 / train.poses[:, 3]))
    grid = SolverConfig.from_config(nemo.config.solver).grid()
    ref = predict.reference_diagonal(nemo.object_mesh.verts, cam.size_focal, grid)
    photo = np.zeros((70, 90, 3), np.uint8)
    photo[20:52, 30:62] = img
    c = np.array([46.0, 36.0])                       # the crop's centre in the photo
    half = np.array([3.0, 4.0]) / 5.0 * ref / 2      # a 3:4 box of diagonal ref
    box = np.concatenate([c - half, c + half])
    crop = predict.crop_for_box(photo, box, cam, ref)
    assert crop.scale == pytest.approx(1.0)
    np.testing.assert_allclose(crop.offset, [30.0, 20.0], atol=1e-9)
    np.testing.assert_array_equal(crop.image, img)
    same = predict.crop_for_box(img, None, cam, ref)            # no box: the image as it is
    np.testing.assert_array_equal(same.image, img)
    big = predict.crop_for_box(np.repeat(np.repeat(img, 2, 0), 2, 1), None, cam, ref)
    assert big.scale == 0.5 and big.image.shape == (32, 32, 3)
    ppath = os.path.join(os.path.dirname(work), "photo.png")
    Image.fromarray(photo).save(ppath)
    a, b = predict.predict_images(work, [path, ppath], [None, box.tolist()], progress=False)
    assert b["box"] == pytest.approx(box.tolist())
    for k in ("azimuth", "elevation", "theta", "distance", "score"):
        assert b[k] == pytest.approx(a[k], abs=1e-4)


def _silhouette(verts, faces, pose, focal, principal, hw):
    from rasterizer import rasterize

    scr = geometry.project_to_screen(np.asarray(verts, np.float32), np.asarray(pose, np.float32),
                                     np.float32(focal), np.asarray(principal, np.float32), xnp=np)
    return np.asarray(rasterize(scr, faces, image_size=hw).face_id) >= 0


def _dilate(mask, r=1):
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def test_wireframe_falls_on_the_object_mask():
    """The wireframe drawn at the true pose (photo scaled 2x: crop points mapped back)
    lies on the rendered silhouette (1-2 px of line rounding allowed) and covers its outline;
    the axes stay inside; a pose 90 deg off leaves it."""
    object_mesh = meshes.cuboid_mesh([-0.25, -0.5, -0.2], [0.25, 0.5, 0.2], 200)
    pose = np.array([np.radians(30), np.radians(20), np.radians(5), 5.0])
    focal, principal = 200.0, np.array([32.0, 24.0])
    mask = _silhouette(object_mesh.verts, object_mesh.faces, pose, 2 * focal, 2 * principal, (96, 128))
    photo = np.zeros((96, 128, 3), np.uint8)
    over = predict.draw_wireframe(photo, pose, object_mesh.verts, focal, principal, scale=0.5,
                                  offset=(0, 0), width=1, key=False)
    wire = np.all(over == predict.WIRE_COLOR, -1)
    assert wire.sum() > 150
    assert not (wire & ~_dilate(mask, 2)).any()                  # PIL rounds line pixels
    assert (wire & ~_dilate(mask)).sum() < 0.05 * wire.sum()
    edge = mask & ~np.roll(mask, 1, 1) | mask & ~np.roll(mask, -1, 0)
    assert (edge & _dilate(wire)).sum() > 0.9 * edge.sum()      # the outline is drawn
    axes = np.zeros(wire.shape, bool)
    for colour in predict.AXIS_COLORS:
        axes |= np.all(over == colour, -1)
    assert axes.sum() > 20 and not (axes & ~_dilate(mask, 3)).any()
    wrong = predict.draw_wireframe(photo, pose + np.array([np.pi / 2, 0, 0, 0]), object_mesh.verts,
                                   focal, principal, scale=0.5, width=1, key=False)
    assert (np.all(wrong == predict.WIRE_COLOR, -1) & ~_dilate(mask, 2)).sum() > 20
    keyed = predict.draw_wireframe(photo, pose, object_mesh.verts, focal, principal, scale=0.5)
    assert np.all(keyed[2:10, 3:7] == 0, -1).any() and (keyed[:13, :48] != 0).any()


def test_overlay_of_a_small_photo_is_enlarged_and_stays_on_the_object():
    """A 96 x 128 photo is drawn 2x larger (256 px): the wireframe still lies on the
    silhouette rendered at that size, and the key names the box ("pose", yellow)."""
    object_mesh = meshes.cuboid_mesh([-0.25, -0.5, -0.2], [0.25, 0.5, 0.2], 200)
    pose = np.array([np.radians(30), np.radians(20), np.radians(5), 5.0])
    focal, principal = 200.0, np.array([32.0, 24.0])
    crop = predict.Crop(np.zeros((48, 64, 3), np.uint8), 0.5, np.zeros(2))
    over = predict.overlay(np.zeros((96, 128, 3), np.uint8), pose, object_mesh.verts, focal,
                           principal, crop)
    assert over.shape == (192, 256, 3)
    mask = _silhouette(object_mesh.verts, object_mesh.faces, pose, 4 * focal, 4 * principal, (192, 256))
    wire = np.all(over == predict.WIRE_COLOR, -1)
    wire[:14, :90] = False                                        # the key's "pose"
    assert wire.sum() > 300 and not (wire & ~_dilate(mask, 3)).any()
    key = over[:14, :30].astype(int)                                # "pose" in yellow
    assert ((key[..., 0] > 150) & (key[..., 1] > 120) & (key[..., 2] < 80)).sum() > 10
    big = predict.overlay(np.zeros((300, 400, 3), np.uint8), pose, object_mesh.verts, focal,
                          principal, crop)
    assert big.shape == (300, 400, 3)                               # large photos as they are


def test_second_hypothesis_is_far_from_the_prediction():
    grid = geometry.nemo_pose_grid(12)
    losses = np.linspace(0.1, 0.9, len(grid))[None].repeat(2, 0)
    best = grid[[0, 60]]
    pose, loss = predict.second_hypotheses(grid, losses, best, np.radians(45))
    err = np.degrees(geometry.pose_error(pose.astype(np.float64), best, xnp=np))
    assert (err > 45).all()
    far = np.degrees(geometry.pose_error(best[:, None], grid[None], xnp=np)) > 45
    for i in range(2):                      # the lowest loss among the far grid poses
        assert loss[i] == losses[i][far[i]].min()
    assert loss[0] > losses[0, 1]           # the near ones (same azimuth) were passed over


def test_bad_inputs_give_errors_naming_the_file(workdir, tmp_path):
    work, test_root = workdir
    good = _test_images(test_root)[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        predict.predict_images(work, [good, str(bad)], progress=False)
    for box, what in (([5, 5, 5, 20], "zero area"), ([-3, 0, 10, 10], "outside the 32 x 32"),
                      ([0, 0, 10], "not 4")):
        with pytest.raises(predict.BoxError, match=f"{os.path.basename(good)}.*{what}"):
            predict.predict_images(work, good, [box], progress=False)
    empty = tmp_path / "empty_work"
    empty.mkdir()
    with pytest.raises(errors.RunStateError, match="empty_work: not a trained model"):
        predict.predict_images(str(empty), good, progress=False)
    cell = tmp_path / "fewshot" / "nvsm_car_7"
    os.makedirs(cell / "checkpoints")
    (cell / "config.json").write_text("{}")
    with pytest.raises(errors.RunStateError, match="pass one of its cells: nvsm_car_7"):
        predict.predict_images(str(tmp_path / "fewshot"), good, progress=False)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x0,y0,x1,y1\nwhatever.png,1,2,3\n")
    with pytest.raises(DataError, match="boxes.csv: line 2"):
        predict.read_boxes(str(boxes))
    boxes.write_text("image,x0,y0,x1,y1\nbroken.png,1,2,3,4\n/a/b.png,0,0,5,5\n")
    assert predict.read_boxes(str(boxes)) == {"broken.png": [1, 2, 3, 4], "/a/b.png": [0, 0, 5, 5]}
    with pytest.raises(predict.BoxError, match=rf"{os.path.basename(good)}: the boxes file "
                                               r"names no box for this image"):
        predict.predict_images(work, good, {"GOOD.PNG": [0, 0, 5, 5]}, progress=False)


def test_cli_prints_one_line_errors(workdir, tmp_path):
    """``python -m experiments.predict`` (nvsm-predict): a box of zero area exits 2 with
    one line naming the image."""
    work, test_root = workdir
    good = _test_images(test_root)[0]
    env = dict(os.environ, NVSM_JAX_DEBUG="0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "experiments.predict", "--workdir", work,
                           "--out", str(tmp_path / "o"), "--box", "4,4,4,9", good],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(err) == 1 and os.path.basename(good) in err[0] and "zero area" in err[0]
    assert not os.path.exists(tmp_path / "o")
