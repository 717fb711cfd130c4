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
