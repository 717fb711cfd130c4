"""The mutation list of ``make mutants`` stays applicable: every entry's text occurs
exactly once in its file, and the tests it names exist (a stale entry would
otherwise only show up in the long mutation run)."""

from pathlib import Path

from tests.mutations import KINDS, MUTATIONS

ROOT = Path(__file__).resolve().parent.parent


def test_every_mutation_applies_once_and_names_existing_tests():
    assert len(MUTATIONS) >= 25
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    problems = []
    for m in MUTATIONS:
        text = (ROOT / m.file).read_text() if (ROOT / m.file).is_file() else None
        if text is None:
            problems.append(f"{m.name}: no file {m.file}")
            continue
        if text.count(m.old) != 1:
            problems.append(f"{m.name}: text occurs {text.count(m.old)} times in {m.file}")
        for t in m.tests:
            path, _, name = t.partition("::")
            source = (ROOT / path).read_text() if (ROOT / path).is_file() else ""
            if not source or (name and f"def {name.split('[')[0]}(" not in source):
                problems.append(f"{m.name}: no test {t}")
    assert not problems, "\n".join(problems)
    assert {m.kind for m in MUTATIONS} <= set(KINDS)
    # every module the issue lists has at least one mutation
    files = {m.file for m in MUTATIONS}
    for must in ("nvsm_jax/nemo/train.py", "nvsm_jax/nemo/losses.py", "nvsm_jax/nemo/features.py",
                 "nvsm_jax/nemo/pose_solver.py", "nvsm_jax/nvsm/rounds.py",
                 "nvsm_jax/nvsm/synthesis.py", "nvsm_jax/nvsm/matching.py", "nvsm_jax/nvsm/pseudo_labels.py",
                 "nvsm_jax/baselines/classifier.py", "nvsm_jax/baselines/pretrain.py", "nvsm_jax/mcss/train.py",
                 "nvsm_jax/mcss/losses.py", "nvsm_jax/figures.py", "rasterizer/hard.py",
                 "rasterizer/soft.py", "nvsm_jax/geometry.py", "nvsm_jax/data/pipeline.py",
                 "nvsm_jax/evaluation.py", "nvsm_jax/nvsm/config_checks.py",
                 "nvsm_jax/nemo/config_checks.py", "nvsm_jax/nvsm/estep.py"):
        assert must in files, must
