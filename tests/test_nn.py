"""Building blocks against TensorFlow ('SAME') and PyTorch (symmetric) oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scaledet_jax import nn as snn


def _apply(module, x, **kw):
    variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, **kw)
    return module.apply(variables, x, **kw), variables


@pytest.mark.parametrize("size", [15, 16])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1), (7, 2, 1), (1, 1, 1), (1, 2, 1), (3, 1, 2)])
def test_conv_same_matches_tensorflow(size, kernel, stride, dilation):
    import tensorflow as tf

    x = np.random.RandomState(0).randn(2, size, size, 5).astype(np.float32)
    y, variables = _apply(snn.conv(6, kernel, stride, dilation, padding="same"), jnp.asarray(x))
    kernel_value = np.asarray(variables["params"]["kernel"])
    ref = tf.nn.conv2d(x, kernel_value, strides=stride, padding="SAME", dilations=dilation).numpy()
    assert y.shape == ref.shape
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)


@pytest.mark.parametrize("size", [15, 16])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1), (7, 2, 1), (1, 1, 1), (1, 2, 1), (3, 1, 2)])
def test_conv_symmetric_matches_pytorch(size, kernel, stride, dilation):
    x = np.random.RandomState(1).randn(2, size, size, 4).astype(np.float32)
    y, variables = _apply(snn.conv(3, kernel, stride, dilation, padding="symmetric", use_bias=True), jnp.asarray(x))
    w = np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1)  # HWIO -> OIHW
    b = np.asarray(variables["params"]["bias"])
    ref = F.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(w),
        torch.from_numpy(b),
        stride=stride,
        padding=(kernel - 1) * dilation // 2,
        dilation=dilation,
    )
    np.testing.assert_allclose(np.asarray(y), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize("stride", [1, 2])
def test_one_by_one_conv_runs_as_a_dot_on_cpu_with_equal_values_and_gradients(stride):
    """1x1 convs are matmuls on CPU (XLA's conv is 2-4x slower there); same values and gradients."""
    x = jnp.asarray(np.random.RandomState(2).randn(2, 9, 9, 7).astype(np.float32))
    layer = snn.conv(5, 1, stride, use_bias=True)
    variables = layer.init(jax.random.key(0), x)
    loss = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
    jaxpr = str(jax.make_jaxpr(loss)(variables, x))
    assert "dot_general" in jaxpr and "conv_general_dilated" not in jaxpr
    with snn.depthwise_impl("conv"):  # XLA's own conv ops (as the FLOP counter traces them)
        native = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731  (a new function: no cached trace)
        assert "conv_general_dilated" in str(jax.make_jaxpr(native)(variables, x))
        reference = layer.apply(variables, x), jax.grad(native, argnums=(0, 1))(variables, x)
    ours = layer.apply(variables, x), jax.grad(loss, argnums=(0, 1))(variables, x)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize(
    "size,kernel,stride,cin,cout,padding,form",
    [
        (15, 3, 1, 6, snn.FLAT_MIN_OUTPUT_CHANNELS, "same", "flat"),  # a RetinaNet class-output conv
        (16, 5, 1, 3, snn.FLAT_MIN_OUTPUT_CHANNELS + 7, "symmetric", "flat"),
        (15, 3, 2, snn.IM2COL_MIN_INPUT_CHANNELS, 5, "same", "im2col"),  # TF 'SAME': more padding after
        (16, 3, 2, snn.IM2COL_MIN_INPUT_CHANNELS, 5, "same", "im2col"),
        (16, 3, 2, snn.IM2COL_MIN_INPUT_CHANNELS + 3, 4, "symmetric", "im2col"),
        (15, 3, 1, 6, 8, "same", None),  # XLA's own filter gradient was the fastest measured: kept
        (15, 3, 2, 3, 8, "same", None),
    ],
)
def test_cpu_filter_gradient_forms_equal_native_and_pytorch(size, kernel, stride, cin, cout, padding, form):
    """Where XLA's CPU filter gradient is slow (benchmarks/conv_backward.py) it is computed as dots: the forward
    and input gradient stay XLA's; values and both gradients equal XLA's native ones and PyTorch's autograd."""
    x = np.random.RandomState(3).randn(2, size, size + 1, cin).astype(np.float32)
    layer = snn.conv(cout, kernel, stride, padding=padding)
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    loss = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
    forward = str(jax.make_jaxpr(loss)(variables, jnp.asarray(x)))
    assert ("custom_vjp_call" in forward) == (form is not None)
    gradient = str(jax.make_jaxpr(jax.grad(loss))(variables, jnp.asarray(x)))
    assert gradient.count("dot_general") == {"flat": 2 * kernel * kernel, "im2col": 1, None: 0}[form]  # taps x images
    ours = layer.apply(variables, x), jax.grad(loss, argnums=(0, 1))(variables, jnp.asarray(x))
    with snn.depthwise_impl("conv"):
        native_loss = lambda v, x: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
        native = layer.apply(variables, x), jax.grad(native_loss, argnums=(0, 1))(variables, jnp.asarray(x))
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(native), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)

    # PyTorch: the same padding made explicit (TF 'SAME' may pad one more pixel after), autograd gradients
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (kernel, kernel), (stride, stride), "SAME")
    if padding == "symmetric":
        pads = [(kernel // 2, kernel // 2)] * 2
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()).requires_grad_()
    yt = F.conv2d(F.pad(xt, (pads[1][0], pads[1][1], pads[0][0], pads[0][1])), wt, stride=stride)
    torch.sin(yt).sum().backward()
    _, (grads, dx) = ours
    np.testing.assert_allclose(ours[0], yt.detach().permute(0, 2, 3, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(grads["params"]["kernel"], wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def test_same_and_symmetric_differ_for_strided_conv():
    # The reason padding is a model option: on even inputs a strided 3x3 conv sees different pixels.
    x = jnp.asarray(np.random.RandomState(2).randn(1, 8, 8, 2).astype(np.float32))
    same, v = _apply(snn.conv(2, 3, 2, padding="same"), x)
    sym = snn.conv(2, 3, 2, padding="symmetric").apply(v, x)
    assert same.shape == sym.shape
    assert float(jnp.max(jnp.abs(same - sym))) > 1e-2


@pytest.mark.parametrize("size", [9, 10])
def test_max_pool_paddings(size):
    import tensorflow as tf

    x = np.random.RandomState(3).randn(2, size, size, 3).astype(np.float32) - 5.0  # all negative: pads must never win
    same = snn.max_pool(jnp.asarray(x), 3, 2, "same")
    np.testing.assert_array_equal(np.asarray(same), tf.nn.max_pool2d(x, 3, 2, "SAME").numpy())
    sym = snn.max_pool(jnp.asarray(x), 3, 2, "symmetric")
    ref = F.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 2, padding=1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.asarray(sym), ref)


def test_batch_norm_inference_and_update():
    x = jnp.asarray(np.random.RandomState(4).randn(8, 4, 4, 3).astype(np.float32) * 3 + 1)
    bn = snn.batch_norm(0.9, 1e-3)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    variables = {
        "params": {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0])},
        "batch_stats": {"mean": jnp.array([0.5, -0.5, 1.0]), "var": jnp.array([2.0, 1.0, 4.0])},
    }
    y = bn.apply(variables, x, use_running_average=True)
    p, s = variables["params"], variables["batch_stats"]
    ref = (x - s["mean"]) / jnp.sqrt(s["var"] + 1e-3) * p["scale"] + p["bias"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)

    _, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    batch_mean = np.asarray(x).mean(axis=(0, 1, 2))
    batch_var = np.asarray(x).var(axis=(0, 1, 2))
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], 0.9 * np.asarray(s["mean"]) + 0.1 * batch_mean, rtol=1e-5
    )
    np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * np.asarray(s["var"]) + 0.1 * batch_var, rtol=1e-5)


