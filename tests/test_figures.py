"""Report figures: each writes a readable PNG; the PCA colours are consistent."""

import numpy as np
from PIL import Image

from nvsm_jax import figures, geometry, meshes


def _png(path, min_wh=(200, 150)):
    img = Image.open(path)
    assert img.format == "PNG"
    w, h = img.size
    assert w >= min_wh[0] and h >= min_wh[1], img.size
    arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 5          # not blank
    return img.size


def test_plot_rounds(tmp_path):
    rounds = [dict(round=r, num_pseudo=n, precision=p, coverage=c, test_acc_pi_6=t)
              for r, n, p, c, t in [(0, 40, 0.9, 0.3, None), (1, 85, 0.85, 0.55, 61.0),
                                    (2, 120, 0.78, 0.8, 66.5)]]
    path = figures.plot_rounds(rounds, tmp_path / "rounds.png")
    assert path.endswith("rounds.png")
    w, h = _png(path, (800, 300))
    assert w > h


def test_plot_coverage(tmp_path):
    rng = np.random.default_rng(0)
    lab = np.stack([rng.uniform(0, 2 * np.pi, 7), rng.uniform(-0.2, 0.6, 7),
                    np.zeros(7), np.full(7, 5.0)], 1)
    m = 150
    pse = np.stack([rng.uniform(0, 2 * np.pi, m), rng.uniform(-0.3, 0.8, m),
                    np.zeros(m), np.full(m, 5.0)], 1)
    err = np.abs(rng.normal(0, 0.5, m))
    err[:5] = np.nan
    rounds = rng.integers(0, 3, m)
    _png(figures.plot_coverage(lab, pse, err, rounds, tmp_path / "cov.png"), (900, 250))
    # no pseudo-labels at all still draws the labelled set
    _png(figures.plot_coverage(lab, np.zeros((0, 4)), np.zeros(0), np.zeros(0, int),
                               tmp_path / "cov0.png"), (300, 250))


def test_feature_pca_rgb_consistent_colours(tmp_path):
    rng = np.random.default_rng(0)
    n, h, w, d = 3, 6, 8, 16
    object_mesh = meshes.cuboid_mesh([-1.0, -2.0, -0.7], [1.0, 2.0, 0.7], 200)
    v = len(object_mesh.verts)
    # features: a smooth function of 3 latent values plus noise, memory reuses map features
    basis = rng.normal(size=(3, d))
    lat = rng.normal(size=(n, h, w, 3))
    fmap = lat @ basis + 0.05 * rng.normal(size=(n, h, w, d))
    fmap /= np.linalg.norm(fmap, axis=-1, keepdims=True)
    pick = rng.integers(0, n * h * w, v)
    memory = fmap.reshape(-1, d)[pick]
    images = rng.integers(0, 255, (n, 48, 64, 3), dtype=np.uint8)
    path, map_rgb, vert_rgb = figures.feature_pca_rgb(fmap, memory, object_mesh.verts, images,
                                                      tmp_path / "pca.png", return_colors=True)
    _png(path, (500, 400))
    assert map_rgb.shape == (n, h, w, 3) and vert_rgb.shape == (v, 3)
    assert map_rgb.min() >= 0 and map_rgb.max() <= 1
    np.testing.assert_allclose(vert_rgb, map_rgb.reshape(-1, 3)[pick], atol=1e-12)
    # the three components span the three latent directions: colours vary
    assert np.all(map_rgb.reshape(-1, 3).std(0) > 0.1)
    pca = figures.fit_pca(fmap)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(figures.pca_rgb(pca, memory), vert_rgb, atol=1e-12)


