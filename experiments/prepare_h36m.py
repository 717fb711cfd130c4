"""Official Human3.6M archives -> the MCSS layout (see :mod:`nvsm_jax.mcss.h36m_archives`).

    nvsm-prepare-h36m --root /path/to/h36m --out data/h36m \\
        --subjects S1,S5,S6,S7,S8,S9,S11 --size 64 --frame_step 5
    nvsm-prepare-h36m --root /path/to/h36m --out data/h36m

ROOT holds the extracted subject archives: S1/MyPoseFeatures/{D3_Positions,
D3_Positions_mono,D2_Positions}/*.cdf and S1/Videos/*.mp4. Needs
`pip install cdflib imageio-ffmpeg`. Finished actions are left as they are, so an
interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
import logging

from nvsm_jax import parallel
from nvsm_jax.mcss.h36m_archives import CAMERA_IDS, SUBJECTS, PrepareOptions, prepare_h36m

from . import ArgumentParser


def _list(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--root", required=True, help="folder with S1/, S5/, ... (extracted archives)")
    p.add_argument("--out", required=True)
    p.add_argument("--subjects", default=",".join(SUBJECTS))
    p.add_argument("--actions", default="", help="comma-separated; 'Walking' also selects "
                   "'Walking 1', ... (default: every action)")
    p.add_argument("--size", type=int, default=64, help="crop side, pixels")
    p.add_argument("--frame_step", type=int, default=5, help="keep every k-th frame (50 fps / k)")
    p.add_argument("--margin", type=float, default=0.2,
                   help="crop side = 2 (1 + margin) x the 2-D skeleton's half extent")
    p.add_argument("--cameras", default=",".join(CAMERA_IDS), help="camera ids, in view order")
    p.add_argument("--min_cameras", type=int, default=None,
                   help="skip an action with fewer usable cameras (default: all of --cameras)")
    p.add_argument("--max_frame_gap", type=int, default=10,
                   help="frames a video or feature file may lack against D3_Positions")
    p.add_argument("--intrinsics", default="", help="JSON file {camera id: [fx, fy, cx, cy]} "
                   "(pixels), for views without D2_Positions")
    p.add_argument("--strict", action="store_true", help="fail on bad input instead of skipping")
    a = p.parse_args(argv)
    p.run(_run, a, a)


def _run(a):
    logging.basicConfig(level=logging.INFO)
    parallel.quiet_backend_probe_logs()
    intrinsics = None
    if a.intrinsics:
        with open(a.intrinsics) as f:
            intrinsics = json.load(f)
    options = PrepareOptions(size=a.size, frame_step=a.frame_step, margin=a.margin,
                             cameras=_list(a.cameras), min_cameras=a.min_cameras,
                             max_frame_gap=a.max_frame_gap, intrinsics=intrinsics,
                             skip_bad=not a.strict)
    counts = prepare_h36m(a.root, a.out, _list(a.subjects), _list(a.actions) or None,
                          options=options)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
