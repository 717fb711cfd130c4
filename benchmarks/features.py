"""Cross-instance pose retrieval with untrained features: how much pose a backbone reads.

    python -m benchmarks.features --data data/synthetic \\
        --backbones pixels,scratch,efficientnet_lite0 --json runs/bench/features.json

For every category under ``DATA/train`` (references: the first ``--references``
L0 training images) and every occlusion level of ``DATA/test`` (queries: the
first ``--queries`` of each level), each query takes the pose of the reference
whose feature map matches it best, with NVSM's matching score (the mean cosine
over the reference's object pixels, :func:`nvsm_jax.nvsm.matching.match_scores`).
No pose label is used to build the features. One JSON record per backbone,
tap stride, category and level: ``retrieval_acc_pi_6`` (percent within 30 deg,
geodesic), ``median_err_deg``, ``flip_rate`` (percent more than 150 deg off)
and ``images_per_s`` (feature extraction).

Backbones: ``pixels`` (the ImageNet-normalised image, area-averaged to the map
size), ``scratch`` (EfficientNet-Lite0 randomly initialised, batch norm in
inference mode), ``efficientnet_lite0`` / ``_lite1`` / ``_lite2`` (the packaged
ImageNet weights). Taps: the encoder's stride-4 / 8 / 16 maps (``--strides``).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine_load, print_table, write_json
from nvsm_jax import evaluation
from nvsm_jax.nvsm import matching
from nvsm_jax.data import loaders
from nvsm_jax.models import backbone, efficientnet, weights

TAP_INDEX = {4: 0, 8: 1, 16: 2, 32: 3}


def _categories(train_root):
    """The categories of a training root: its unoccluded subsets (``annotations/car``)."""
    if not os.path.isdir(os.path.join(train_root, "annotations")):
        raise SystemExit(f"{train_root}: no annotations/ folder (expected a root as "
                         "make_synthetic writes it)")
    cats = [s for s in loaders.subset_names(train_root) if "FGL" not in s]
    if not cats:
        raise SystemExit(f"{train_root}: no category folders under annotations/")
    return cats


def _area_downsample(x, stride):
    """[N, H, W, C] -> [N, H/s, W/s, C] block means (H, W multiples of s)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // stride, stride, w // stride, stride, c).mean(axis=(2, 4))


def make_extractor(name: str, stride: int, depthwise: str = "auto"):
    """images uint8 [B, H, W, 3] -> feature maps [B, H/stride, W/stride, C] (jitted)."""
    if name == "pixels":
        return jax.jit(lambda im: _area_downsample(backbone.preprocess(im), stride))
    variant = "efficientnet_lite0" if name == "scratch" else name
    if variant not in efficientnet.VARIANTS:
        raise SystemExit(f"unknown backbone {name!r}: pixels, scratch or {sorted(efficientnet.VARIANTS)}")
    net = backbone.make_encoder(variant, norm="frozen_batch", depthwise=depthwise)
    x0 = jnp.zeros((1, 64, 64, 3), jnp.float32)
    variables = net.init(jax.random.key(0), x0, train=False)
    if name != "scratch":
        params, model_state = weights.pretrained_encoder(variant, "imagenet")
        variables = {"params": params["encoder"], "batch_stats": model_state["batch_stats"]["encoder"]}
    tap = TAP_INDEX[stride]
    return jax.jit(lambda im: net.apply(variables, backbone.preprocess(im), train=False)[tap])


def extract(fn, images, batch: int = 16):
    """Feature maps of all images (batched; the last batch padded) and images/s."""
    out = []
    fn(images[:batch]).block_until_ready()                       # compile
    t = time.perf_counter()
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
        out.append(np.asarray(fn(chunk))[:batch - pad])
    return np.concatenate(out), len(images) / (time.perf_counter() - t)


def cell_masks(object_mask, stride):
    """[N, H, W] bool -> [N, H/s, W/s] bool: cells at least half covered by the object."""
    m = object_mask.astype(np.float32)[..., None]
    return _area_downsample(m, stride)[..., 0] >= 0.5


def retrieve(ref_feats, ref_masks, ref_poses, query_feats):
    """Pose of each query's best reference. -> [Nq, 4]."""
    scores = np.asarray(matching.match_scores(jnp.asarray(ref_feats), jnp.asarray(ref_masks),
                                              jnp.asarray(query_feats)))      # [Nr, Nq]
    return ref_poses[np.argmax(scores, axis=0)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="root with train/ and test/")
    ap.add_argument("--backbones", default="pixels,scratch,efficientnet_lite0")
    ap.add_argument("--strides", default="8", help="tap strides, e.g. 4,8,16")
    ap.add_argument("--references", type=int, default=600)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--levels", default="L0,L1,L2,L3")
    ap.add_argument("--categories", default="", help="default: every category in DATA/train")
    ap.add_argument("--depthwise", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    train_root, test_root = os.path.join(args.data, "train"), os.path.join(args.data, "test")
    cats = args.categories.split(",") if args.categories else _categories(train_root)
    records = []
    machine = {"name": "machine", "load_before": machine_load()}
    for cat in cats:
        refs = loaders.load_pose_set(train_root, cat, "L0", limit=args.references)
        if refs.object_mask is None:
            raise SystemExit(f"{train_root}: {cat} has no object masks")
        queries = {lvl: loaders.load_pose_set(test_root, cat, lvl, limit=args.queries)
                   for lvl in args.levels.split(",")}
        for name in args.backbones.split(","):
            for stride in (int(s) for s in args.strides.split(",")):
                fn = make_extractor(name, stride, args.depthwise)
                ref_feats, ips = extract(fn, refs.images)
                ref_masks = cell_masks(refs.object_mask, stride)
                for lvl, q in queries.items():
                    q_feats, _ = extract(fn, q.images)
                    pred = retrieve(ref_feats, ref_masks, refs.poses, q_feats)
                    err = evaluation.rotation_errors(pred, q.poses)
                    records.append({
                        "name": "pose_retrieval", "backbone": name, "category": cat,
                        "stride": stride, "level": lvl, "references": len(refs),
                        "queries": len(q), "retrieval_acc_pi_6": evaluation.accuracy_at(err),
                        "median_err_deg": evaluation.median_error_deg(err),
                        "flip_rate": float(100.0 * np.mean(err > np.radians(150.0))),
                        "images_per_s": ips})
                print_table(records[-len(queries):])
    print_table(records)
    if args.json:
        machine["load_after"] = machine_load()
        write_json(args.json, [machine] + records)


if __name__ == "__main__":
    main()
