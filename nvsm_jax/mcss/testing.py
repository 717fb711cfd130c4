"""Small MCSS training sets for tests and notebooks (no files, no rendering)."""

from __future__ import annotations

import numpy as np

from nvsm_jax.mcss.train import TrainSet

__all__ = ["fake_train_set"]


def fake_train_set(n_seq: int = 3, n_views: int = 3, n_frames: int = 12, size=(32, 32),
                   seed: int = 0) -> TrainSet:
    """Random images of ``n_seq`` synchronised sequences x ``n_views`` x ``n_frames``
    (flat, sequence-major, then view, then frame); sequence 0 is labelled with random
    poses [n_views * n_frames, 17, 3] (metres, scale 0.3)."""
    rng = np.random.default_rng(seed)
    n = n_seq * n_views * n_frames
    seq_id = np.repeat(np.arange(n_seq), n_views * n_frames).astype(np.int32)
    view = np.tile(np.repeat(np.arange(n_views), n_frames), n_seq).astype(np.int32)
    frame = np.tile(np.arange(n_frames), n_seq * n_views).astype(np.int32)
    lab = np.flatnonzero(seq_id == 0)
    return TrainSet(
        images=rng.integers(0, 256, size=(n, *size, 3), dtype=np.uint8), seq_id=seq_id,
        view=view, frame=frame, seq_views=np.full(n_seq, n_views),
        seq_frames=np.full(n_seq, n_frames), seq_offset=np.arange(n_seq) * n_views * n_frames,
        labelled_idx=lab, labelled_pose=rng.normal(size=(len(lab), 17, 3)).astype(np.float32) * 0.3)