def test_draw_poses_and_edges(tmp_path):
    object_mesh = meshes.cuboid_mesh([-0.8, -1.8, -0.6], [0.8, 1.8, 0.6], 300)
    corners, edges = figures.box_edges(object_mesh.verts)
    assert corners.shape == (8, 3) and edges.shape == (12, 2)
    lengths = np.linalg.norm(corners[edges[:, 0]] - corners[edges[:, 1]], axis=1)
    np.testing.assert_allclose(np.sort(lengths), np.repeat([1.2, 1.6, 3.6], 4), atol=1e-6)
    e = figures.mesh_edges(object_mesh.faces)
    assert len(e) > 300 and len(figures.mesh_edges(object_mesh.faces, max_edges=50)) == 50
    rng = np.random.default_rng(0)
    n, hh, ww = 5, 96, 128
    images = rng.integers(40, 120, (n, hh, ww, 3), dtype=np.uint8)
    gt = geometry.make_pose(rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 0.5, n), 0.0, 5.0,
                            xnp=np)
    pred = gt.copy()
    pred[::2, 0] += np.pi / 2              # three wrong, two right
    focal = np.full(n, 120.0)
    principal = np.tile([[ww / 2, hh / 2]], (n, 1))
    _png(figures.draw_poses(images, pred, gt, object_mesh.verts, object_mesh.faces, focal, principal,
                            tmp_path / "poses.png"), (500, 250))
    _png(figures.draw_poses(images[:2], pred[:2], None, object_mesh.verts, object_mesh.faces, focal[:2],
                            principal[:2], tmp_path / "poses_nogt.png",
                            style=figures.PoseDrawing(outline="edges")),
         (250, 100))


# --------------------------------------------------------------------------- numbers and pixels

_GREEN, _RED, _BLUE = (44, 160, 44), (214, 39, 40), (31, 119, 180)   # #2ca02c #d62728 #1f77b4


def _box(a=0.8, b=1.8, c=0.6):
    """The 8 corners of the box [-a, a] x [-b, b] x [-c, c] (PASCAL x, y, z) and one face
    (the "box" outline reads only the vertices' bounding box)."""
    verts = np.array([[x, y, z] for x in (-a, a) for y in (-b, b) for z in (-c, c)])
    return verts, np.array([[0, 1, 2]])


