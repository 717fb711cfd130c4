"""torchvision ResNet-50 weights -> Flax variables of the ``resnet50`` preset.

The ``resnet50`` preset of :func:`nvsm_jax.models.backbone.make_feature_net`
uses BatchNorm with torchvision's parameter layout, so the conversion is exact:

* ``conv*.weight [O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]``;
* ``bn*.weight / bias`` -> ``params/.../scale / bias``;
  ``bn*.running_mean / running_var`` -> ``batch_stats/.../mean / var``;
* ``layerS.B.downsample.0`` / ``.1`` -> ``layerS_B/downsample_conv`` / ``downsample_bn``;
* ``fc.*`` and ``num_batches_tracked`` are dropped.

For fine-tuning with small batches use ``norm="frozen_batch"`` (running
statistics always; same variables). A GroupNorm variant cannot take these
statistics exactly (GroupNorm normalises per image); we do not convert to it.

Inputs: a ``.npz`` with the torchvision key names (no torch needed), a
``.pth``/``.pt`` when torch is importable, or an in-memory mapping. Nothing is
downloaded.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

__all__ = ["load_state_dict", "convert_resnet_state_dict", "merge_encoder_variables",
           "fake_resnet50_state_dict"]


def load_state_dict(path) -> dict[str, np.ndarray]:
    """Reads ``.npz`` (numpy) or ``.pth``/``.pt`` (needs torch) into name -> array."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError as err:
            raise ImportError(f"{path}: reading .pth needs torch; convert it to .npz with "
                              "np.savez(out, **{k: v.numpy() for k, v in sd.items()})") from err
        sd = torch.load(path, map_location="cpu")
        sd = sd.get("state_dict", sd)
        return {k.removeprefix("module."): v.detach().cpu().numpy() for k, v in sd.items()}
    raise ValueError(f"{path}: expected a .npz or .pth state dict")


_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")


def _target(key: str):
    """torchvision key -> (collection, path tuple, leaf) or None to skip."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    prefix: tuple[str, ...] = ()
    m = _BLOCK.match(key)
    if m:
        prefix = (f"layer{m.group(1)}_{m.group(2)}",)
        key = m.group(3)
    module, leaf = key.rsplit(".", 1)
    module = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(module, module)
    if module.startswith("conv") or module == "downsample_conv":
        if leaf != "weight":
            raise KeyError(f"unexpected conv parameter {key!r}")
        return "params", prefix + (module,), "kernel"
    if module.startswith("bn") or module == "downsample_bn":
        # Flax wraps BatchNorm in our Norm module: .../bn1/BatchNorm_0/scale
        path = prefix + (module, "BatchNorm_0")
        return {"weight": ("params", path, "scale"), "bias": ("params", path, "bias"),
                "running_mean": ("batch_stats", path, "mean"),
                "running_var": ("batch_stats", path, "var")}[leaf]
    raise KeyError(f"unexpected key {key!r}")


def convert_resnet_state_dict(state_dict: Mapping[str, Any]) -> dict:
    """torchvision ResNet state dict -> ``{"params": ..., "batch_stats": ...}`` of
    :class:`~nvsm_jax.models.backbone.ResNetEncoder` (nested dicts of float32)."""
    out: dict = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        t = _target(key)
        if t is None:
            continue
        coll, path, leaf = t
        value = np.asarray(value, np.float32)
        if leaf == "kernel":
            value = np.transpose(value, (2, 3, 1, 0))
        node = out[coll]
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def merge_encoder_variables(variables: Mapping, encoder_vars: Mapping, *,
                            name: str = "encoder", strict: bool = True) -> dict:
    """Replaces ``variables[coll][name]`` of a FeatureNet by converted weights.

    Checks every converted leaf exists with the same shape (``strict`` also
    requires every encoder leaf to be covered). Returns a new dict.
    """
    import flax
    import jax

    new = flax.core.unfreeze(jax.tree_util.tree_map(np.asarray, dict(variables)))
    for coll, tree in encoder_vars.items():
        if not tree:
            continue
        if coll not in new or name not in new[coll]:
            raise KeyError(f"variables have no {coll}/{name}: use norm='batch' or "
                           "'frozen_batch' (the resnet50 preset) to load BatchNorm weights")
        ref = flax.traverse_util.flatten_dict(new[coll][name])
        got = flax.traverse_util.flatten_dict(tree)
        for k, v in got.items():
            if k not in ref:
                raise KeyError(f"{coll}/{name}/{'/'.join(k)} not in the model")
            if ref[k].shape != v.shape:
                raise ValueError(f"{coll}/{name}/{'/'.join(k)}: model {ref[k].shape}, "
                                 f"weights {v.shape}")
        if strict and set(ref) != set(got):
            missing = sorted("/".join(k) for k in set(ref) - set(got))[:5]
            raise KeyError(f"{coll}/{name}: weights miss {missing} ...")
        ref.update(got)
        new[coll][name] = flax.traverse_util.unflatten_dict(ref)
    return new


def fake_resnet50_state_dict(seed: int = 0, stage_sizes=(3, 4, 6, 3),
                             widths=(64, 128, 256, 512)) -> dict[str, np.ndarray]:
    """Random arrays with torchvision ResNet-50's key names and shapes (tests)."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name, o, i, k):
        sd[name + ".weight"] = rng.normal(0, 0.05, (o, i, k, k)).astype(np.float32)

    def bn(name, c):
        sd[name + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[name + ".bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[name + ".running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        sd[name + ".running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[name + ".num_batches_tracked"] = np.array(100, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for s, (n, w) in enumerate(zip(stage_sizes, widths)):
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            conv(p + ".conv1", w, cin, 1)
            bn(p + ".bn1", w)
            conv(p + ".conv2", w, w, 3)
            bn(p + ".bn2", w)
            conv(p + ".conv3", w * 4, w, 1)
            bn(p + ".bn3", w * 4)
            if b == 0:
                conv(p + ".downsample.0", w * 4, cin, 1)
                bn(p + ".downsample.1", w * 4)
            cin = w * 4
    sd["fc.weight"] = rng.normal(0, 0.01, (1000, 2048)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd
