"""Mutations of the nvsm area (see tests/mutations/__init__.py)."""

from tests.mutations import Mutation

_SS = "tests/test_semi_supervised.py"
_SYN = "tests/test_synthesis.py"
_MATCH = "tests/test_matching.py"
_PL = "tests/test_pseudo_labels.py"

MUTATIONS = [
    # ---- nvsm_jax/nvsm/rounds.py: EM rounds, sources, training set
    Mutation(
        name="mstep_without_pseudo_labels",
        file="nvsm_jax/nvsm/rounds.py",
        old="data = training_set(labelled, unlabelled, pl, config.labelled_min_fraction)",
        new="data = labelled",
        tests=(f"{_SS}::test_each_m_step_trains_on_the_anchors_and_the_pseudo_labels_so_far",),
        kind="dropped term"),
    Mutation(
        name="run_keeps_pseudo_labelled_as_candidates",
        file="nvsm_jax/nvsm/rounds.py",
        old="candidates[pl.index] = False",
        new="candidates[pl.index] = True",
        tests=(f"{_SS}::test_tiny_em_rounds_on_8_devices",),
        kind="inverted mask"),
    Mutation(
        name="estep_ignores_candidates",
        file="nvsm_jax/nvsm/estep.py",
        old="round_index=round_index, candidates=candidates)",
        new="round_index=round_index)",
        tests=(f"{_SS}::test_novel_views_only_moves_a_look_alike_off_the_pseudo_source_pose",),
        kind="dropped term"),
    Mutation(
        name="training_set_floors_anchor_repeats",
        file="nvsm_jax/nvsm/rounds.py",
        old="reps = max(1, int(np.ceil(want / len(labelled))))",
        new="reps = max(1, int(want / len(labelled)))",
        tests=(f"{_SS}::test_training_set_repeats_the_anchors_to_their_minimum_fraction",),
        kind="off by one"),
    Mutation(
        name="round_sources_mark_pseudo_labels_labelled",
        file="nvsm_jax/nvsm/estep.py",
        old="is_labelled=np.concatenate([np.ones(len(labelled), bool), np.zeros(len(pl), bool)]),",
        new="is_labelled=np.concatenate([np.ones(len(labelled), bool), np.ones(len(pl), bool)]),",
        tests=(f"{_SS}::test_round_sources_are_the_anchors_then_the_pseudo_labels_then_their_mirrors",),
        kind="inverted mask"),
    Mutation(
        name="mirrored_sources_flip_rows",
        file="nvsm_jax/nvsm/estep.py",
        old="flipped = np.ascontiguousarray(images[:, :, ::-1])",
        new="flipped = np.ascontiguousarray(images[:, ::-1])",
        tests=(f"{_SS}::test_round_sources_are_the_anchors_then_the_pseudo_labels_then_their_mirrors",),
        kind="wrong axis"),
    Mutation(
        name="view_source_ids_tiled",
        file="nvsm_jax/nvsm/estep.py",
        old="np.repeat(np.asarray(sources.ids), k)",
        new="np.tile(np.asarray(sources.ids), k)",
        tests=(f"{_SS}::test_holdout_check_never_uses_an_anchors_own_views_and_judges_by_its_label",),
        kind="wrong axis"),
    Mutation(
        name="source_mask_checks_pseudo_rows",
        file="nvsm_jax/nvsm/estep.py",
        old="valid = valid & (inside | ~labelled)",
        new="valid = valid & (inside | labelled)",
        tests=(f"{_SS}::test_source_vertex_mask_keeps_visible_front_facing_object_vertices",),
        kind="inverted mask"),
    Mutation(
        name="synthesis_focal_not_at_map_stride",
        file="nvsm_jax/nvsm/estep.py",
        old="jnp.asarray(targets[idx]), focal / stride,",
        new="jnp.asarray(targets[idx]), focal,",
        tests=(f"{_SS}::test_novel_views_only_moves_a_look_alike_off_the_pseudo_source_pose",),
        kind="dropped term"),
    # ---- nvsm_jax/nvsm/synthesis.py
    Mutation(
        name="synthesis_no_renormalisation",
        file="nvsm_jax/nvsm/synthesis.py",
        old="feats = out[..., :-1] / jnp.maximum(weight, 1e-6)[..., None]",
        new="feats = out[..., :-1]",
        tests=(f"{_SYN}::test_partly_seen_faces_average_only_their_seen_vertices",),
        kind="dropped term"),
    Mutation(
        name="synthesis_unseen_vertices_contribute",
        file="nvsm_jax/nvsm/synthesis.py",
        old="[vertex_feats * valid[:, None], valid[:, None]]",
        new="[vertex_feats, valid[:, None]]",
        tests=(f"{_SYN}::test_partly_seen_faces_average_only_their_seen_vertices",),
        kind="dropped term"),
    Mutation(
        name="synthesis_mask_ignores_min_weight",
        file="nvsm_jax/nvsm/synthesis.py",
        old="mask = (frags.face_id >= 0) & (weight >= min_weight)",
        new="mask = (frags.face_id >= 0) & (weight > 0)",
        tests=(f"{_SYN}::test_partly_seen_faces_average_only_their_seen_vertices",),
        kind="constant"),
    # ---- nvsm_jax/nvsm/matching.py
    Mutation(
        name="matching_sum_not_mean",
        file="nvsm_jax/nvsm/matching.py",
        old="scale = jnp.where(count > 0, 1.0 / jnp.maximum(count, 1.0), 0.0)",
        new="scale = jnp.where(count > 0, 1.0, 0.0)",
        tests=(f"{_MATCH}::test_each_image_finds_the_view_it_was_made_from",),
        kind="dropped term"),
    Mutation(
        name="matching_mask_ignored",
        file="nvsm_jax/nvsm/matching.py",
        old="mask = syn_mask.astype(jnp.float32)",
        new="mask = jnp.ones(syn_mask.shape, jnp.float32)",
        tests=(f"{_MATCH}::test_each_image_finds_the_view_it_was_made_from",),
        kind="inverted mask"),
    Mutation(
        name="matching_raw_images_not_normalised",
        file="nvsm_jax/nvsm/matching.py",
        old="b = normalize(block.astype(jnp.float32)).reshape(chunk, -1)",
        new="b = block.astype(jnp.float32).reshape(chunk, -1)",
        tests=(f"{_MATCH}::test_each_image_finds_the_view_it_was_made_from",),
        kind="skipped step"),
    Mutation(
        name="normalize_images_skipped",
        file="nvsm_jax/nvsm/matching.py",
        old="return normalize(image_feats.astype(jnp.float32))",
        new="return image_feats.astype(jnp.float32)",
        tests=(f"{_MATCH}::test_each_image_finds_the_view_it_was_made_from",),
        kind="skipped step"),
    # ---- nvsm_jax/nvsm/pseudo_labels.py
    Mutation(
        name="select_margin_against_near_views",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="far = np.where(dist > selection.margin_angle, scores, -np.inf)",
        new="far = np.where(dist < selection.margin_angle, scores, -np.inf)",
        tests=(f"{_PL}::test_select_on_a_table_across_the_azimuth_seam",),
        kind="inverted mask"),
    Mutation(
        name="select_threshold_exclusive",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="(best_score >= selection.threshold)",
        new="(best_score > selection.threshold)",
        tests=(f"{_PL}::test_select_on_a_table_across_the_azimuth_seam",),
        kind="off by one"),
    Mutation(
        name="select_worst_first",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="idx = idx[np.argsort(-best_score[idx], kind=\"stable\")]",
        new="idx = idx[np.argsort(best_score[idx], kind=\"stable\")]",
        tests=(f"{_PL}::test_select_on_a_table_across_the_azimuth_seam",),
        kind="sign"),
    Mutation(
        name="select_ignores_candidates",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="ok = (candidates & (best_score",
        new="ok = ((best_score",
        tests=(f"{_PL}::test_select_on_a_table_across_the_azimuth_seam",),
        kind="dropped term"),
    Mutation(
        name="novel_views_drop_labelled_own_pose",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="own.reshape(-1)[None, :] & ~labelled[:, None]",
        new="own.reshape(-1)[None, :] & labelled[:, None]",
        tests=(f"{_PL}::test_novel_views_drop_only_the_own_pose_of_pseudo_labelled_sources",),
        kind="inverted mask"),
    Mutation(
        name="symmetric_mirror_keeps_theta",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="np.stack([-a, e, -t, d], -1)",
        new="np.stack([-a, e, t, d], -1)",
        tests=(f"{_PL}::test_symmetric_poses_are_the_object_turned_half_way_and_mirrored",),
        kind="sign"),
    Mutation(
        name="flip_margin_counts_the_best_views_neighbours",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="rival = near_sym & ~own",
        new="rival = near_sym | own",
        tests=(f"{_PL}::test_flip_margins_compare_with_the_symmetric_views_only",),
        kind="inverted mask"),
    Mutation(
        name="per_source_cap_ignores_labelled_flag",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="source = view_source[view] * 2 + view_labelled[view]",
        new="source = view_source[view] * 2",
        tests=(f"{_PL}::test_select_caps_per_source_and_per_sector_in_score_order",),
        kind="dropped term"),
    Mutation(
        name="caps_skip_sector_count",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="per_sector[c] = per_sector.get(c, 0) + 1",
        new="per_sector[c] = per_sector.get(c, 0)",
        tests=(f"{_PL}::test_select_caps_per_source_and_per_sector_in_score_order",),
        kind="skipped step"),
    Mutation(
        name="oracle_keeps_every_wrong_pose",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="true.astype(np.float64)) > FLIP_ANGLE",
        new="true.astype(np.float64)) > 0.0",
        tests=(f"{_PL}::test_oracle_labels_swap_in_the_hidden_poses_as_named",),
        kind="constant"),
    Mutation(
        name="quality_sectors_from_pseudo_poses",
        file="nvsm_jax/nvsm/pseudo_labels.py",
        old="np.unique(geometry.azimuth_sector(true_poses[:, 0],",
        new="np.unique(geometry.azimuth_sector(poses[:, 0],",
        tests=(f"{_PL}::test_label_quality_by_hand",),
        kind="swapped args"),
]
