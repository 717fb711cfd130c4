"""The baselines beside NeMo and NVSM:

* :mod:`~nvsm_jax.baselines.settings`: their typed configs (``PretrainConfig``,
  ``ClassifierConfig``; no jax);
* :mod:`~nvsm_jax.baselines.pretrain`: self-supervised pre-training of the feature net
  (two augmented views, dense contrastive loss), weights a NeMo run may start from;
* :mod:`~nvsm_jax.baselines.classifier`: pose-bin classification (the seed table's
  Res50-Gene row), from random, ImageNet or pre-trained encoder weights.
"""
