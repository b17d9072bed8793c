"""Building blocks shared by every architecture: conv, batch norm, activations, pooling.

Semantic differences between the sources we track are options here, never copies of a model:

* ``padding='same'`` reproduces TensorFlow's 'SAME' (extra pixel at the bottom/right when the
  total padding is odd); ``padding='symmetric'`` reproduces PyTorch's ``padding=k // 2``
  (equal on both sides), which is what converted PyTorch checkpoints need for parity.
* Batch norm momentum/epsilon follow Keras semantics (``new = m * old + (1 - m) * batch``), which
  is also Flax's; PyTorch's momentum 0.1 is Keras' 0.9.

Inside ``jax.jit`` over a sharded batch, batch statistics are computed over the *global* batch,
so ``BatchNorm`` is cross-replica ("sync") batch norm without any axis name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# Keras 'VarianceScaling' default: scale 1, fan_in, truncated normal (TF Model Garden backbones).
keras_variance_scaling = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

PADDINGS = ("same", "symmetric")


def _check_padding(padding: str) -> None:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")


def conv_padding(kernel_size: int, dilation: int, padding: str) -> str | Sequence[tuple[int, int]]:
    """The lax padding spec for a square kernel under the given semantics."""
    _check_padding(padding)
    if padding == "same":
        return "SAME"
    pad = (kernel_size - 1) * dilation // 2
    return ((pad, pad), (pad, pad))


def get_activation(name: str) -> Callable[[Array], Array]:
    """Activation by name: 'relu', 'swish' (= SiLU), 'linear'/'none'."""
    if name == "relu":
        return nn.relu
    if name in ("swish", "silu"):
        return nn.swish
    if name in ("linear", "none", None):
        return lambda x: x
    raise ValueError(f"unknown activation {name!r}; use 'relu' or 'swish'")


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):  # fmt: skip
    """``lax.conv_general_dilated``, except 1x1 convolutions on CPU, which run as a matmul.

    XLA's CPU convolution runs a 1x1 conv 2-4x slower than the same contraction as a dot (measured
    on this project's 2-core machine: 35-85 vs 100-140 GFLOP/s); the arithmetic is identical.
    """
    one_by_one = (
        rhs.ndim == 4
        and rhs.shape[0] == rhs.shape[1] == 1
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and (padding in ("SAME", "VALID") or all(p == (0, 0) for p in map(tuple, padding)))
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and _cpu_friendly_forms()
    )
    if not one_by_one:
        form = _filter_gradient_form(lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers,
                                     feature_group_count, precision, kwargs)  # fmt: skip
        if form is not None:
            if isinstance(padding, str):
                padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
            pads = tuple(tuple(int(p) for p in pair) for pair in padding)
            return _conv_cpu_filter_gradient(lhs, rhs, tuple(window_strides), pads, form)
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs,
        )  # fmt: skip
    sh, sw = window_strides
    x = lhs[:, ::sh, ::sw, :] if (sh, sw) != (1, 1) else lhs
    return jax.lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision, **kwargs)


# Filter gradients that XLA's CPU convolution computes slower than a formulation as dots (measured by
# benchmarks/conv_backward.py on this project's 2-core machine, GFLOP/s native -> ours): the wide class-output
# conv of a RetinaNet head (256 -> 819 at P3: 136 -> 237, 'flat') and stride-2 3x3 convs (159 -> 287,
# 'im2col'). Everywhere else XLA's own gradient was the fastest measured and is kept.
FLAT_MIN_OUTPUT_CHANNELS = 512
IM2COL_MIN_INPUT_CHANNELS = 64


def _filter_gradient_form(lhs, rhs, strides, lhs_dilation, rhs_dilation, dimension_numbers, groups, precision,
                          kwargs) -> str | None:  # fmt: skip
    """'flat' / 'im2col' where that filter gradient beats XLA's on CPU, else None (XLA's native gradient)."""
    k = rhs.shape[0]
    plain = (
        rhs.ndim == 4
        and rhs.shape[1] == k > 1
        and groups == 1
        and precision is None
        and not kwargs.get("preferred_element_type")
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        and _cpu_friendly_forms()
    )
    if not plain:
        return None
    if tuple(strides) == (1, 1) and rhs.shape[3] >= FLAT_MIN_OUTPUT_CHANNELS:
        return "flat"
    if tuple(strides) == (2, 2) and k == 3 and rhs.shape[2] >= IM2COL_MIN_INPUT_CHANNELS:
        return "im2col"
    return None


def _conv_nhwc(x: Array, w: Array, strides, pads) -> Array:
    return jax.lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_cpu_filter_gradient(x: Array, w: Array, strides, pads, form: str) -> Array:
    """XLA's convolution and input gradient; the filter gradient as dots (``form``), same arithmetic."""
    return _conv_nhwc(x, w, strides, pads)


