"""Backbone shapes/normalisation, BatchNorm under sharding, torchvision conversion."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvsm_jax import parallel
from nvsm_jax.models import backbone, convert


def test_feature_net_shapes_and_unit_norm():
    net = backbone.make_feature_net("tiny", stride=4, feature_dim=16)
    x = jax.random.normal(jax.random.key(0), (2, 64, 96, 3))
    v = jax.jit(net.init)(jax.random.key(1), x)
    y, inter = jax.jit(lambda v, x: net.apply(
        v, x, capture_intermediates=lambda m, _: isinstance(m, backbone.ResNetEncoder)))(v, x)
    assert y.shape == (2, 16, 24, 16)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y), axis=-1), 1.0, atol=1e-5)
    maps = inter["intermediates"]["encoder"]["__call__"][0]
    assert [m.shape[1:3] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [m.shape[-1] for m in maps] == [8, 16, 32, 64]
    assert "up4" in v["params"] and "up8" in v["params"]     # decoder back to stride 4
    assert backbone.make_feature_net("resnet50").norm == "batch"
    with pytest.raises(ValueError):
        backbone.make_feature_net("nope")
    assert backbone.preprocess(np.zeros((1, 2, 2, 3), np.uint8)).dtype == jnp.float32


@pytest.mark.parametrize("c,f,hw,out_hw", [(40, 4, (3, 4), (6, 8)),   # wide: taps at low res
                                          (40, 4, (3, 3), (5, 6)),   # not an exact 2x
                                          (4, 8, (3, 4), (6, 8))])   # narrow: as written
def test_upsample_concat_conv_is_resize_concat_conv(c, f, hw, out_hw):
    """The decoder's first convolution equals resize, concatenate, convolve
    (values and gradients, float64 to 1e-10), whichever way it is computed."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, *hw, c)), jnp.float64)
        skip = jnp.asarray(rng.normal(size=(2, *out_hw, 5)), jnp.float64)
        kernel = jnp.asarray(rng.normal(size=(3, 3, c + 5, f)) / np.sqrt(9 * c), jnp.float64)
        cot = jnp.asarray(rng.normal(size=(2, *out_hw, f)), jnp.float64)

        def ref(x, skip, kernel):
            up = jax.image.resize(x, (2, *out_hw, c), "bilinear")
            return jax.lax.conv_general_dilated(jnp.concatenate([up, skip], -1), kernel, (1, 1),
                                                "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        got, got_vjp = jax.vjp(backbone.upsample_concat_conv, x, skip, kernel)
        want, want_vjp = jax.vjp(ref, x, skip, kernel)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(got_vjp(cot), want_vjp(cot)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * np.abs(b).max())
        with pytest.raises(ValueError, match="input channels"):
            backbone.upsample_concat_conv(x, skip[..., :4], kernel)


def test_batchnorm_uses_global_batch_statistics_on_1_and_8_devices():
    net = backbone.make_feature_net("tiny", stride=8, feature_dim=8, norm="batch")
    x = np.asarray(jax.random.normal(jax.random.key(0), (8, 32, 32, 3)))
    v = net.init(jax.random.key(1), x[:1], train=False)

    def f(v, x):
        return net.apply(v, x, train=True, mutable=["batch_stats"])

    outs = []
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        y, st = jax.jit(f)(parallel.replicate(v, mesh), parallel.shard_batch(x, mesh))
        outs.append((np.asarray(y), jax.tree_util.tree_map(np.asarray, st)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=2e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           outs[0][1], outs[1][1])
    # the global mean differs from a per-shard mean: the sharded result is global
    y_one_image, _ = jax.jit(f)(v, x[:1])
    assert not np.allclose(y_one_image, outs[1][0][:1], atol=1e-3)


def test_convert_fake_torchvision_resnet50(tmp_path):
    sd = convert.fake_resnet50_state_dict(seed=0)
    assert sd["layer3.5.conv2.weight"].shape == (256, 256, 3, 3)
    np.savez(tmp_path / "r50.npz", **sd)
    loaded = convert.load_state_dict(tmp_path / "r50.npz")
    enc = convert.convert_resnet_state_dict(loaded)
    net = backbone.make_feature_net("resnet50", stride=8)
    abstract = jax.eval_shape(lambda k: net.init(k, jnp.zeros((1, 64, 64, 3))), jax.random.key(0))
    variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    merged = convert.merge_encoder_variables(variables, enc, strict=True)
    p = merged["params"]["encoder"]
    np.testing.assert_array_equal(p["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"][0, 0],
                                  sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(p["layer4_2"]["bn3"]["BatchNorm_0"]["scale"],
                                  sd["layer4.2.bn3.weight"])
    np.testing.assert_array_equal(
        merged["batch_stats"]["encoder"]["layer1_0"]["bn1"]["BatchNorm_0"]["var"],
        sd["layer1.0.bn1.running_var"])
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(p))
    assert n_params == sum(v.size for k, v in sd.items()
                           if not k.startswith("fc.") and "running" not in k
                           and "num_batches" not in k)
    # a wrong shape is reported
    sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    with pytest.raises(ValueError, match="layer1_0/conv1"):
        convert.merge_encoder_variables(variables, convert.convert_resnet_state_dict(sd))
    with pytest.raises(ValueError):
        convert.load_state_dict(tmp_path / "weights.bin")


def test_converted_conv_computes_torch_convolution():
    """A converted stem conv equals a direct cross-correlation in torch layout."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 7, 7)).astype(np.float32)      # torch [O, I, kh, kw]
    x = rng.normal(size=(1, 16, 16, 3)).astype(np.float32)
    kernel = convert.convert_resnet_state_dict({"conv1.weight": w})["params"]["conv1"]["kernel"]
    y = flax.linen.Conv(4, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False).apply(
        {"params": {"kernel": kernel}}, x)
    xp = np.pad(x[0], ((3, 3), (3, 3), (0, 0)))
    r, c = 3, 5
    want = np.einsum("oihw,hwi->o", w, xp[2 * r:2 * r + 7, 2 * c:2 * c + 7])
    np.testing.assert_allclose(np.asarray(y[0, r, c]), want, rtol=1e-4, atol=1e-4)
