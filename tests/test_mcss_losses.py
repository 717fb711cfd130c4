"""MCSS multi-view loss: negative mining and the triplet / contrastive losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvsm_jax.mcss import losses


def _batch(seed, n_seq=3, n_t=5, n_v=3, t_len=40, d=8):
    rng = np.random.default_rng(seed)
    seq = np.repeat(np.arange(n_seq), n_t * n_v)
    time = np.concatenate([np.repeat(rng.choice(t_len, n_t, replace=False), n_v)
                           for _ in range(n_seq)])
    view = np.tile(np.arange(n_v), n_seq * n_t)
    emb = rng.normal(size=(len(seq), d))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    return emb.astype(np.float32), seq.astype(np.int32), time.astype(np.int32), view.astype(np.int32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dt_min", [1, 6, 15])
def test_mining_picks_closest_valid_negative(seed, dt_min):
    emb, seq, time, view = _batch(seed)
    idx, ok = losses.mine_hard_negatives(jnp.asarray(emb), jnp.asarray(seq), jnp.asarray(time),
                                         dt_min)
    idx, ok = np.asarray(idx), np.asarray(ok)
    d = ((emb[:, None] - emb[None]) ** 2).sum(-1)
    for i in range(len(emb)):
        valid = (seq == seq[i]) & (np.abs(time - time[i]) >= dt_min)
        assert ok[i] == valid.any()
        if not valid.any():
            continue
        j = idx[i]
        # Never a frame within dt_min (nor another sequence, nor itself).
        assert seq[j] == seq[i] and abs(int(time[j]) - int(time[i])) >= dt_min and j != i
        # The closest valid one (brute force).
        assert d[i, j] == pytest.approx(d[i][valid].min(), abs=1e-5)


def test_mining_ignores_closer_invalid_frames():
    # Row 0's nearest rows are its own-instant view and a frame 1 step away;
    # the only valid negative (time 5) is far in embedding space.
    emb = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.99, 0.14], [-1.0, 0.0], [0.0, 1.0]])
    seq = jnp.asarray([0, 0, 0, 0, 1])
    time = jnp.asarray([0, 0, 1, 5, 0])
    idx, ok = losses.mine_hard_negatives(emb, seq, time, dt_min=3)
    assert int(idx[0]) == 3 and bool(ok[0])
    assert not bool(ok[4])          # alone in its sequence: no negative
    idx, ok = losses.mine_hard_negatives(emb, seq, time, dt_min=3, cross_sequence=True)
    assert int(idx[0]) == 4         # another sequence is closer than row 3


def test_triplet_loss_hand_case():
    # Two instants x two views of one sequence, dt = 10 >= dt_min.
    emb = jnp.asarray([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    seq = jnp.zeros(4, jnp.int32)
    time = jnp.asarray([0, 0, 10, 10])
    view = jnp.asarray([0, 1, 0, 1])
    e = np.asarray(emb)
    d = ((e[:, None] - e[None]) ** 2).sum(-1)
    margin = 0.5
    expected = []
    for a, p, negs in [(0, 1, [2, 3]), (1, 0, [2, 3]), (2, 3, [0, 1]), (3, 2, [0, 1])]:
        dn = min(d[a, n] for n in negs)
        expected.append(max(d[a, p] - dn + margin, 0.0))
    loss, aux = losses.triplet_loss(emb, seq, time, view, dt_min=5, margin=margin)
    assert float(loss) == pytest.approx(np.mean(expected), abs=1e-5)


@pytest.mark.parametrize("kind", ["triplet", "contrastive"])
def test_losses_finite_gradients_and_invariance(kind):
    emb, seq, time, view = (jnp.asarray(x) for x in _batch(7))
    f = lambda e: losses.multiview_loss(e / jnp.linalg.norm(e, axis=-1, keepdims=True), seq, time,
                                        view, kind=kind, dt_min=5)[0]
    g = jax.grad(f)(emb)
    assert np.all(np.isfinite(np.asarray(g)))
    # Perfectly view-invariant, well separated embeddings have (near) zero triplet loss.
    inst = np.asarray(seq) * 100 + np.asarray(time)
    _, inv = np.unique(inst, return_inverse=True)
    basis = np.eye(len(np.unique(inst)), dtype=np.float32)[inv]
    if kind == "triplet":
        assert float(f(jnp.asarray(basis))) == pytest.approx(0.0, abs=1e-6)
    # Identical positives with zero-distance gradient stay finite (safe sqrt).
    ge = jax.grad(lambda e: losses.triplet_loss(e, seq, time, view, dt_min=5, squared=False)[0])(
        jnp.asarray(basis))
    assert np.all(np.isfinite(np.asarray(ge)))


def test_pose_loss_mask():
    pred = jnp.zeros((3, 17, 3))
    tgt = jnp.ones((3, 17, 3)).at[2].set(100.0)
    loss = losses.pose_loss(pred, tgt, mask=jnp.asarray([1.0, 1.0, 0.0]), kind="l1")
    assert float(loss) == pytest.approx(1.0)


def test_pose_consistency_is_rotation_invariant_and_matches_pdist():
    from scipy.spatial.distance import pdist
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, 17, 3))               # two instants of one sequence
    R = Rotation.random(3, random_state=1).as_matrix()
    # rows: (t0, v0) (t0, v1) (t1, v0) (t1, v1) (t1, v2); v1 and v2 rotated + moved
    poses = np.stack([base[0], base[0] @ R[0].T + 0.3, base[1], base[1] @ R[1].T - 0.2,
                      base[1] @ R[2].T])
    seq = jnp.zeros(5, jnp.int32)
    time = jnp.array([0, 0, 1, 1, 1])
    view = jnp.array([0, 1, 0, 1, 2])
    loss = losses.pose_consistency_loss(jnp.asarray(poses, jnp.float32), seq, time, view)
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    # Perturb one view: the loss is the mean over the 8 ordered positive pairs of the
    # mean |distance difference| over the 17 * 16 ordered joint pairs.
    noisy = poses.copy()
    noisy[3] += rng.normal(size=(17, 3)) * 0.1
    d = [pdist(p) for p in noisy]
    pairs = [(0, 1), (2, 3), (2, 4), (3, 4)]
    want = 2 * sum(np.abs(d[a] - d[b]).mean() for a, b in pairs) / 8
    got = losses.pose_consistency_loss(jnp.asarray(noisy, jnp.float32), seq, time, view)
    assert float(got) == pytest.approx(want, rel=1e-4)
    g = jax.grad(lambda p: losses.pose_consistency_loss(p, seq, time, view))(
        jnp.asarray(noisy, jnp.float32))
    assert np.isfinite(np.asarray(g)).all()


# Eight rows written out: (sequence, time, view); dt_min = 7.
#   0: (0, 0, 0)   1: (0, 0, 1)   2: (0, 3, 0)   3: (0, 3, 1)
#   4: (0, 10, 0)  5: (0, 10, 1)  6: (1, 0, 0)   7: (1, 0, 1)
_SEQ = np.array([0, 0, 0, 0, 0, 0, 1, 1])
_TIME = np.array([0, 0, 3, 3, 10, 10, 0, 0])
_VIEW = np.array([0, 1, 0, 1, 0, 1, 0, 1])
_POS = {0: [1], 1: [0], 2: [3], 3: [2], 4: [5], 5: [4], 6: [7], 7: [6]}
# Same sequence and |dt| >= 7 (3 -> 10 is exactly 7: a negative); times 0 and 3 are too
# close; sequence 1 has a single instant, so no negatives at all.
_NEG = {0: [4, 5], 1: [4, 5], 2: [4, 5], 3: [4, 5], 4: [0, 1, 2, 3], 5: [0, 1, 2, 3],
        6: [], 7: []}
# With cross_sequence, the other sequence's rows are negatives as well.
_NEG_X = {i: _NEG[i] + ([6, 7] if i < 6 else [0, 1, 2, 3, 4, 5]) for i in range(8)}
_ANGLES = np.radians([0.0, 20.0, 50.0, 95.0, 170.0, 130.0, 260.0, 300.0])
_EMB = np.stack([np.cos(_ANGLES), np.sin(_ANGLES), np.zeros(8)], 1)     # unit vectors


def _args():
    return (jnp.asarray(_EMB, jnp.float32), jnp.asarray(_SEQ), jnp.asarray(_TIME),
            jnp.asarray(_VIEW))


def test_masks_and_mining_on_the_written_out_batch():
    """The positive / negative masks are the hand lists above (the dt = dt_min pair is a
    negative), and the mined negative is the closest one by angle on the circle."""
    emb, seq, time, view = _args()
    pos = np.asarray(losses.positive_mask(seq, time, view))
    mine = jax.jit(losses.mine_hard_negatives, static_argnums=(3, 4))
    for neg_map, cross in ((_NEG, False), (_NEG_X, True)):
        neg = np.asarray(losses.negative_mask(seq, time, 7, cross_sequence=cross))
        for i in range(8):
            assert np.flatnonzero(pos[i]).tolist() == _POS[i]
            assert np.flatnonzero(neg[i]).tolist() == sorted(neg_map[i])
    idx, ok = mine(emb, seq, time, 7, False)
    # closest in angle: 0 (0 deg) -> 5 (130 deg); 1 (20) -> 5; 2 (50) -> 5; 3 (95) -> 5;
    # 4 (170) -> 3 (95); 5 (130) -> 3
    assert np.asarray(ok).tolist() == [True] * 6 + [False] * 2
    assert np.asarray(idx)[:6].tolist() == [5, 5, 5, 5, 3, 3]
    idx, _ = mine(emb, seq, time, 7, True)
    # with sequence 1 (260, 300 deg): 0 (0 deg) -> 7 (300 = -60 deg, closer than 130)
    assert int(idx[0]) == 7 and int(idx[6]) == 4 and int(idx[7]) == 0


@pytest.mark.parametrize("cross", [False, True])
def test_contrastive_loss_equals_the_hand_infonce(cross):
    """InfoNCE over the (anchor, positive) pairs that have negatives: mean of
    ``-log(exp(s_ap) / (exp(s_ap) + sum_n exp(s_an)))``, s = cosine / temperature, with
    the negative sets written out above (rows 6 and 7 drop out without cross_sequence)."""
    emb, seq, time, view = _args()
    t = 0.25
    s = (_EMB @ _EMB.T) / t
    neg_map = _NEG_X if cross else _NEG
    terms = [-np.log(np.exp(s[a, p]) / (np.exp(s[a, p]) + sum(np.exp(s[a, n])
                                                             for n in neg_map[a])))
             for a in range(8) for p in _POS[a] if neg_map[a]]
    assert len(terms) == (8 if cross else 6)
    loss = jax.jit(lambda *a: losses.multiview_loss(
        *a, kind="contrastive", dt_min=7, temperature=t, cross_sequence=cross)[0])(
        emb, seq, time, view)
    assert float(loss) == pytest.approx(np.mean(terms), rel=1e-5)


@pytest.mark.parametrize("squared", [True, False])
def test_triplet_loss_equals_the_hand_hinge(squared):
    """Mean over the 6 (anchor, positive) pairs with negatives of
    ``max(d(a, p) - min_n d(a, n) + margin, 0)`` (squared or plain Euclidean distance);
    the mean distances in ``aux`` are those of the pairs / hard negatives."""
    emb, seq, time, view = _args()
    d = np.linalg.norm(_EMB[:, None] - _EMB[None], axis=-1)
    d = d ** 2 if squared else d
    margin = 0.3
    hinge, dp, dn = [], [], []
    for a in range(6):
        near = min(d[a, n] for n in _NEG[a])
        dn.append(near)
        for p in _POS[a]:
            hinge.append(max(d[a, p] - near + margin, 0.0))
            dp.append(d[a, p])
    assert 0 < sum(h > 0 for h in hinge) < 6          # some triplets active, some not
    loss, aux = jax.jit(lambda *a: losses.triplet_loss(*a, dt_min=7, margin=margin,
                                                       squared=squared))(emb, seq, time, view)
    assert float(loss) == pytest.approx(np.mean(hinge), rel=1e-5, abs=1e-6)
    assert float(aux["active"]) == pytest.approx(np.mean(np.array(hinge) > 0))
    assert float(aux["d_pos"]) == pytest.approx(np.mean(dp), rel=1e-5)
    assert float(aux["d_neg"]) == pytest.approx(np.mean(dn), rel=1e-5)


def test_pose_loss_hand_values():
    """Frame 0: every joint 5 away (3-4-5 offsets); frame 1: 2 of 4 joints 2 away on z.
    mpjpe = mean(5, (2 + 2 + 0 + 0) / 4) = 3; l1 = mean(7/3, 4/12); mse = mean(25/3, 8/12);
    with the mask (0, 1): frame 1 only."""
    pred = jnp.zeros((2, 4, 3))
    tgt = np.zeros((2, 4, 3), np.float32)
    tgt[0] = [3.0, 4.0, 0.0]
    tgt[1, :2, 2] = 2.0
    tgt = jnp.asarray(tgt)
    pose_loss = jax.jit(losses.pose_loss, static_argnames="kind")
    assert float(pose_loss(pred, tgt)) == pytest.approx(3.0, rel=1e-5)
    assert float(pose_loss(pred, tgt, kind="l1")) == pytest.approx((7 / 3 + 1 / 3) / 2)
    assert float(pose_loss(pred, tgt, kind="mse")) == pytest.approx((25 / 3 + 2 / 3) / 2)
    assert float(pose_loss(pred, tgt, jnp.asarray([0.0, 1.0]))) == pytest.approx(1.0, rel=1e-4)