def _panel(path, bg):
    """The PNG as RGB int array and the pixel box (r0, r1, c0, c1) of the image panel: the
    pixels of the image's uniform background colour ``bg``."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    rows, cols = np.nonzero(np.all(np.abs(arr - bg) <= 3, -1))
    return arr, (rows.min(), rows.max(), cols.min(), cols.max())


def _has_colour(arr, box, hh, ww, x, y, colour, r=2, tol=40):
    """Whether a pixel within ``r`` of data point (x column, y row) of the panel has ``colour``."""
    r0, r1, c0, c1 = box
    col = int(round(c0 + x * (c1 + 1 - c0) / ww - 0.5))
    row = int(round(r0 + y * (r1 + 1 - r0) / hh - 0.5))
    win = arr[row - r:row + r + 1, col - r:col + r + 1]
    return bool(np.any(np.all(np.abs(win - colour) <= tol, -1)))


def _near_face_samples(f=100.0, d=5.0, p=32.0, a=0.8, b=1.8, c=0.6):
    """Points on the 4 edges of the box's near face, projected by hand.

    At azimuth = elevation = theta = 0 the camera sits at distance d on the PASCAL -y axis
    (C = d (cos e sin a, sin e, cos e cos a) in renderer axes (x, z, -y)), looking along +y
    with image x = +X and image y (down) = -Z: a point projects to
    ``(p + f X / (d + Y), p - f Z / (d + Y))``. The near face (Y = -b, depth d - b = 3.2) is
    the rectangle x = 32 -+ 25, y = 32 -+ 18.75 (f = 100): quarter points of its edges are
    away from the 4 receding edges (which meet it at the corners only).
    """
    hx, hy = f * a / (d - b), f * c / (d - b)
    t = np.array([0.25, 0.5, 0.75])
    xs, ys = p - hx + 2 * hx * t, p - hy + 2 * hy * t
    pts = [(x, p - hy) for x in xs] + [(x, p + hy) for x in xs] + \
          [(p - hx, y) for y in ys] + [(p + hx, y) for y in ys]
    return np.array(pts), (hx, hy)


def test_draw_poses_outline_at_hand_projected_pixels_in_the_error_colour(tmp_path):
    """The prediction's box outline is drawn where a hand projection puts the near face's
    edges (see :func:`_near_face_samples`), green when the error to the ground truth is
    below pi/6, red when it is 90 deg, blue without ground truth; and 3 data pixels (about
    12 PNG pixels) inside the face there is no outline colour."""
    hh = ww = 64
    bg = (70, 90, 110)
    images = np.empty((1, hh, ww, 3), np.uint8)
    images[:] = bg
    verts, faces = _box()
    pred = np.array([[0.0, 0.0, 0.0, 5.0]])
    focal, principal = np.array([100.0]), np.array([[32.0, 32.0]])
    pts, _ = _near_face_samples()
    # 3 data pixels inwards: (top, bottom, left, right edge) x 3 samples each
    inner = pts + np.repeat([[0, 3.0], [0, -3.0], [3.0, 0], [-3.0, 0]], 3, axis=0)
    cases = [("green", pred.copy(), _GREEN, _RED),                         # error 0
             ("red", np.array([[np.pi / 2, 0.0, 0.0, 5.0]]), _RED, _GREEN),  # error 90 deg
             ("blue", None, _BLUE, _GREEN)]
    for name, gt, colour, other in cases:
        path = figures.draw_poses(images, pred, gt, verts, faces, focal, principal,
                                  tmp_path / f"{name}.png",
                                  style=figures.PoseDrawing(outline="box"))
        arr, box = _panel(path, bg)
        assert box[1] - box[0] > 150 and box[3] - box[2] > 150, box   # the 64 px panel
        for x, y in pts:
            assert _has_colour(arr, box, hh, ww, x, y, colour), (name, x, y)
            assert not _has_colour(arr, box, hh, ww, x, y, other), (name, x, y)
        for x, y in inner:
            assert not _has_colour(arr, box, hh, ww, x, y, colour, r=1), (name, x, y)
        assert not np.any(np.all(np.abs(arr - other) <= 40, -1)), name


def _capture(monkeypatch):
    """The figures the module saves (kept open for reading their artists)."""
    figs, save = [], figures._save

    def keep(fig, path, dpi=100):
        figs.append(fig)
        return save(fig, path, dpi)
    monkeypatch.setattr(figures, "_save", keep)
    return figs


def test_plot_coverage_panels_are_cumulative_with_the_right_counts(tmp_path, monkeypatch):
    """Panel r holds every pseudo-label of rounds <= r at (azimuth mod 360, elevation) in
    degrees, coloured by its error in degrees; the title counts them and those under
    30 deg; the labelled images are the stars. Counts by hand from the 6 labels below."""
    figs = _capture(monkeypatch)
    lab = np.array([[0.5, 0.1, 0.0, 5.0], [4.0, -0.2, 0.0, 5.0]])
    deg = np.radians
    pse = np.array([[deg(10), deg(5)], [deg(-20), deg(15)], [deg(100), deg(-10)],
                    [deg(200), deg(30)], [deg(300), deg(0)], [deg(50), deg(45)]])
    err = deg(np.array([10.0, 45.0, 20.0, np.nan, 29.0, 80.0]))
    rnd = np.array([0, 0, 1, 1, 2, 2])
    figures.plot_coverage(lab, pse, err, rnd, tmp_path / "cov.png")
    axes = [ax for ax in figs[0].axes if ax.get_title().startswith("round")]
    # round 0: labels 0, 1 (one < 30); round 1: + 2, 3 (3 unknown); round 2: + 4, 5
    assert [ax.get_title() for ax in axes] == ["round 0: 2 pseudo (1 < 30°)",
                                                "round 1: 4 pseudo (2 < 30°)",
                                                "round 2: 6 pseudo (3 < 30°)"]
    known = {0: [0, 1], 1: [0, 1, 2], 2: [0, 1, 2, 4, 5]}
    az = np.array([10.0, 340.0, 100.0, 200.0, 300.0, 50.0])        # -20 deg wraps to 340
    el = np.array([5.0, 15.0, -10.0, 30.0, 0.0, 45.0])
    errd = np.array([10.0, 45.0, 20.0, np.nan, 29.0, 80.0])
    for r, ax in enumerate(axes):
        grey, coloured, new, stars = ax.collections[:4]
        np.testing.assert_allclose(coloured.get_offsets(), np.c_[az, el][known[r]], atol=1e-9)
        np.testing.assert_allclose(coloured.get_array(), errd[known[r]], atol=1e-9)
        np.testing.assert_allclose(grey.get_offsets(), [[200.0, 30.0]] if r else
                                   np.zeros((0, 2)), atol=1e-9)
        np.testing.assert_allclose(new.get_offsets(), np.c_[az, el][rnd == r], atol=1e-9)
        np.testing.assert_allclose(stars.get_offsets(),
                                   [[np.degrees(0.5), np.degrees(0.1)],
                                    [np.degrees(4.0), np.degrees(-0.2)]], atol=1e-9)


def test_plot_rounds_draws_the_recorded_numbers(tmp_path, monkeypatch):
    """Bars = the pseudo-label counts; the curves = precision / coverage in percent (given as
    fractions, 1.0 included, so 1.0 must become 100) and test ACC (given in percent, kept);
    a missing value (None) is left out, not drawn as 0."""
    figs = _capture(monkeypatch)
    rounds = [dict(round=0, num_pseudo=40, precision=1.0, coverage=0.3, test_acc_pi_6=None),
              dict(round=1, num_pseudo=85, precision=0.85, coverage=0.55, test_acc_pi_6=61.0),
              dict(round=2, num_pseudo=120, precision=0.78, coverage=0.8, test_acc_pi_6=66.5)]
    figures.plot_rounds(rounds[::-1], tmp_path / "rounds.png")       # any order in
    ax1, ax2 = figs[0].axes
    assert [p.get_height() for p in ax1.patches] == [40, 85, 120]
    lines = {line.get_label(): line for line in ax2.get_lines()}
    want = {"precision (err < pi/6)": ([0, 1, 2], [100.0, 85.0, 78.0]),
            "pose coverage": ([0, 1, 2], [30.0, 55.0, 80.0]),
            "test ACC@pi/6": ([1, 2], [61.0, 66.5])}
    assert set(lines) == set(want)
    for label, (x, y) in want.items():
        np.testing.assert_allclose(lines[label].get_xdata(), x)
        np.testing.assert_allclose(lines[label].get_ydata(), y, atol=1e-9)


def test_fit_pca_matches_the_covariance_eigenvectors():
    """On data with three known principal directions (std 5, 3, 2 along rows of a random
    orthonormal Q, 0.1 elsewhere, mean (10, ...)), the components are numpy's top-3
    covariance eigenvectors, signed so the largest loading is positive, and pca_rgb is the
    centred projection scaled by the projections' 1st / 99th percentiles."""
    rng = np.random.default_rng(0)
    d, n = 8, 4000
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    scales = np.array([5.0, 3.0, 2.0] + [0.1] * (d - 3))
    x = (rng.normal(size=(n, d)) * scales) @ q.T + 10.0
    pca = figures.fit_pca(x)
    w, v = np.linalg.eigh(np.cov(x.T))
    top = v[:, np.argsort(w)[::-1][:3]].T
    top *= np.sign(top[np.arange(3), np.argmax(np.abs(top), 1)])[:, None]
    np.testing.assert_allclose(pca.components, top, atol=1e-6)
    np.testing.assert_allclose(np.abs(top @ q[:, :3]), np.eye(3), atol=0.05)
    np.testing.assert_allclose(pca.mean, x.mean(0), atol=1e-9)
    proj = (x - x.mean(0)) @ top.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    np.testing.assert_allclose(pca.low, lo, atol=1e-6)
    np.testing.assert_allclose(pca.high, hi, atol=1e-6)
    rgb = figures.pca_rgb(pca, x[:50])
    np.testing.assert_allclose(rgb, np.clip((proj[:50] - lo) / (hi - lo), 0, 1), atol=1e-6)
    # the mean maps to the middle of each range (symmetric data): about 0.5
    np.testing.assert_allclose(figures.pca_rgb(pca, x.mean(0)), 0.5, atol=0.03)


