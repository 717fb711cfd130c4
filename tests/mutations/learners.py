"""Mutations of the learners area (see tests/mutations/__init__.py): the pose-classification
baseline, dense contrastive pre-training, MCSS training and its multi-view loss, the figures."""

from tests.mutations import Mutation

_MCSS_STEP = "tests/test_mcss_train.py::test_train_step_lowers_both_losses_on_a_fixed_batch"
_MCSS_LOSSES = "tests/test_mcss_losses.py::"
_DRAW = ("tests/test_figures.py::"
         "test_draw_poses_outline_at_hand_projected_pixels_in_the_error_colour")

MUTATIONS = [
    # ------------------------------------------------------------------ MCSS training
    Mutation(
        name="mcss_grad_ascent",
        file="nvsm_jax/mcss/train.py",
        old="return state.apply_gradients(grads=grads), out",
        new="return state.apply_gradients(grads=jax.tree_util.tree_map(lambda g: -g, grads)), out",
        tests=(_MCSS_STEP,),
        kind="sign"),
    Mutation(
        name="mcss_multiview_term_dropped",
        file="nvsm_jax/mcss/train.py",
        old="total = total + w_mv * l_mv",
        new="total = total",
        tests=(_MCSS_STEP,),
        kind="dropped term"),
    Mutation(
        name="mcss_embedding_detached",
        file="nvsm_jax/mcss/train.py",
        old='emb[n_sup:], batch["mv_seq"]',
        new='jax.lax.stop_gradient(emb[n_sup:]), batch["mv_seq"]',
        tests=(_MCSS_STEP,),
        kind="stop_gradient"),
    Mutation(
        name="mcss_pose_loss_detached",
        file="nvsm_jax/mcss/train.py",
        old='l_pose = losses.pose_loss(pose[:n_sup], batch["sup_pose"]',
        new='l_pose = losses.pose_loss(jax.lax.stop_gradient(pose[:n_sup]), batch["sup_pose"]',
        tests=(_MCSS_STEP,),
        kind="stop_gradient"),
    # ------------------------------------------------------------------ MCSS losses
    Mutation(
        name="mcss_negatives_exclude_dt_min",
        file="nvsm_jax/mcss/losses.py",
        old="far = jnp.abs(time[:, None] - time[None, :]) >= dt_min",
        new="far = jnp.abs(time[:, None] - time[None, :]) > dt_min",
        tests=(_MCSS_LOSSES + "test_masks_and_mining_on_the_written_out_batch",),
        kind="off by one"),
    Mutation(
        name="mcss_contrastive_positive_not_in_denominator",
        file="nvsm_jax/mcss/losses.py",
        old="per_pair = jnp.logaddexp(sim, neg_lse) - sim",
        new="per_pair = neg_lse - sim",
        tests=(_MCSS_LOSSES + "test_contrastive_loss_equals_the_hand_infonce",),
        kind="dropped term"),
    Mutation(
        name="mcss_triplet_hinge_swapped",
        file="nvsm_jax/mcss/losses.py",
        old="hinge = jnp.maximum(d - d_neg + margin, 0.0)",
        new="hinge = jnp.maximum(d_neg - d + margin, 0.0)",
        tests=(_MCSS_LOSSES + "test_triplet_loss_equals_the_hand_hinge",),
        kind="swapped args"),
    Mutation(
        name="mcss_mpjpe_wrong_axis",
        file="nvsm_jax/mcss/losses.py",
        old="jnp.sum((pred - target) ** 2, axis=-1) + 1e-9), axis=-1)",
        new="jnp.sum((pred - target) ** 2, axis=-2) + 1e-9), axis=-1)",
        tests=(_MCSS_LOSSES + "test_pose_loss_hand_values",),
        kind="wrong axis"),
    # ------------------------------------------------------------------ classifier baseline
    Mutation(
        name="classifier_grad_ascent",
        file="nvsm_jax/baselines/classifier.py",
        old="state = state.apply_gradients(grads=grads).replace(model_state=new_ms)",
        new="state = state.apply_gradients(grads=jax.tree_util.tree_map(lambda g: -g, grads)"
            ").replace(model_state=new_ms)",
        tests=("tests/test_baselines.py::test_tiny_training_decreases_loss_and_predicts",),
        kind="sign"),
    Mutation(
        name="classifier_loss_last_head_only",
        file="nvsm_jax/baselines/classifier.py",
        old="total = total + ce",
        new="total = ce",
        tests=("tests/test_baselines.py::test_bins_and_smoothed_cross_entropy_by_hand",),
        kind="dropped term"),
    Mutation(
        name="classifier_periodic_bins_not_centred",
        file="nvsm_jax/baselines/classifier.py",
        old="k = xnp.mod(xnp.floor(t + 0.5), spec.num)",
        new="k = xnp.mod(xnp.floor(t), spec.num)",
        tests=("tests/test_baselines.py::test_bins_and_smoothed_cross_entropy_by_hand",),
        kind="constant"),
    Mutation(
        name="classifier_predicts_argmin",
        file="nvsm_jax/baselines/classifier.py",
        old="jnp.stack([jnp.argmax(logits[h], -1) for h in HEADS], axis=-1)",
        new="jnp.stack([jnp.argmin(logits[h], -1) for h in HEADS], axis=-1)",
        tests=("tests/test_baselines.py::test_predict_decodes_the_argmax_bin_of_each_head",),
        kind="sign"),
    # ------------------------------------------------------------------ pre-training
    Mutation(
        name="pretrain_grad_ascent",
        file="nvsm_jax/baselines/pretrain.py",
        old="state = state.apply_gradients(grads=grads).replace(model_state=new_ms)",
        new="state = state.apply_gradients(grads=jax.tree_util.tree_map(lambda g: -g, grads)"
            ").replace(model_state=new_ms)",
        tests=("tests/test_pretrain.py::test_tiny_pretrain_on_8_devices_decreases_loss",),
        kind="sign"),
    Mutation(
        name="pretrain_infonce_one_direction",
        file="nvsm_jax/baselines/pretrain.py",
        old="return 0.5 * (_masked_ce(logits, valid, valid) + _masked_ce(logits.T, valid, valid))",
        new="return _masked_ce(logits, valid, valid)",
        tests=("tests/test_pretrain.py::test_dense_infonce_hand_case",),
        kind="dropped term"),
    Mutation(
        name="pretrain_view2_gathers_view1_cells",
        file="nvsm_jax/baselines/pretrain.py",
        old='f2 = jnp.take_along_axis(flat2, batch["idx2"][..., None], axis=1)',
        new='f2 = jnp.take_along_axis(flat2, batch["idx1"][..., None], axis=1)',
        tests=("tests/test_pretrain.py::"
               "test_pretrain_loss_gathers_the_sampled_cells_and_weights_the_terms",),
        kind="swapped args"),
    Mutation(
        name="pretrain_global_not_normalised",
        file="nvsm_jax/baselines/pretrain.py",
        old="g2 = g2 / jnp.linalg.norm(g2, axis=-1, keepdims=True).clip(1e-6)",
        new="g2 = g2",
        tests=("tests/test_pretrain.py::"
               "test_pretrain_loss_gathers_the_sampled_cells_and_weights_the_terms",),
        kind="skipped step"),
    # ------------------------------------------------------------------ figures
    Mutation(
        name="draw_poses_without_prediction",
        file="nvsm_jax/figures.py",
        old="draw(ax, pred[i], i, color=colour, lw=1.6)",
        new="pass",
        tests=(_DRAW,),
        kind="skipped step"),
    Mutation(
        name="draw_poses_colour_inverted",
        file="nvsm_jax/figures.py",
        old="ok = errors[i] < threshold",
        new="ok = errors[i] > threshold",
        tests=(_DRAW,),
        kind="inverted mask"),
    Mutation(
        name="coverage_panel_not_cumulative",
        file="nvsm_jax/figures.py",
        old="sel = rnd <= rd",
        new="sel = rnd < rd",
        tests=("tests/test_figures.py::"
               "test_plot_coverage_panels_are_cumulative_with_the_right_counts",),
        kind="off by one"),
    Mutation(
        name="rounds_fraction_one_not_percent",
        file="nvsm_jax/figures.py",
        old="np.nanmax(np.abs(finite)) <= 1.0 else v",
        new="np.nanmax(np.abs(finite)) < 1.0 else v",
        tests=("tests/test_figures.py::test_plot_rounds_draws_the_recorded_numbers",),
        kind="off by one"),
    Mutation(
        name="pca_rgb_not_centred",
        file="nvsm_jax/figures.py",
        old="proj = (x - pca.mean) @ pca.components.T",
        new="proj = x @ pca.components.T",
        tests=("tests/test_figures.py::test_fit_pca_matches_the_covariance_eigenvectors",),
        kind="dropped term"),
    # ------------------------------------------------------------------ MCSS evaluation
    Mutation(
        name="mcss_cross_subject_gallery_keeps_own_subject",
        file="nvsm_jax/mcss/retrieval.py",
        old="g_idx = np.flatnonzero((view != query_view) & (subject != s))",
        new="g_idx = np.flatnonzero((view != query_view) | (subject != s))",
        tests=("tests/test_mcss_experiment.py::"
               "test_cross_subject_retrieval_reads_pose_not_appearance",),
        kind="inverted mask"),
    Mutation(
        name="mcss_gap_closed_over_the_baseline",
        file="nvsm_jax/mcss/experiment.py",
        old='"gap_closed": None if not gap or gap <= 0 else (base - ours) / gap}',
        new='"gap_closed": None if not gap or gap <= 0 else (base - ours) / base}',
        tests=("tests/test_mcss_experiment.py::test_claims_and_seed_aggregate_by_hand",),
        kind="swapped args"),

    Mutation(
        name="mcss_partial_cache_one_stage_late",
        file="nvsm_jax/mcss/train.py",
        old="    elif norm != \"batch\" and lite and k > 0:\n        stage = k - 1",
        new="    elif norm != \"batch\" and lite and k > 0:\n        stage = k",
        tests=("tests/test_mcss_train.py::test_cache_level_for_each_freezing",
               "tests/test_mcss_train.py::"
               "test_partly_frozen_step_on_cached_maps_trains_stages_from_k_only"),
        kind="off by one"),
    Mutation(
        name="mcss_cache_copies_all_the_same_jitter",
        file="nvsm_jax/mcss/train.py",
        old="key=jax.random.fold_in(base, c))",
        new="key=base)",
        tests=("tests/test_mcss_train.py::"
               "test_cache_copies_are_the_maps_of_jittered_images_drawn_per_frame",),
        kind="constant"),
    # ------------------------------------------------------------------ MCSS people
    Mutation(
        name="mcss_feet_point_backwards",
        file="nvsm_jax/mcss/data.py",
        old='"r_toe": (135 * foot, 0, -60 * foot)',
        new='"r_toe": (-135 * foot, 0, -60 * foot)',
        tests=("tests/test_mcss_data.py::test_feet_point_forward",),
        kind="sign"),
    Mutation(
        name="mcss_print_in_the_shirt_colour",
        file="nvsm_jax/mcss/data.py",
        old='(_P["band_r"], _P["band_l"], 90, 5, "g"), (_P["stripe_top"], _P["stripe_low"], 56, 5, "g")',
        new='(_P["band_r"], _P["band_l"], 90, 0, "g"), (_P["stripe_top"], _P["stripe_low"], 56, 0, "g")',
        tests=("tests/test_mcss_data.py::test_front_and_back_views_differ_at_head_and_chest",),
        kind="constant"),
    # ------------------------------------------------------- the trainers' one optimiser
    Mutation(
        name="optimizer_weight_decay_dropped",
        file="nvsm_jax/training.py",
        old="tx = make_adamw(schedule, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2,",
        new="tx = make_adamw(schedule, weight_decay=0.0, b1=optim.b1, b2=optim.b2,",
        tests=("tests/test_training.py::"
               "test_make_optimizer_is_adam_with_clip_l2_warmup_cosine_and_frozen_leaves",),
        kind="dropped term"),

]