def _conv_cpu_fwd(x, w, strides, pads, form):
    return _conv_nhwc(x, w, strides, pads), (x, w)


def _conv_cpu_bwd(strides, pads, form, residuals, g):
    x, w = residuals
    _, input_vjp = jax.vjp(lambda x: _conv_nhwc(x, w, strides, pads), x)
    (dx,) = input_vjp(g)
    dw = (
        _filter_gradient_flat(x, g, w.shape, pads)
        if form == "flat"
        else _filter_gradient_im2col(x, g, w.shape, strides, pads)
    )
    return dx, dw.astype(w.dtype)


_conv_cpu_filter_gradient.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def _filter_gradient_flat(x: Array, g: Array, w_shape, pads) -> Array:
    """Stride-1 filter gradient: with the padded input flattened over (row, padded column), every kernel tap's
    window is one contiguous slice, so the gradient is k*k plain dots per image; the output gradient is
    zero-extended over the k - 1 columns that do not exist, so they contribute nothing."""
    k, _, c, o = w_shape
    (top, bottom), (left, right) = pads
    n, oh, ow, _ = g.shape
    wp = x.shape[2] + left + right
    # one extra bottom row keeps the last tap's slice (offset (k-1) * wp + k - 1, length oh * wp) in range
    xp = jnp.pad(x, ((0, 0), (top, bottom + 1), (left, right), (0, 0))).reshape(n, -1, c)
    gp = jnp.pad(g, ((0, 0), (0, 0), (0, wp - ow), (0, 0))).reshape(n, oh * wp, o)
    length = oh * wp
    total = None
    for b in range(n):
        taps = jnp.stack([
            jax.lax.dot_general(xp[b, i * wp + j : i * wp + j + length], gp[b], (((0,), (0,)), ((), ())))
            for i in range(k) for j in range(k)
        ])  # fmt: skip
        total = taps if total is None else total + taps
    return total.reshape(k, k, c, o)


def _filter_gradient_im2col(x: Array, g: Array, w_shape, strides, pads) -> Array:
    """Filter gradient as one dot of the k*k strided windows (concatenated on channels) with the output gradient."""
    k, _, c, o = w_shape
    (top, bottom), (left, right) = pads
    sh, sw = strides
    _, oh, ow, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    windows = [
        xp[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw] for i in range(k) for j in range(k)
    ]
    patches = jnp.concatenate(windows, -1)
    return jnp.einsum("nhwp,nhwo->po", patches, g).reshape(k, k, c, o)


def _cpu_friendly_forms() -> bool:
    """True when CPU-friendly forms should replace XLA's conv ops (not inside ``depthwise_impl('conv')``)."""
    return _depthwise_default.get() != "conv" and jax.default_backend() == "cpu"


def conv(
    features: int,
    kernel_size: int = 1,
    strides: int = 1,
    dilation: int = 1,
    *,
    use_bias: bool = False,
    padding: str = "same",
    groups: int = 1,
    kernel_init: Callable = keras_variance_scaling,
    bias_init: Callable = nn.initializers.zeros,
    dtype: Dtype | None = None,
    name: str | None = None,
) -> nn.Conv:
    """A square 2-D convolution (NHWC input, HWIO kernel as in Keras) with the given padding."""
    return nn.Conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=(strides, strides),
        kernel_dilation=(dilation, dilation),
        padding=conv_padding(kernel_size, dilation, padding),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        conv_general_dilated=_conv_general_dilated,
        name=name,
    )


_FROZEN_STATISTICS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("frozen_statistics", default=())