# --------------------------------------------------------------------------- keys a reader needs

def _inside(fig, artist):
    """Whether ``artist`` is drawn wholly inside the saved figure (nothing clipped)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    box = artist.get_window_extent(FigureCanvasAgg(fig).get_renderer())   # closed: re-attach
    return (box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width
            and box.y1 <= fig.bbox.height)


def test_draw_poses_key_names_truth_and_prediction_colours(tmp_path, monkeypatch):
    """The figure's legend says white = ground truth and which colour is a prediction
    under / over the threshold, lists only the colours the panels use, and fits in the
    figure (one column or several)."""
    figs = _capture(monkeypatch)
    verts, faces = _box()
    images = np.full((3, 48, 64, 3), 90, np.uint8)
    gt = np.array([[0.0, 0.2, 0.0, 5.0]] * 3)
    pred = gt.copy()
    pred[0, 0] += np.pi / 2                        # 90 deg wrong, two right
    focal, principal = np.full(3, 80.0), np.tile([[32.0, 24.0]], (3, 1))
    cases = [(pred, gt, ["ground truth", "prediction, error < 30°",
                         "prediction, error ≥ 30°"], ["white", _GREEN, _RED]),
             (pred[1:], gt[1:], ["ground truth", "prediction, error < 30°"], ["white", _GREEN]),
             (pred[:1], gt[:1], ["ground truth", "prediction, error ≥ 30°"], ["white", _RED]),
             (pred[:2], None, ["prediction"], [_BLUE])]
    from matplotlib.colors import to_rgb
    for k, (p, g, texts, colours) in enumerate(cases):
        figures.draw_poses(images[:len(p)], p, g, verts, faces, focal[:len(p)],
                           principal[:len(p)], tmp_path / f"key{k}.png",
                           style=figures.PoseDrawing(outline="box"))
        (legend,) = figs[-1].legends
        assert [t.get_text() for t in legend.get_texts()] == texts, k
        got = [tuple(round(255 * c) for c in to_rgb(h.get_color())) for h in legend.legend_handles]
        assert got == [(255, 255, 255) if c == "white" else c for c in colours], k
        assert _inside(figs[-1], legend), k


def test_plot_coverage_key_and_colour_bar_label_fit(tmp_path, monkeypatch):
    """The coverage figure explains its stars, dots and circles in a legend, marks pi/6 on
    the colour bar's ticks, and its colour-bar label and legend are not clipped (one
    round and four rounds)."""
    figs = _capture(monkeypatch)
    pse = np.array([[0.1, 0.1], [2.0, 0.3], [4.0, 0.0], [5.0, 0.2]])
    for rounds in (np.zeros(4, int), np.arange(4)):
        figures.plot_coverage(pse[:2], pse, np.radians([5.0, 40.0, np.nan, 80.0]), rounds,
                              tmp_path / "cov.png")
        fig = figs[-1]
        (legend,) = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == [
            "labelled images (anchors)", "pseudo-labels (colour: error)",
            "pseudo-labels, error unknown", "new in this round"]
        assert legend.legend_handles[0].get_marker() == "*"
        cax = fig.axes[-1]                  # the colour bar, added last
        label = cax.yaxis.label
        assert label.get_text() == "pseudo-label rotation error (°)"
        assert "30 = π/6" in [t.get_text() for t in cax.get_yticklabels()]
        assert _inside(fig, label) and _inside(fig, legend)
        for t in cax.get_yticklabels():
            assert _inside(fig, t), t.get_text()
