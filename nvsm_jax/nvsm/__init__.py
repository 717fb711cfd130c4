"""NVSM: neural view synthesis and matching, the semi-supervised EM over NeMo.
In the order data flows:

* :mod:`~nvsm_jax.nvsm.settings`: the typed configs (``FewShotConfig``, the E-step's
  ``EStepConfig``; no jax, a config file imports them);
* :mod:`~nvsm_jax.nvsm.synthesis`: a labelled image's vertex features rasterised at a
  nearby pose, a feature map for a pose nobody labelled;
* :mod:`~nvsm_jax.nvsm.matching`: every synthesised view scored against every pool image;
* :mod:`~nvsm_jax.nvsm.pseudo_labels`: which matches become pseudo-labels (threshold,
  margin, caps per round, source and sector) and their quality against hidden poses
  (reporting only);
* :mod:`~nvsm_jax.nvsm.estep`: the E-step composed from the three;
* :mod:`~nvsm_jax.nvsm.rounds`: the EM rounds (E-step, M-step on NeMo's trainer, record);
* :mod:`~nvsm_jax.nvsm.run_state`: the run's files, so a killed run resumes;
* :mod:`~nvsm_jax.nvsm.config_checks`: every field of a few-shot config;
* :mod:`~nvsm_jax.nvsm.experiment`: the few-shot experiment (``nvsm-fewshot``): the
  classifier, NeMo, NVSM and NeMo-full rows, figures and reports.
"""
