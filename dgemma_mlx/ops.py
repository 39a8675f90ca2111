"""Small array helpers shared by the model and the experts.

MLX's ``mx.compile`` fuses elementwise ops into one kernel: a clear win on the GPU, but on the CPU
backend the compiled kernels are slower than the plain ops (measured here: exp(s - m) over 35M
scores 703 ms compiled against 577 ms plain; a gated-GELU over [2448, 1408] 62 against 49 ms).
:func:`fused` compiles for the GPU and leaves CPU code plain.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn


def on_cpu() -> bool:
    return mx.default_device().type == mx.DeviceType.cpu


def fused(fn: Callable) -> Callable:
    """``fn`` compiled with ``mx.compile`` when running on the GPU, plain on the CPU."""
    compiled = mx.compile(fn)

    def run(*args):
        return fn(*args) if on_cpu() else compiled(*args)

    run.__doc__ = fn.__doc__
    run.__name__ = fn.__name__
    return run


@fused
def gelu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """``gelu_tanh(gate) * up`` (the gated MLP activation)."""
    return nn.gelu_approx(gate) * up


@fused
def shifted_exp(s: mx.array, m: mx.array) -> mx.array:
    """``exp(s - m)``."""
    return mx.exp(s - m)
