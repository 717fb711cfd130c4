"""MCSS: multiview-consistent semi-supervised 3D human pose (Mitra et al., CVPR 2020).

Modules: :mod:`skeleton` (17-joint H3.6M skeleton, FK, synthetic actions),
:mod:`data` (rendered synchronised multi-view benchmark), :mod:`h36m` (loader
for a preprocessed Human3.6M layout and the synthetic one), :mod:`model`,
:mod:`losses`, :mod:`metrics`, :mod:`retrieval`, :mod:`train`, :mod:`fusion`,
:mod:`experiment`, :mod:`config_checks` (every field of an MCSS config), :mod:`settings`
(the config's typed blocks; no jax), :mod:`h36m_archives` (Human3.6M's official archives
into that layout) and :mod:`mpi_inf_3dhp`.

The names below are imported from their module on first access, so importing
:mod:`settings` (a config file does) does not import jax.
"""

from nvsm_jax.lazy import lazy_exports

_EXPORTS = {"h36m": ("MultiViewData", "load_dataset"),
            "losses": ("contrastive_loss", "mine_hard_negatives", "multiview_loss", "pose_loss",
                       "triplet_loss"),
            "metrics": ("mpjpe", "n_mpjpe", "pa_mpjpe", "procrustes_align"),
            "model": ("MCSSNet", "make_model"),
            "skeleton": ("BONES", "H36M_32_TO_17", "JOINT_NAMES")}
__all__ = [name for names in _EXPORTS.values() for name in names]
__getattr__ = lazy_exports(__name__, {n: m for m, names in _EXPORTS.items() for n in names})


def __dir__():
    return sorted(set(globals()) | set(__all__))
