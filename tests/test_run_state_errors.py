"""Damaged run state names its file and says how to recover; bad meshes stop at the
rasteriser's door."""

import json

import numpy as np
import pytest

import rasterizer
from nvsm_jax.nvsm import experiment, rounds
from nvsm_jax import training


def test_truncated_progress_and_rows_name_the_file(tmp_path):
    (tmp_path / "progress.json").write_text('{"round": 2, "st')
    with pytest.raises(ValueError, match=r"progress\.json: the record of the last finished"
                                         r".*delete it to restart"):
        rounds.load_progress(tmp_path)
    (tmp_path / "progress.json").write_text('[1, 2]')
    with pytest.raises(ValueError, match=r"progress\.json: expected"):
        rounds.load_progress(tmp_path)
    (tmp_path / "progress.json").write_text(json.dumps({"round": 1, "step": 4}))
    assert rounds.load_progress(tmp_path) == {"round": 1, "step": 4}
    cell = tmp_path / "nemo_car_7"
    cell.mkdir()
    (cell / "rows.json").write_text('[{"method": "ne')
    with pytest.raises(ValueError, match=r"rows\.json: the record of the cell's results is damaged"):
        experiment._load_rows(str(cell))


def test_missing_and_damaged_checkpoints_name_the_step(tmp_path):
    state = {"w": np.arange(6, dtype=np.float32)}
    ckpt = training.Checkpointer(tmp_path / "ck", save_every=1)
    ckpt.save(3, state)
    ckpt.wait()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 \(saved steps: \[3\]\)"):
        ckpt.restore(state, step=5)
    np.testing.assert_array_equal(ckpt.restore(state, step=3)["w"], state["w"])
    with pytest.raises(ValueError, match=r"ck/3: cannot restore"):   # another model's shapes
        ckpt.restore({"w": np.zeros(6, np.float32), "b": np.zeros(2, np.float32)}, step=3)
    ckpt.close()


@pytest.mark.parametrize("faces,message", [
    (np.zeros((0, 3), np.int32), "faces is empty"),
    (np.array([[0, 1, 9]], np.int32), r"span \[0, 9\] but there are 4 vertices"),
    (np.array([[0, -1, 2]], np.int32), r"span \[-1, 2\]"),
    (np.zeros((2, 2), np.int32), r"faces must be \[F, 3\]"),
])
def test_rasterizer_rejects_bad_faces(faces, message):
    verts = np.array([[1, 1, 5], [6, 1, 5], [1, 6, 5], [6, 6, 5]], np.float32)
    with pytest.raises(ValueError, match=message):
        rasterizer.rasterize(verts, faces, (8, 8))
    with pytest.raises(ValueError, match=r"verts must be"):
        rasterizer.rasterize(verts[:, :2], np.array([[0, 1, 2]]), (8, 8))