@contextlib.contextmanager
def frozen_statistics(patterns: Sequence[str]):
    """While tracing inside it, batch norms whose module path ('backbone/stem_bn') matches one of ``patterns``
    (regular expressions, searched) normalise with their running statistics in training too and leave them
    unchanged: mmdetection's ``norm_eval``, for fine-tuning with batches too small for good statistics
    (``optim.frozen_batch_stats``; their scale and offset still train unless ``optim.frozen`` holds them)."""
    token = _FROZEN_STATISTICS.set(tuple(patterns))
    try:
        yield
    finally:
        _FROZEN_STATISTICS.reset(token)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` that honours :func:`frozen_statistics`."""

    def __call__(self, x: Array, use_running_average: bool | None = None, **kwargs) -> Array:
        patterns = _FROZEN_STATISTICS.get()
        if patterns and not use_running_average:
            path = "/".join(str(part) for part in self.scope.path)
            if any(re.search(pattern, path) for pattern in patterns):
                use_running_average = True
        return super().__call__(x, use_running_average=use_running_average, **kwargs)


def batch_norm(
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    *,
    dtype: Dtype | None = None,
    name: str | None = None,
    zero_scale: bool = False,
) -> nn.BatchNorm:
    """Batch norm with Keras momentum/epsilon semantics; parameters and statistics in float32.

    Call it as ``batch_norm(...)(x, use_running_average=not train)``. ``zero_scale``: gamma starts at 0
    (a residual branch's last norm: the block starts as the identity, Goyal et al. 2017).
    """
    scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
    return BatchNorm(
        momentum=momentum, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, scale_init=scale_init, name=name
    )


POOL_PADDINGS = PADDINGS + ("valid",)


def _torch_pool_pads(size: int, window: int, stride: int, pad: int, ceil_mode: bool) -> tuple[int, int]:
    """(before, after) padding that gives PyTorch's pooled size along one axis.

    PyTorch: ``out = floor_or_ceil((size + 2 pad - window) / stride) + 1``, minus one in ceil mode
    when the last window would start in the right padding. Ceil mode may pad the end beyond ``pad``.
    """
    span = size + 2 * pad - window
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return pad, max(pad, (out - 1) * stride + window - size - pad)


def max_pool(x: Array, window: int, stride: int, padding: str = "same", *, ceil_mode: bool = False) -> Array:
    """Max pooling. 'same' is TF 'SAME'; 'symmetric' pads window // 2 on both sides; 'valid' pads nothing
    (PyTorch ``padding=0``).

    ``ceil_mode`` ('symmetric' / 'valid' only) is PyTorch's ``MaxPool2d(ceil_mode=True)``: the output size
    rounds up, so a last partial window at the bottom/right is kept (VoVNet's stage-entry pools).
    Padded positions never win (-inf), as in both TF and PyTorch.
    """
    if padding not in POOL_PADDINGS:
        raise ValueError(f"padding must be one of {POOL_PADDINGS}, got {padding!r}")
    if padding == "same":
        if ceil_mode:
            raise ValueError("ceil_mode applies to PyTorch paddings ('symmetric', 'valid'), not 'same'")
        pad: str | Sequence[tuple[int, int]] = "SAME"
    else:
        p = window // 2 if padding == "symmetric" else 0
        pad = tuple(_torch_pool_pads(x.shape[axis], window, stride, p, ceil_mode) for axis in (1, 2))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pad)


def nearest_upsample(x: Array, scale: int) -> Array:
    """Nearest-neighbour upsampling by an integer factor (NHWC)."""
    if scale == 1:
        return x
    x = jnp.repeat(x, scale, axis=1)
    return jnp.repeat(x, scale, axis=2)


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per example with probability ``rate`` when training.

    Kept examples are scaled by 1 / (1 - rate), as in TF Model Garden. Uses the 'dropout' RNG.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        if not train or not self.rate:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("dropout")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class ConvBN(nn.Module):
    """Conv -> batch norm -> optional activation; submodules named ``conv`` and ``bn``."""

    features: int
    kernel_size: int = 1
    strides: int = 1
    dilation: int = 1
    activation: str | None = None
    padding: str = "same"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    kernel_init: Callable = keras_variance_scaling
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = conv(
            self.features,
            self.kernel_size,
            self.strides,
            self.dilation,
            padding=self.padding,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            name="conv",
        )(x)
        x = batch_norm(self.bn_momentum, self.bn_epsilon, dtype=self.dtype, name="bn")(x, use_running_average=not train)
        if self.activation:
            x = get_activation(self.activation)(x)
        return x


DEPTHWISE_IMPLS = ("auto", "conv", "shifted")
_depthwise_default = contextvars.ContextVar("depthwise_default", default="auto")


@contextlib.contextmanager
def depthwise_impl(impl: str):
    """Within the block, ``DepthwiseConv(impl='auto')`` traces as ``impl``; 'conv' also keeps 1x1
    convolutions as XLA convolutions instead of their CPU matmul form (e.g. for FLOP counting)."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    token = _depthwise_default.set(impl)
    try:
        yield
    finally:
        _depthwise_default.reset(token)


def _same_pads(size: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
    """(pad before, pad after, output size) along one axis."""
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2, out
    pad = (kernel - 1) // 2
    return pad, pad, (size + 2 * pad - kernel) // stride + 1


class DepthwiseConv(nn.Module):
    """Depthwise kxk convolution (one filter per channel, no bias); kernel [k, k, 1, C] as nn.Conv's.

    XLA's CPU backend runs grouped convolutions an order of magnitude slower than dense ones, so
    on CPU (``impl='auto'``) the convolution is computed as k*k shifted, strided slices of the
    padded input times per-channel weights — the same arithmetic, fused by XLA into one loop.
    Elsewhere (GPU/TPU) the native grouped convolution is used. Variables are identical either way.
    """

    kernel_size: int = 3
    strides: int = 1
    padding: str = "same"
    kernel_init: Callable = keras_variance_scaling
    impl: str = "auto"
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_padding(self.padding)
        if self.impl not in DEPTHWISE_IMPLS:
            raise ValueError(f"impl must be one of {DEPTHWISE_IMPLS}, got {self.impl!r}")
        channels, k, s = x.shape[-1], self.kernel_size, self.strides
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, channels), jnp.float32)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        impl = self.impl if self.impl != "auto" else _depthwise_default.get()
        if impl == "auto":
            impl = "shifted" if jax.default_backend() == "cpu" else "conv"
        if impl == "conv":
            return jax.lax.conv_general_dilated(
                x,
                kernel,
                (s, s),
                conv_padding(k, 1, self.padding),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=channels,
            )
        top, bottom, _ = _same_pads(x.shape[1], k, s, self.padding)
        left, right, _ = _same_pads(x.shape[2], k, s, self.padding)
        return _depthwise_shifted(x, kernel, s, ((top, bottom), (left, right)))


def _depthwise_windows(x: Array, k: int, s: int, pads) -> tuple[Array, int, int]:
    """(padded input, output height, output width) of a depthwise kxk conv with stride ``s``."""
    (top, bottom), (left, right) = pads
    padded = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return padded, (padded.shape[1] - k) // s + 1, (padded.shape[2] - k) // s + 1


def _depthwise_shifted_forward(x: Array, kernel: Array, s: int, pads) -> Array:
    k = kernel.shape[0]
    padded, out_h, out_w = _depthwise_windows(x, k, s, pads)
    out = None
    for i in range(k):
        for j in range(k):
            window = padded[:, i : i + (out_h - 1) * s + 1 : s, j : j + (out_w - 1) * s + 1 : s, :]
            term = window * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shifted(x: Array, kernel: Array, s: int, pads) -> Array:
    """The shifted-slices depthwise conv; its filter gradient one kernel tap per loop iteration.

    Differentiated directly, XLA fuses the k*k filter-gradient reductions (window x output gradient, summed
    over batch and space) into one multi-output loop that runs ~4x slower than the same reductions one at a
    time (D0's [2, 128, 128, 144] 3x3: 50 ms vs 12 ms), and they were most of EfficientDet's backward pass.
    """
    return _depthwise_shifted_forward(x, kernel, s, pads)


def _depthwise_shifted_fwd(x, kernel, s, pads):
    return _depthwise_shifted_forward(x, kernel, s, pads), (x, kernel)


def _depthwise_shifted_bwd(s, pads, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _depthwise_shifted_forward(x, kernel, s, pads), x)
    (dx,) = input_vjp(g)
    k = kernel.shape[0]
    padded, out_h, out_w = _depthwise_windows(x, k, s, pads)
    # the s*s stride phases of the padded input, so each tap's window is an unstrided dynamic slice
    rows, cols = -(-padded.shape[1] // s) * s, -(-padded.shape[2] // s) * s
    padded = jnp.pad(padded, ((0, 0), (0, rows - padded.shape[1]), (0, cols - padded.shape[2]), (0, 0)))
    phases = jnp.stack([padded[:, a::s, b::s] for a in range(s) for b in range(s)])

    def tap_gradient(tap):
        i, j = tap // k, tap % k
        start = ((i % s) * s + j % s, 0, i // s, j // s, 0)
        window = jax.lax.dynamic_slice(phases, start, (1,) + g.shape)[0]
        return jnp.sum(window * g, axis=(0, 1, 2), dtype=jnp.float32)

    dkernel = jax.lax.map(tap_gradient, jnp.arange(k * k)).reshape(kernel.shape)
    return dx, dkernel.astype(kernel.dtype)


_depthwise_shifted.defvjp(_depthwise_shifted_fwd, _depthwise_shifted_bwd)


class SeparableConv(nn.Module):
    """Depthwise kxk conv (no bias) then pointwise 1x1 conv; submodules ``depthwise``, ``pointwise``.

    Keras' ``SeparableConv2D`` as automl uses it (one variable set per layer, bias on the pointwise
    part only). Initialisers follow Keras' kernel shapes: ``depthwise_init`` sees Flax's [k, k, 1, C]
    kernel, so fan-in/out based initialisers must choose their axes (see ``keras_depthwise``).
    """

    features: int
    kernel_size: int = 3
    use_bias: bool = True
    padding: str = "same"
    depthwise_init: Callable = nn.initializers.glorot_uniform()
    pointwise_init: Callable = nn.initializers.glorot_uniform()
    bias_init: Callable = nn.initializers.zeros
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = DepthwiseConv(
            self.kernel_size, padding=self.padding, kernel_init=self.depthwise_init, dtype=self.dtype, name="depthwise"
        )(x)
        return conv(
            self.features,
            1,
            use_bias=self.use_bias,
            padding=self.padding,
            kernel_init=self.pointwise_init,
            bias_init=self.bias_init,
            dtype=self.dtype,
            name="pointwise",
        )(x)


def keras_depthwise(initializer_factory: Callable = nn.initializers.variance_scaling, *args, **kwargs) -> Callable:
    """An initialiser for Flax depthwise kernels [k, k, 1, C] with Keras' fan semantics ([k, k, C, 1])."""
    return initializer_factory(*args, in_axis=-1, out_axis=-2, **kwargs)


class FrozenBatchNorm(nn.Module):
    """torchvision's ``FrozenBatchNorm2d``: ``y = (x - mean) / sqrt(var + eps) * scale + bias``.

    All four arrays live in the 'batch_stats' collection (not 'params'): they are never trained and
    never updated, so trainable-parameter counts match torchvision's. Leaf names equal
    ``nn.BatchNorm``'s so converters map weight/bias/running_mean/running_var the same way. Called
    like a batch norm, ``(x, use_running_average=...)``; the flag is ignored. Folded into one
    multiply-add as torchvision does; statistics are float32, the result has ``dtype`` (or x's).
    """

    epsilon: float = 1e-5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None) -> Array:
        del use_running_average  # frozen: always the stored statistics
        features = x.shape[-1]
        stat = lambda name, fill: self.variable("batch_stats", name, jnp.full, (features,), fill, jnp.float32)  # noqa: E731
        scale = stat("scale", 1.0).value
        bias = stat("bias", 0.0).value
        mean = stat("mean", 0.0).value
        var = stat("var", 1.0).value
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        shift = bias - mean * multiplier
        dtype = self.dtype or x.dtype
        return x.astype(dtype) * multiplier.astype(dtype) + shift.astype(dtype)
