"""The mixture-of-experts block: only the top-k experts' weights are used per token.

Two ways to run the same computation, chosen by measurement (see ``benchmarks/``):

* ``"gather"`` — token/expert pairs sorted by expert and fed to gathered matmuls
  (``mx.gather_mm`` / ``mx.gather_qmm`` through mlx-lm's ``SwitchLinear``). No host
  synchronisation; the fast path on Metal and for quantized experts.
* ``"grouped"`` — pairs sorted by expert, then one ordinary matmul per expert over its rows.
  On MLX's CPU backend a gathered matmul runs one BLAS call per token (~8 GFLOP/s at the real
  shapes), while grouped matmuls reach the BLAS rate. Needs the per-expert counts on the host:
  one small synchronisation per layer.

``"auto"`` picks ``"grouped"`` for float experts on the CPU and ``"gather"`` otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

STRATEGIES = ("auto", "gather", "grouped")


@mx.compile
def _geglu_fused(h: mx.array) -> mx.array:
    gate, up = mx.split(h, 2, axis=-1)
    return nn.gelu_approx(gate) * up


class Experts(nn.Module):
    """``num_experts`` gated-GELU experts stored fused: ``gate_up_proj`` [E, 2I, H] (gate rows
    first) and ``down_proj`` [E, H, I]."""

    def __init__(self, dims: int, hidden: int, num_experts: int):
        super().__init__()
        self.gate_up_proj = SwitchLinear(dims, 2 * hidden, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden, dims, num_experts, bias=False)
        self.strategy = "auto"

    @property
    def quantized(self) -> bool:
        return not isinstance(self.gate_up_proj, SwitchLinear)

    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        on_cpu = mx.default_device().type == mx.DeviceType.cpu
        return "grouped" if on_cpu and not self.quantized else "gather"

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """``x`` [N, H], ``idx`` [N, k] expert ids, ``weights`` [N, k] -> weighted sum [N, H]."""
        if self.resolved_strategy() == "grouped":
            y = self._grouped(x, idx)
        else:
            y = self._gather(x, idx)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _gather(self, x: mx.array, idx: mx.array) -> mx.array:
        """[N, H] -> [N, k, H] with gathered matmuls."""
        x = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, H]
        do_sort = idx.size >= 64
        inv = None
        indices = idx
        if do_sort:
            x, indices, inv = _gather_sort(x, idx)
        h = self.gate_up_proj(x, indices, sorted_indices=do_sort)
        y = self.down_proj(_geglu_fused(h), indices, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, idx.shape)
        return y.squeeze(-2)

    def _grouped(self, x: mx.array, idx: mx.array) -> mx.array:
        """[N, H] -> [N, k, H] with one ordinary matmul per expert that has tokens."""
        N, k = idx.shape
        flat = idx.flatten()
        order = mx.argsort(flat)
        counts = (flat[:, None] == mx.arange(self.gate_up_proj.num_experts)[None]).sum(axis=0)
        xs = x[order // k]
        w_gu = self.gate_up_proj.weight
        w_d = self.down_proj.weight
        outs = []
        start = 0
        for e, c in enumerate(counts.tolist()):  # the one host synchronisation of this layer
            if c == 0:
                continue
            rows = xs[start : start + c]
            h = rows @ w_gu[e].T
            outs.append(_geglu_fused(h) @ w_d[e].T)
            start += c
        y = mx.concatenate(outs, axis=0)
        inv = mx.argsort(order)
        return y[inv].reshape(N, k, -1)
