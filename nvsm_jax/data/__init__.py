"""Data layer: on-disk format, loaders, few-shot splits, input pipeline, synthetic data.

Public API (see each module's docstring for the details):

* format: ``CATEGORIES``, ``OCCLUSION_LEVELS``, ``occlusion_suffix``, ``subset_name``, ``DataError``
* loaders: ``PoseSet``, ``load_pose_set``, ``load_model_mesh``
* few-shot: ``UnlabelledSet``, ``FewShotSplit``, ``make_fewshot_split``,
  ``hidden_poses`` (evaluation/reporting only), ``anchor_order``
* pipeline: ``BatchIterator``, ``Augment``, ``flip_pose``, ``color_jitter``,
  ``normalize_images``, ``shard``
* testing: ``write_tiny_root`` (tiny fixture roots)
* synthetic (imported lazily, needs the rasteriser): ``nvsm_jax.data.synthetic``
* real-data preparation: ``nvsm_jax.data.pascal3d``, ``nvsm_jax.data.kitti``,
  ``nvsm_jax.mcss.h36m_archives`` (Human3.6M archives -> the MCSS layout)
"""

from nvsm_jax.lazy import lazy_exports

_EXPORTS = {
    "format": ("CATEGORIES", "OCCLUSION_LEVELS", "DataError", "occlusion_suffix", "subset_name"),
    "loaders": ("PoseSet", "load_pose_set", "load_model_mesh"),
    "fewshot": ("FewShotSplit", "UnlabelledSet", "anchor_order", "hidden_poses",
                "make_fewshot_split"),
    "pipeline": ("Augment", "BatchIterator", "color_jitter", "flip_pose", "normalize_images",
                 "shard"),
}
__all__ = [name for names in _EXPORTS.values() for name in names]
# imported on first use: ``nvsm_jax.data.format`` (a config file's categories) needs no jax
__getattr__ = lazy_exports(__name__, {n: m for m, names in _EXPORTS.items() for n in names})


def __dir__():
    return sorted(set(globals()) | set(__all__))