def test_activations():
    x = jnp.linspace(-4, 4, 17)
    np.testing.assert_allclose(snn.get_activation("relu")(x), np.maximum(np.asarray(x), 0))
    np.testing.assert_allclose(snn.get_activation("swish")(x), np.asarray(x) / (1 + np.exp(-np.asarray(x))), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown activation"):
        snn.get_activation("gelu_tanh_fancy")


def test_nearest_upsample():
    x = jnp.arange(4.0).reshape(1, 2, 2, 1)
    y = snn.nearest_upsample(x, 2)[0, :, :, 0]
    np.testing.assert_array_equal(np.asarray(y), [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])


def test_stochastic_depth():
    x = jnp.ones((4000, 2, 2, 1))
    layer = snn.StochasticDepth(0.25)
    assert layer.apply({}, x, train=False) is x
    y = layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(0)})
    per_example = np.asarray(y[:, 0, 0, 0])
    values = np.unique(per_example)  # whole examples dropped or rescaled by 1 / keep
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1.0 / 0.75)
    assert np.all(np.asarray(y) == per_example[:, None, None, None])
    assert abs((per_example == 0).mean() - 0.25) < 0.03
    assert abs(float(y.mean()) - 1.0) < 0.05  # expectation preserved


def test_bad_padding_is_refused():
    with pytest.raises(ValueError, match="padding must be one of"):
        snn.conv(4, 3, padding="valid")


