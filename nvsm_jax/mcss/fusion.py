"""Multi-view pseudo-labels: one pose per instant from all synchronised views.

Every frame of a synchronised sequence shows the same 3D pose, each camera in its
own frame: the root-relative poses of views ``a`` and ``b`` differ by one rotation
``R_ab`` for the whole sequence (the cameras do not move). The trainer never reads
the calibration; the rotations come from the poses themselves:

* from the labelled instants when the sequence has any (every view of a labelled
  instant is labelled, :func:`nvsm_jax.mcss.train.supervision_mask`): exact;
* otherwise from the network's own predictions over all of the sequence's frames
  (Kabsch on ``T x 17`` joint pairs: one rotation from many noisy poses).

Fusing the views' predictions in one frame (the per-joint median over views,
robust to one view flipped front/back) and rotating the result back into each
camera gives a pseudo-label for every unlabelled frame
(:func:`sequence_pseudo_labels`, :func:`pseudo_labels`); a second training run
on labelled + pseudo-labelled frames is MCSS's multi-view bootstrapping
(``train.multiview_pseudo``, DESIGN.md).

All functions are NumPy on host arrays (a few thousand poses).
"""

from __future__ import annotations

import numpy as np

from nvsm_jax.mcss import metrics

__all__ = ["kabsch", "view_rotations", "fuse", "sequence_pseudo_labels", "pseudo_labels"]


def kabsch(a, b) -> np.ndarray:
    """The rotation ``R`` [3, 3] (det +1) minimising ``sum_i |R a_i - b_i|^2``
    (:func:`nvsm_jax.mcss.metrics.optimal_rotation`, as a matrix acting on columns).

    a, b: [N, 3] paired points (already centred: root-relative joints).
    """
    a = np.asarray(a, np.float64).reshape(-1, 3)
    b = np.asarray(b, np.float64).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"kabsch: {a.shape} vs {b.shape} points")
    rot, _ = metrics.optimal_rotation(a, b)            # a @ rot ~ b, so R = rot^T
    return rot.T


def view_rotations(poses, mask=None) -> np.ndarray:
    """Rotations from each view's camera frame into view 0's: [V, 3, 3] (``R[0] = I``).

    poses: [V, T, J, 3] root-relative joints of one sequence; mask: [T] bool, the
    instants to use (default all), e.g. the labelled ones.
    """
    poses = np.asarray(poses, np.float64)
    v, t = poses.shape[:2]
    mask = np.ones(t, bool) if mask is None else np.asarray(mask, bool)
    if not np.any(mask):
        raise ValueError("view_rotations: no instants to align on")
    ref = poses[0, mask].reshape(-1, 3)
    return np.stack([np.eye(3)] + [kabsch(poses[k, mask].reshape(-1, 3), ref)
                                   for k in range(1, v)])


def fuse(poses, rotations, how: str = "median") -> np.ndarray:
    """One pose per instant in view 0's frame, from every view: [T, J, 3].

    poses: [V, T, J, 3]; rotations: [V, 3, 3] (:func:`view_rotations`); how:
    ``"median"`` (per joint and axis over views) or ``"mean"``.
    """
    in_ref = np.einsum("vij,vtkj->vtki", np.asarray(rotations, np.float64),
                       np.asarray(poses, np.float64))
    if how == "median":
        return np.median(in_ref, axis=0)
    if how == "mean":
        return np.mean(in_ref, axis=0)
    raise ValueError(f"fuse: how must be 'median' or 'mean', got {how!r}")


def sequence_pseudo_labels(pred, labels=None, labelled=None, how: str = "median") -> np.ndarray:
    """Each view's pseudo-label for every instant of one sequence: [V, T, J, 3].

    pred: [V, T, J, 3] predicted root-relative poses; labels: [V, T, J, 3] with the
    true poses where ``labelled`` [T] is True (the views are rotated onto each
    other from those instants; from ``pred`` when there are none). Labelled
    instants keep their labels.
    """
    pred = np.asarray(pred, np.float64)
    has = labelled is not None and np.any(labelled)
    rot = view_rotations(labels, labelled) if has else view_rotations(pred)
    fused = fuse(pred, rot, how)                                        # [T, J, 3]
    out = np.einsum("vji,tkj->vtki", rot, fused)                        # R^T: back per view
    if has:
        out[:, np.asarray(labelled, bool)] = np.asarray(labels, np.float64)[:, labelled]
    return out


def pseudo_labels(pred, seq_offset, seq_views, seq_frames, labelled_idx, labelled_pose,
                  how: str = "median") -> np.ndarray:
    """Pseudo-labels for every frame of a flat multi-view training set: [N, J, 3].

    pred: [N, J, 3] predictions (flat frames ``seq_offset[s] + v * T_s + t``);
    labelled_idx [L] / labelled_pose [L, J, 3]: the true labels (kept). Units as
    given (the trainer's metres).
    """
    pred = np.asarray(pred, np.float64)
    labels = np.zeros_like(pred)
    is_lab = np.zeros(len(pred), bool)
    labels[np.asarray(labelled_idx)] = np.asarray(labelled_pose, np.float64)
    is_lab[np.asarray(labelled_idx)] = True
    out = np.empty_like(pred)
    for s, (off, v, t) in enumerate(zip(seq_offset, seq_views, seq_frames)):
        rows = slice(int(off), int(off) + int(v) * int(t))
        shape = (int(v), int(t)) + pred.shape[1:]
        lab_vt = is_lab[rows].reshape(int(v), int(t))
        instants = lab_vt.all(axis=0)        # labelled in every view: usable for rotations
        out[rows] = sequence_pseudo_labels(pred[rows].reshape(shape), labels[rows].reshape(shape),
                                           instants, how).reshape(-1, *pred.shape[1:])
        partial = lab_vt & ~instants[None]   # labelled in some views only: keep those labels
        if np.any(partial):
            idx = np.flatnonzero(partial.reshape(-1)) + int(off)
            out[idx] = labels[idx]
    return out.astype(np.float32)
