"""Mutations of the faults area (see tests/mutations/__init__.py).

The checks that keep bad input and damaged run state from passing silently
(issue 30): config ranges, the non-finite stop, the weights cache, the workdir
lock, the run-state write order, the data fingerprints of finished cells, and
the mesh, principal-point, image and annotation checks. The test files are small
(under 10 s each), so each mutation names its whole file.
"""

from tests.mutations import Mutation

_CFG = "tests/test_config_checks.py::test_each_impossible_value_is_refused"
_SYNTH_FLAGS = "tests/test_config_checks.py::test_make_synthetic_refuses_bad_flags_before_writing"
_TRAIN = "tests/test_faults_training.py"
_DATA = "tests/test_faults_data.py"
_RESULTS = "tests/test_faults_results.py"
_STATE = "tests/test_faults_run_state.py"

MUTATIONS = [
    # ----------------------------------------------------------------- config ranges
    Mutation(
        name="faults_rounds_minus_one_allowed",
        file="nvsm_jax/nvsm/config_checks.py",
        old='ck.integer("num_rounds", 0, note="; 0 = round 0 only")',
        new='ck.integer("num_rounds", -1, note="; 0 = round 0 only")',
        tests=(_CFG,), kind="off by one"),
    Mutation(
        name="faults_bool_counts_as_int",
        file="nvsm_jax/config_checks.py",
        old="return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))",
        new="return isinstance(value, (int, np.integer))",
        tests=(_CFG,), kind="dropped term"),
    Mutation(
        name="faults_open_bound_closed",
        file="nvsm_jax/config_checks.py",
        old="return ((low is None or (value > low if low_open else value >= low))",
        new="return ((low is None or (value >= low if low_open else value >= low))",
        tests=(_CFG,), kind="off by one"),
    Mutation(
        name="faults_synthetic_flag_not_named",
        file="experiments/make_synthetic.py",
        old="            cfg[key], given[key] = val, flag",
        new="            cfg[key] = val",
        tests=(_SYNTH_FLAGS,), kind="dropped term"),
    # ----------------------------------------------------------------- non-finite stop, metrics
    Mutation(
        name="faults_nan_step_overwritten",
        file="nvsm_jax/training.py",
        old="jnp.where((carry[:2] < 0) & bad, step, carry[:2])",
        new="jnp.where(bad, step, carry[:2])",
        tests=(_TRAIN,), kind="dropped term"),
    Mutation(
        name="faults_nan_not_checked_before_save",
        file="nvsm_jax/training.py",
        old="            stop_if_diverged()\n            try:",
        new="            try:",
        tests=(_TRAIN,), kind="skipped step"),
    Mutation(
        name="faults_nonfinite_state_saved",
        file="nvsm_jax/training.py",
        old="        if leaf is not None:\n            err = NonFiniteError(",
        new="        if False:\n            err = NonFiniteError(",
        tests=(_TRAIN,), kind="skipped step"),
    Mutation(
        name="faults_replayed_metric_lines_kept",
        file="nvsm_jax/training.py",
        old="    if start < end:\n        writer.discard_after(start)\n",
        new="",
        tests=(_TRAIN,), kind="skipped step"),
    Mutation(
        name="faults_cache_digest_unchecked",
        file="nvsm_jax/models/weights.py",
        old='if record.get("arrays_sha256") != _arrays_sha256(flat):',
        new="if False:",
        tests=(_TRAIN,), kind="skipped step"),
    # ----------------------------------------------------------------- geometry and data
    Mutation(
        name="faults_camera_inside_mesh_passes",
        file="nvsm_jax/meshes.py",
        old="    if inside.mean() > 0.5:",
        new="    if inside.mean() > 1.5:",
        tests=(_DATA,), kind="constant"),
    Mutation(
        name="faults_principal_point_unchecked",
        file="nvsm_jax/data/loaders.py",
        old='            _check_principal(ann["principal"], img.shape[:2], ann_path, img_path)\n',
        new="            pass\n",
        tests=(_DATA,), kind="skipped step"),
    Mutation(
        name="faults_16_bit_not_scaled",
        file="nvsm_jax/data/loaders.py",
        old="grey = np.round(np.asarray(im, np.float64) / 257.0)",
        new="grey = np.round(np.asarray(im, np.float64) / 1.0)",
        tests=(_DATA,), kind="constant"),
    Mutation(
        name="faults_boolean_annotation_read",
        file="nvsm_jax/data/loaders.py",
        old='    if raw.dtype.kind == "b":',
        new="    if False:",
        tests=(_DATA,), kind="skipped step"),
    # ----------------------------------------------------------------- results match inputs
    Mutation(
        name="faults_other_test_set_not_reevaluated",
        file="nvsm_jax/nvsm/experiment.py",
        old='    if stored.get("test") != data["test"]:',
        new="    if False:",
        tests=(_RESULTS,), kind="skipped step"),
    Mutation(
        name="faults_failed_run_blocks_rerun",
        file="nvsm_jax/nvsm/experiment.py",
        old="training.save_config(config, workdir, has_work=train.holds_work(workdir))",
        new="training.save_config(config, workdir, has_work=True)",
        tests=(_RESULTS,), kind="constant"),
    Mutation(
        name="faults_evaluate_accepts_nan_model",
        file="nvsm_jax/nemo/evaluate.py",
        old='    leaf = training.nonfinite_leaf({"variables": nemo.variables, "memory": nemo.memory})',
        new="    leaf = None",
        tests=(_RESULTS,), kind="skipped step"),
    Mutation(
        name="faults_pairs_mix_test_sets",
        file="nvsm_jax/results.py",
        old="        if m != method or other is None or not _same_test_sets(c, other):",
        new="        if m != method or other is None:",
        tests=(_RESULTS,), kind="dropped term"),
    # ----------------------------------------------------------------- lock and run state
    Mutation(
        name="faults_live_lock_taken_over",
        file="nvsm_jax/workdir_lock.py",
        old='        if same_host and record["pid"] != os.getpid() and _alive(record):',
        new="        if False:",
        tests=(_STATE,), kind="dropped term"),
    Mutation(
        name="faults_stale_lock_kept",
        file="nvsm_jax/workdir_lock.py",
        old="    except ProcessLookupError:\n        return False",
        new="    except ProcessLookupError:\n        return True",
        tests=(_STATE,), kind="constant"),
    Mutation(
        name="faults_round_log_off_by_one",
        file="nvsm_jax/nvsm/run_state.py",
        old='if entry["round"] > last:',
        new='if entry["round"] > last + 1:',
        tests=(_STATE,), kind="off by one"),
    Mutation(
        name="faults_full_disk_unnamed",
        file="nvsm_jax/workdir_lock.py",
        old="if err.errno in _FULL_DISK and not err.filename:",
        new="if err.errno in _FULL_DISK and False:",
        tests=(_STATE,), kind="skipped step"),
    Mutation(
        name="faults_other_host_lock_never_stale",
        file="nvsm_jax/workdir_lock.py",
        old="        if not same_host and _age(path) < STALE_SECONDS:",
        new="        if not same_host:",
        tests=(_STATE,), kind="dropped term"),
    Mutation(
        name="faults_stopped_run_resumes_rounds",
        file="nvsm_jax/nvsm/run_state.py",
        old="""    if done and done.get("stopped"):        # ended early: a rerun runs no further round
        next_round = config.num_rounds + 1""",
        new="",
        tests=(_STATE,), kind="skipped step"),
    Mutation(
        name="faults_mesh_box_check_off",
        file="nvsm_jax/meshes.py",
        old="    inside = np.all((centre >= lo) & (centre <= hi), axis=-1)",
        new="    inside = np.all((centre >= lo) | (centre <= hi), axis=-1)",
        tests=(_DATA,), kind="inverted mask"),
]

