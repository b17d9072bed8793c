"""3x3 / 7x7 convolution gradients on this machine: XLA's native ops against hand-written formulations.

    python benchmarks/conv_backward.py [--repeats=7]

Shapes are the convolutions that dominate SpineNet-49 @640 batch 2 (RetinaNet head at P3 and P5, the class
output conv 256 -> 9 x 91, a stride-4 block, a stride-2 conv, the 7x7 stem). For each: GFLOP/s of the forward,
of XLA's native input gradient (dx) and filter gradient (dW) from ``jax.vjp``, and of formulations of the
same arithmetic (max relative difference to the native gradient printed beside):

* ``dW im2col``: the k*k shifted (strided) windows concatenated into patches [N, H, W, k*k*C], one dot with the
  output gradient;
* ``dW taps``: one dot per kernel tap (window [N*H*W, C] x gradient [N*H*W, O]), no patch matrix;
* ``dW flat``: stride 1 only: the padded input flattened over (row, padded column), so every tap is a
  contiguous slice and the gradient is zero-extended over the padding columns: one 2-D dot per tap and image;
* ``dx col2im``: the gradient's patches (one dot with the kernel) scattered back by k*k strided adds.

The fastest formulation that is also correct would replace XLA's op on CPU (issue 17 item 1).
"""

from __future__ import annotations

import functools
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax import lax  # noqa: E402
from timing import median_seconds  # noqa: E402

flags.DEFINE_integer("repeats", 7, "Timed runs (median) per measurement after a warm-up run.")
FLAGS = flags.FLAGS

# (batch, size, in channels, out channels, kernel, stride, where in SpineNet-49 @640)
SHAPES = (
    (2, 80, 256, 256, 3, 1, "head conv, P3"),
    (2, 80, 256, 819, 3, 1, "class output, P3"),
    (2, 20, 256, 256, 3, 1, "head conv, P5"),
    (2, 160, 64, 64, 3, 1, "bottleneck 3x3, L2"),
    (2, 80, 128, 256, 3, 2, "stride-2 3x3"),
    (2, 320, 3, 64, 7, 2, "stem 7x7 (dW only matters)"),
)


def _conv(x, w, stride):
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


def _windows(x, k, s):
    top, bottom, oh = _same_pads(x.shape[1], k, s)
    left, right, ow = _same_pads(x.shape[2], k, s)
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    return [xp[:, i : i + (oh - 1) * s + 1 : s, j : j + (ow - 1) * s + 1 : s] for i in range(k) for j in range(k)]


def dw_im2col(x, g, k, s):
    patches = jnp.concatenate(_windows(x, k, s), -1)
    return jnp.einsum("nhwp,nhwo->po", patches, g).reshape(k, k, x.shape[-1], g.shape[-1])


def dw_taps(x, g, k, s):
    taps = [jnp.einsum("nhwc,nhwo->co", window, g) for window in _windows(x, k, s)]
    return jnp.stack(taps).reshape(k, k, x.shape[-1], g.shape[-1])


def dw_flat(x, g, k, s):
    assert s == 1
    n, h, w, c = x.shape
    p, o = k // 2, g.shape[-1]
    wp = w + 2 * p
    length = h * wp
    xp = jnp.pad(x, ((0, 0), (p, p + 1), (p, p), (0, 0))).reshape(n, (h + 2 * p + 1) * wp, c)
    gp = jnp.pad(g, ((0, 0), (0, 0), (0, 2 * p), (0, 0))).reshape(n, length, o)  # zero over the padding columns
    total = 0
    for b in range(n):
        taps = [
            lax.dot_general(xp[b, i * wp + j : i * wp + j + length], gp[b], (((0,), (0,)), ((), ())))
            for i in range(k)
            for j in range(k)
        ]
        total = total + jnp.stack(taps)
    return total.reshape(k, k, c, o)


def dx_col2im(shape, g, w, k, s):
    n, h, wd, c = shape
    top, bottom, oh = _same_pads(h, k, s)
    left, right, ow = _same_pads(wd, k, s)
    patches = jnp.einsum("nhwo,pco->nhwpc", g, w.reshape(k * k, c, -1))
    out = jnp.zeros((n, h + top + bottom, wd + left + right, c), g.dtype)
    for tap in range(k * k):
        i, j = divmod(tap, k)
        out = out.at[:, i : i + (oh - 1) * s + 1 : s, j : j + (ow - 1) * s + 1 : s].add(patches[..., tap, :])
    return out[:, top : top + h, left : left + wd]


def _rate(gflop: float, fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    return gflop / median_seconds(lambda: jax.block_until_ready(fn(*args)), FLAGS.repeats)


def measure(n: int, size: int, cin: int, cout: int, k: int, s: int) -> list[str]:
    """The table's cells for one shape."""
    x = jax.random.normal(jax.random.key(0), (n, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
    y = _conv(x, w, s)
    g = jax.random.normal(jax.random.key(2), y.shape)
    gflop = 2 * y.size * k * k * cin / 1e9
    dx_native = jax.jit(lambda x, w, g: jax.vjp(lambda x: _conv(x, w, s), x)[1](g)[0])
    dw_native = jax.jit(lambda x, w, g: jax.vjp(lambda w: _conv(x, w, s), w)[1](g)[0])
    ref_dx, ref_dw = dx_native(x, w, g), dw_native(x, w, g)
    cells = [f"{_rate(gflop, jax.jit(lambda x, w: _conv(x, w, s)), x, w):.0f}"]
    cells.append(f"{_rate(gflop, dx_native, x, w, g):.0f}")
    col2im = jax.jit(lambda g, w: dx_col2im(x.shape, g, w, k, s))
    err = float(jnp.abs(col2im(g, w) - ref_dx).max() / jnp.abs(ref_dx).max())
    cells.append(f"{_rate(gflop, col2im, g, w):.0f} ({err:.0e})")
    cells.append(f"{_rate(gflop, dw_native, x, w, g):.0f}")
    for form in (dw_im2col, dw_taps, dw_flat):
        if form is dw_flat and s != 1:
            cells.append("-")
            continue
        fn = jax.jit(functools.partial(form, k=k, s=s))
        err = float(jnp.abs(fn(x, g) - ref_dw).max() / jnp.abs(ref_dw).max())
        cells.append(f"{_rate(gflop, fn, x, g):.0f} ({err:.0e})")
    return cells


def main(argv):
    del argv
    print(f"{jax.devices()[0].platform} ({os.cpu_count()} cores); GFLOP/s (max relative difference to native)")
    columns = ("forward", "dx native", "dx col2im", "dW native", "dW im2col", "dW taps", "dW flat")
    print(f"{'shape (N,H,Cin,Cout,k,s)':<28}{'':<28}" + "".join(f"{c:>16}" for c in columns))
    for n, size, cin, cout, k, s, where in SHAPES:
        cells = measure(n, size, cin, cout, k, s)
        label = f"{(n, size, cin, cout, k, s)}"
        print(f"{label:<28}{where:<28}" + "".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    app.run(main)
