"""Small array helpers shared by the model, the experts and the sampler.

MLX's CPU backend runs each op on one core (BLAS calls excepted): independent work is spread over
two streams (:func:`compute_streams`, :func:`rows_in_parallel`).

MLX's ``mx.compile`` fuses elementwise ops into one kernel: a clear win on the GPU, but on the CPU
backend the compiled kernels are slower than the plain ops (measured here: exp(s - m) over 35M
scores 703 ms compiled against 577 ms plain; a gated-GELU over [2448, 1408] 62 against 49 ms).
:func:`fused` compiles for the GPU and leaves CPU code plain.
"""

from __future__ import annotations

import os
import threading
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


# The kernel switch: "cpu" uses the techniques measured fast on MLX's CPU backend (attention merged
# across parts, base-2 exponentials, work spread over two streams, plain uncompiled elementwise
# ops, grouped experts); "fused" the GPU path (MLX's fused attention and compiled elementwise ops,
# gathered experts, one stream). "auto" picks by the default device. Tests select either on the CPU.
KERNELS = ("auto", "cpu", "fused")
_kernels = os.environ.get("DGEMMA_KERNELS", "auto")


def set_kernels(mode: str) -> None:
    global _kernels
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}")
    _kernels = mode


def cpu_kernels() -> bool:
    """Whether the CPU techniques are on (see :func:`set_kernels`)."""
    return _kernels == "cpu" or (_kernels == "auto" and on_cpu())


def rms_norm_noscale(x: mx.array, eps: float) -> mx.array:
    return mx.fast.rms_norm(x, None, eps)


def fused(fn: Callable) -> Callable:
    """``fn`` compiled with ``mx.compile`` when running on the GPU, plain on the CPU."""
    compiled = mx.compile(fn)

    def run(*args):
        return fn(*args) if cpu_kernels() else compiled(*args)

    run.__doc__ = fn.__doc__
    run.__name__ = fn.__name__
    return run


@fused
def gelu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """``gelu_tanh(gate) * up`` (the gated MLP activation)."""
    return nn.gelu_approx(gate) * up


LOG2E = 1.4426950408889634

# On MLX's CPU backend ``power(2, x)`` runs twice as fast as ``exp`` (114 against 230 ms for 16.8M
# floats here) at the same accuracy, so exponentials are taken in base 2 on scores in log2 units.


@fused
def shifted_exp2(s: mx.array, m: mx.array) -> mx.array:
    """``2 ** (s - m)``."""
    return mx.power(2.0, s - m)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, in float32 (base-2 exponentials, see :data:`LOG2E`)."""
    x = x.astype(mx.float32)
    e = shifted_exp2(x * LOG2E, x.max(axis=-1, keepdims=True) * LOG2E)
    return e / e.sum(axis=-1, keepdims=True)


# MLX streams belong to the thread that made them, so each thread gets its own (a server runs
# generation on a worker thread).
_STREAMS = threading.local()


def compute_streams() -> list:
    """Streams of the default device to spread independent work over: two on the CPU (MLX runs
    an op on one core, so elementwise-heavy work parallelises across streams), one elsewhere.
    Each thread gets its own streams."""
    device = mx.default_device()
    key = (str(device), cpu_kernels())
    streams_by_device = _STREAMS.__dict__.setdefault("by_device", {})
    if key not in streams_by_device:
        streams = [mx.default_stream(device)]
        if cpu_kernels() and on_cpu() and (os.cpu_count() or 1) > 1:
            streams.append(mx.new_stream(device))
        streams_by_device[key] = streams
    return streams_by_device[key]


def split_range(n: int) -> list[tuple[int, int]]:
    """``[0, n)`` cut into one contiguous range per compute stream (fewer when n is small)."""
    parts = max(1, min(n, len(compute_streams())))
    bounds = [n * i // parts for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def rows_in_parallel(fn, x: mx.array) -> mx.array:
    """``fn(x)`` for a row-wise elementwise ``fn`` of x [..., L, D], with the rows spread over
    :func:`compute_streams`: the vocabulary-sized soft cap and self-conditioning softmax would
    otherwise run on one CPU core. (Matmuls stay on one stream: two concurrent BLAS calls only
    contend for the same cores.)"""
    ranges = split_range(x.shape[-2])
    if len(ranges) == 1:
        return fn(x)
    parts = []
    for (a, b), stream in zip(ranges, compute_streams()):
        with mx.stream(stream):
            parts.append(fn(x[..., a:b, :]))
    return mx.concatenate(parts, axis=-2)
