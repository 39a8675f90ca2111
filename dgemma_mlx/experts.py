"""The mixture-of-experts block: only the top-k experts' weights are used per token.

Two ways to run the same computation, chosen by measurement (see ``benchmarks/``):

* ``"gather"`` — token/expert pairs sorted by expert and fed to gathered matmuls
  (``mx.gather_mm`` / ``mx.gather_qmm`` through mlx-lm's ``SwitchLinear``). No host
  synchronisation; the fast path on Metal and for quantized experts.
* ``"grouped"`` — pairs sorted by expert and packed into one zero-padded [M, H] matrix per used
  expert, so the gathered matmul makes one ordinary BLAS call per expert (weights read once)
  instead of one per token. On MLX's CPU backend a per-token gathered matmul is memory bound
  (~8 GFLOP/s at the real shapes: every token re-reads a 16 MB expert); separate matmul ops per
  expert pay MLX's per-op cost 256 times a layer. Needs the per-expert counts on the host: one
  small synchronisation per layer.

``"auto"`` picks ``"grouped"`` for float experts on the CPU and ``"gather"`` otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
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
        """[N, H] -> [N, k, H]: each used expert's rows as one matrix, one BLAS call per expert.

        The rows routed to each used expert are packed into a [G, M, H] tensor (G used experts,
        M the largest row count, shorter groups zero-padded), so one gathered matmul makes one
        ordinary [M, H] x [H, out] product per expert and reads each expert's weights once.
        """
        N, k = idx.shape
        E = self.gate_up_proj.num_experts
        flat = idx.flatten()
        order = mx.argsort(flat)
        sorted_experts = flat[order]
        counts = (flat[:, None] == mx.arange(E, dtype=flat.dtype)[None]).sum(axis=0)
        counts_h = np.array(counts)  # the one host synchronisation of this layer
        used = np.flatnonzero(counts_h)
        M = int(counts_h.max())
        starts = np.concatenate([[0], np.cumsum(counts_h)[:-1]]).astype(np.int32)
        group = np.zeros(E, np.int32)
        group[used] = np.arange(len(used), dtype=np.int32)
        rank = mx.arange(flat.size, dtype=mx.int32) - mx.array(starts)[sorted_experts]
        slot = mx.array(group)[sorted_experts] * M + rank  # row of each sorted pair in the packing
        G = len(used)
        packed = mx.zeros((G * M, x.shape[-1]), x.dtype)
        packed[slot] = x[order // k]
        experts = mx.array(used.astype(np.uint32))
        h = self.gate_up_proj(packed.reshape(G, M, -1), experts)
        y = self.down_proj(_geglu_fused(h), experts).reshape(G * M, -1)
        return y[slot][mx.argsort(order)].reshape(N, k, -1)
