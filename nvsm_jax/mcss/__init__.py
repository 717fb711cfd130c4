"""MCSS: multiview-consistent semi-supervised 3D human pose (Mitra et al., CVPR 2020).

Modules: :mod:`skeleton` (17-joint H3.6M skeleton, FK, synthetic actions),
:mod:`data` (rendered synchronised multi-view benchmark), :mod:`h36m` (loader
for a preprocessed Human3.6M layout and the synthetic one), :mod:`model`,
:mod:`losses`, :mod:`metrics`, :mod:`retrieval`, :mod:`train`, :mod:`fusion`,
:mod:`experiment`, :mod:`config_checks` (every field of an MCSS config), :mod:`h36m_archives`
(Human3.6M's official archives into that layout) and :mod:`mpi_inf_3dhp`.
"""

from nvsm_jax.mcss.h36m import MultiViewData, load_dataset
from nvsm_jax.mcss.losses import (contrastive_loss, mine_hard_negatives, multiview_loss,
                                  pose_loss, triplet_loss)
from nvsm_jax.mcss.metrics import mpjpe, n_mpjpe, pa_mpjpe, procrustes_align
from nvsm_jax.mcss.model import MCSSNet, make_model
from nvsm_jax.mcss.skeleton import BONES, H36M_32_TO_17, JOINT_NAMES

__all__ = ["MultiViewData", "load_dataset", "contrastive_loss", "mine_hard_negatives",
           "multiview_loss", "pose_loss", "triplet_loss", "mpjpe", "n_mpjpe", "pa_mpjpe",
           "procrustes_align", "MCSSNet", "make_model", "BONES", "H36M_32_TO_17", "JOINT_NAMES"]