@pytest.mark.parametrize("size,kernel,stride", [(7, 3, 1), (8, 3, 2), (13, 5, 2), (16, 5, 1), (9, 3, 2)])
@pytest.mark.parametrize("padding", ["same", "symmetric"])
def test_depthwise_shifted_equals_grouped_conv(size, kernel, stride, padding):
    x = jnp.asarray(np.random.RandomState(0).normal(size=(2, size, size + 1, 6)).astype(np.float32))
    outs, grads = {}, {}
    for impl in ("conv", "shifted"):
        layer = snn.DepthwiseConv(kernel, stride, padding=padding, impl=impl)
        variables = layer.init(jax.random.key(0), x)
        outs[impl] = layer.apply(variables, x)
        loss = lambda v, x, layer=layer: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
        grads[impl] = jax.grad(loss, argnums=(0, 1))(variables, x)
    np.testing.assert_allclose(outs["shifted"], outs["conv"], atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(grads["shifted"]), jax.tree_util.tree_leaves(grads["conv"]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_depthwise_symmetric_matches_pytorch():
    x = np.random.RandomState(1).normal(size=(1, 11, 11, 4)).astype(np.float32)
    layer = snn.DepthwiseConv(5, 2, padding="symmetric", impl="shifted")
    variables = layer.init(jax.random.key(0), jnp.asarray(x))
    kernel = np.asarray(variables["params"]["kernel"])  # [k, k, 1, C] -> torch [C, 1, k, k]
    ref = F.conv2d(
        torch.from_numpy(x).permute(0, 3, 1, 2),
        torch.from_numpy(kernel.transpose(3, 2, 0, 1)),
        stride=2,
        padding=2,
        groups=4,
    )
    np.testing.assert_allclose(layer.apply(variables, jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_depthwise_gradients_match_pytorch_autograd():
    """The shifted depthwise conv's own VJP (filter gradient one tap at a time) against PyTorch's autograd."""
    x = np.random.RandomState(4).normal(size=(2, 12, 11, 5)).astype(np.float32)
    for kernel_size, stride in ((3, 1), (5, 2), (3, 2)):
        layer = snn.DepthwiseConv(kernel_size, stride, padding="symmetric", impl="shifted")
        variables = layer.init(jax.random.key(0), jnp.asarray(x))
        assert "custom_vjp_call" in str(jax.make_jaxpr(lambda v, x, layer=layer: layer.apply(v, x))(variables, x))
        loss = lambda v, x, layer=layer: jnp.sum(jnp.sin(layer.apply(v, x)))  # noqa: E731
        grads, dx = jax.grad(loss, argnums=(0, 1))(variables, jnp.asarray(x))
        xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
        kt = torch.from_numpy(np.asarray(variables["params"]["kernel"]).transpose(3, 2, 0, 1).copy()).requires_grad_()
        torch.sin(F.conv2d(xt, kt, stride=stride, padding=kernel_size // 2, groups=5)).sum().backward()
        np.testing.assert_allclose(grads["params"]["kernel"], kt.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)
        np.testing.assert_allclose(dx, xt.grad.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_frozen_statistics_normalise_with_and_keep_running_statistics():
    """Inside ``frozen_statistics(patterns)`` a matching batch norm in training mode is its inference self (the
    running statistics normalise, none update); the others train as usual; outside, nothing changes."""
    import flax.linen as nn

    class TwoNorms(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = snn.batch_norm(0.9, 1e-3, name="first_bn")(x, use_running_average=not train)
            return snn.batch_norm(0.9, 1e-3, name="second_bn")(2.0 * x + 1.0, use_running_average=not train)

    model = TwoNorms()
    x = jnp.asarray(np.random.RandomState(0).normal(2.0, 3.0, (4, 5, 5, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x, False)
    variables = {  # running statistics unlike the batch's, so that using them shows
        "params": variables["params"],
        "batch_stats": jax.tree_util.tree_map(lambda v: v + 0.5, variables["batch_stats"]),
    }
    plain, plain_stats = model.apply(variables, x, True, mutable=["batch_stats"])
    with snn.frozen_statistics(["^first_"]):
        partly, partly_stats = model.apply(variables, x, True, mutable=["batch_stats"])
    with snn.frozen_statistics(["."]):
        frozen, frozen_stats = model.apply(variables, x, True, mutable=["batch_stats"])
    inference = model.apply(variables, x, False)

    def same(a, b) -> bool:
        return all(bool(jnp.array_equal(u, v)) for u, v in zip(*map(jax.tree_util.tree_leaves, (a, b)), strict=True))

    assert same(partly_stats["batch_stats"]["first_bn"], variables["batch_stats"]["first_bn"])
    assert not same(partly_stats["batch_stats"]["second_bn"], variables["batch_stats"]["second_bn"])
    assert same(frozen_stats["batch_stats"], variables["batch_stats"])
    np.testing.assert_array_equal(np.asarray(frozen), np.asarray(inference))
    assert float(jnp.abs(plain - inference).max()) > 0.1  # training mode normalises with the batch's
    with snn.frozen_statistics(["^nothing"]):
        unchanged = model.apply(variables, x, True, mutable=["batch_stats"])[0]
    np.testing.assert_array_equal(np.asarray(unchanged), np.asarray(plain))
