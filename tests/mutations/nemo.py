"""Mutations of the nemo area (see tests/mutations/__init__.py)."""

from tests.mutations import Mutation

_TRAIN = "tests/test_training.py::test_train_step_updates_the_memory_by_hand_and_lowers_the_coke_loss"
_COKE_HAND = "tests/test_losses.py::test_coke_matches_hand_computation_with_neighbours_and_invisible"
_COKE_GRAD = ("tests/test_losses.py::"
              "test_coke_gradient_matches_finite_differences_and_the_memories_get_none")
_FIFO = "tests/test_features.py::test_memory_momentum_and_clutter_fifo_by_hand"
_NEMO_LOSS = "tests/test_pose_solver.py::test_nemo_loss_and_clutter_scores_by_hand"
_RECOVER = "tests/test_pose_solver.py::test_refinement_recovers_a_perturbed_pose_within_one_degree"
_GRID = "tests/test_pose_solver.py::test_grid_search_finds_the_coarse_pose"

MUTATIONS = [
    # ---------------------------------------------------------------- nvsm_jax/nemo/train.py
    Mutation(
        name="nemo_grad_ascent",
        file="nvsm_jax/nemo/train.py",
        old="state = state.apply_gradients(grads=grads)",
        new="state = state.apply_gradients(grads=jax.tree_util.tree_map(lambda g: -g, grads))",
        tests=(_TRAIN,),
        kind="sign"),
    Mutation(
        name="nemo_vertex_memory_not_updated",
        file="nvsm_jax/nemo/train.py",
        old="memory = feat.enqueue_clutter(memory._replace(vertex=vertex),",
        new="memory = feat.enqueue_clutter(memory,",
        tests=(_TRAIN,),
        kind="skipped step"),
    Mutation(
        name="nemo_memory_momentum_inverted",
        file="nvsm_jax/nemo/train.py",
        old="vf.weights, lc.momentum)",
        new="vf.weights, 1.0 - lc.momentum)",
        tests=(_TRAIN,),
        kind="constant"),
    Mutation(
        name="nemo_memory_without_view_weights",
        file="nvsm_jax/nemo/train.py",
        old="vf.weights, lc.momentum)",
        new="vf.visible, lc.momentum)",
        tests=(_TRAIN,),
        kind="dropped term"),
    Mutation(
        name="nemo_clutter_sampled_on_the_object",
        file="nvsm_jax/nemo/train.py",
        old="clutter = feat.sample_clutter(k_clutter, fmap, vf.silhouette, lc.clutter_per_image)",
        new="clutter = feat.sample_clutter(k_clutter, fmap, ~vf.silhouette, lc.clutter_per_image)",
        tests=(_TRAIN,),
        kind="inverted mask"),
    # ---------------------------------------------------------------- nvsm_jax/nemo/losses.py
    Mutation(
        name="coke_clutter_shift_sign",
        file="nvsm_jax/nemo/losses.py",
        old="/ temperature + np.log(clutter_weight)",
        new="/ temperature - np.log(clutter_weight)",
        tests=(_COKE_HAND,),
        kind="sign"),
    Mutation(
        name="coke_neighbours_not_removed",
        file="nvsm_jax/nemo/losses.py",
        old="return (_squared_distances(rows, xy) <= radius ** 2) & (ids[..., :, None] != jnp.arange(v))",
        new="return (_squared_distances(rows, xy) > radius ** 2) & (ids[..., :, None] != jnp.arange(v))",
        tests=(_COKE_HAND,),
        kind="inverted mask"),
    Mutation(
        name="coke_target_stop_gradient",
        file="nvsm_jax/nemo/losses.py",
        old="ce = lse - target",
        new="ce = lse - jax.lax.stop_gradient(target)",
        tests=(_COKE_GRAD,),
        kind="stop_gradient"),
    Mutation(
        name="coke_vertex_memory_gets_gradient",
        file="nvsm_jax/nemo/losses.py",
        old="vm = jax.lax.stop_gradient(vertex_memory)",
        new="vm = vertex_memory",
        tests=(_COKE_GRAD,),
        kind="stop_gradient"),
    # ---------------------------------------------------------------- nvsm_jax/nemo/features.py
    Mutation(
        name="memory_momentum_swapped",
        file="nvsm_jax/nemo/features.py",
        old="momentum * vertex_memory + (1.0 - momentum) * batch",
        new="(1.0 - momentum) * vertex_memory + momentum * batch",
        tests=(_FIFO,),
        kind="swapped args"),
    Mutation(
        name="clutter_ring_pointer_off_by_one",
        file="nvsm_jax/nemo/features.py",
        old="clutter_ptr=((memory.clutter_ptr + new.shape[0]) % k)",
        new="clutter_ptr=((memory.clutter_ptr + new.shape[0] - 1) % k)",
        tests=(_FIFO,),
        kind="off by one"),
    Mutation(
        name="sample_clutter_mask_inverted",
        file="nvsm_jax/nemo/features.py",
        old="bg = (m < 0.5).reshape(b, h * w)",
        new="bg = (m >= 0.5).reshape(b, h * w)",
        tests=("tests/test_features.py::test_sample_clutter_avoids_the_object",),
        kind="inverted mask"),
    Mutation(
        name="clutter_prototype_wrong_axis",
        file="nvsm_jax/nemo/features.py",
        old="return l2_normalize(jnp.mean(clutter, axis=0))",
        new="return l2_normalize(jnp.mean(clutter, axis=-1))",
        tests=("tests/test_features.py::test_clutter_prototype_is_the_normalised_mean_row_by_hand",),
        kind="wrong axis"),
    # ---------------------------------------------------------------- nvsm_jax/nemo/pose_solver.py
    Mutation(
        name="solver_loss_without_clutter",
        file="nvsm_jax/nemo/pose_solver.py",
        old="best = jnp.maximum(s_obj, s_clutter)",
        new="best = s_obj",
        tests=(_NEMO_LOSS,),
        kind="dropped term"),
    Mutation(
        name="solver_loss_without_clutter_mean",
        file="nvsm_jax/nemo/pose_solver.py",
        old="return 1.0 - (jnp.mean(best, axis=-1) - jnp.mean(s_clutter, axis=-1))",
        new="return 1.0 - jnp.mean(best, axis=-1)",
        tests=(_NEMO_LOSS,),
        kind="dropped term"),
    Mutation(
        name="solver_clutter_scores_not_normalised",
        file="nvsm_jax/nemo/pose_solver.py",
        old="fn = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-12)",
        new="fn = f",
        tests=(_NEMO_LOSS,),
        kind="dropped term"),
    Mutation(
        name="refine_gradient_ascent",
        file="nvsm_jax/nemo/pose_solver.py",
        old="upd, opt = tx.update(g, opt, p)",
        new="upd, opt = tx.update(-g, opt, p)",
        tests=(_RECOVER,),
        kind="sign"),
    Mutation(
        name="refine_theta_frozen",
        file="nvsm_jax/nemo/pose_solver.py",
        old="mask = jnp.array([1.0, 1.0, 1.0, 1.0 if solver_cfg.refine_distance else 0.0])",
        new="mask = jnp.array([1.0, 1.0, 0.0, 1.0 if solver_cfg.refine_distance else 0.0])",
        tests=(_RECOVER,),
        kind="constant"),
    Mutation(
        name="solve_starts_from_the_worst_grid_pose",
        file="nvsm_jax/nemo/pose_solver.py",
        old="_, idx = jax.lax.top_k(-losses, k)",
        new="_, idx = jax.lax.top_k(losses, k)",
        tests=(_GRID,),
        kind="sign"),
    Mutation(
        name="solve_keeps_the_worst_hypothesis",
        file="nvsm_jax/nemo/pose_solver.py",
        old="best = jnp.argmin(final, axis=1)",
        new="best = jnp.argmax(final, axis=1)",
        tests=(_GRID,),
        kind="sign"),
]
