"""NeMo: a feature net and a vertex memory trained with the CoKe loss, and pose by
render-and-compare. In the order data flows:

* :mod:`~nvsm_jax.nemo.settings`: the typed config (``NemoConfig``: the CoKe loss, the
  solver and the shared blocks; no jax, a config file imports it);
* :mod:`~nvsm_jax.nemo.config_checks`: every field of a NeMo config, checked before work;
* :mod:`~nvsm_jax.nemo.features`: vertex features sampled at projected, visible vertices,
  the moving-average vertex memory and the clutter bank;
* :mod:`~nvsm_jax.nemo.losses`: the CoKe contrastive loss;
* :mod:`~nvsm_jax.nemo.train`: the model, its train step and ``train_and_evaluate``;
* :mod:`~nvsm_jax.nemo.pose_solver`: render-and-compare over a pose grid, then gradient
  descent through the rasteriser;
* :mod:`~nvsm_jax.nemo.evaluate`: a trained workdir on a test root (``nvsm-evaluate``);
* :mod:`~nvsm_jax.nemo.predict`: poses of a user's own photos (``nvsm-predict``).

It imports the shared core (:mod:`nvsm_jax.geometry`, :mod:`~nvsm_jax.training`, ...) and
the pre-training baseline whose weights it may start from, never :mod:`nvsm_jax.nvsm`.
"""
