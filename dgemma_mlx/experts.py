"""The mixture-of-experts block: only the top-k experts' weights are used per token.

Two ways to run the same computation, chosen by measurement (``benchmarks/bench.py --experts
all``):

* ``"gather"`` — token/expert pairs sorted by expert and fed to gathered matmuls
  (``mx.gather_mm`` / ``mx.gather_qmm`` through mlx-lm's ``SwitchLinear``). No host
  synchronisation; the fast path on Metal and for quantized experts.
* ``"grouped"`` — the rows routed to each expert are packed into one zero-padded [M, H] block, so
  a gathered matmul makes one ordinary BLAS call per expert (its weights read once) instead of one
  per token. On MLX's CPU backend a per-token gathered matmul re-reads a 16 MB expert for every
  token (~8 GFLOP/s at the real shapes), and separate matmul ops per expert pay MLX's per-op cost
  hundreds of times a layer. Needs the per-expert counts on the host: one small synchronisation
  per layer.

* ``"dense"`` — every expert on every token as one batched matmul, weighted by a dense routing
  matrix (zero for experts a token does not use). ``num_experts / top_k`` times the expert FLOPs,
  but no gathers, scatters or host synchronisation: the fast path for training small models with
  few experts, and traceable by ``mx.compile``.

``"auto"`` picks ``"dense"`` for float experts when there are at most twice as many experts as a
token uses, else ``"grouped"`` for float experts on the CPU and ``"gather"`` otherwise.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchLinear, _gather_sort, _scatter_unsort

from .ops import cpu_kernels, gelu_mul, on_cpu

def geglu(h: mx.array) -> mx.array:
    """:func:`gelu_mul` for ``h`` = [..., 2I] holding gate then up (fused expert projections)."""
    gate, up = mx.split(h, 2, axis=-1)
    return gelu_mul(gate, up)


class Experts(nn.Module):
    """``num_experts`` gated-GELU experts stored fused: ``gate_up_proj`` [E, 2I, H] (gate rows
    first) and ``down_proj`` [E, H, I]."""

    def __init__(self, dims: int, hidden: int, num_experts: int, top_k: int = 1):
        super().__init__()
        self.top_k = top_k
        self.gate_up_proj = SwitchLinear(dims, 2 * hidden, num_experts, bias=False)
        self.down_proj = SwitchLinear(hidden, dims, num_experts, bias=False)
        self.strategy = "auto"

    @property
    def quantized(self) -> bool:
        return not isinstance(self.gate_up_proj, SwitchLinear)

    def resolved_strategy(self) -> str:
        if self.strategy != "auto":
            return self.strategy
        if not self.quantized and self.gate_up_proj.num_experts <= 2 * self.top_k:
            return "dense"  # at most twice the expert FLOPs, none of the routing overhead
        return "grouped" if cpu_kernels() and not self.quantized else "gather"

    @property
    def host_syncs(self) -> bool:
        """Whether a call waits for the device (the grouped strategy reads the routing counts),
        which rules out ``mx.compile``."""
        strategy = self.resolved_strategy()
        if strategy == "dense" and not self.quantized:
            return False
        return strategy == "grouped" or self._needs_plain_matmul

    @property
    def _needs_plain_matmul(self) -> bool:
        # MLX's CPU gather_mm takes float32 only (its gather_qmm handles every dtype).
        return on_cpu() and not self.quantized and self.gate_up_proj.weight.dtype != mx.float32

    def __call__(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """``x`` [N, H], ``idx`` [N, k] expert ids, ``weights`` [N, k] -> weighted sum [N, H]."""
        strategy = self.resolved_strategy()
        if strategy == "dense" and not self.quantized:
            return self._dense(x, idx, weights)
        if strategy == "grouped" or self._needs_plain_matmul:
            return self._grouped(x, idx, weights)
        y = self._gather(x, idx)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)

    def _dense(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """[N, H] -> [N, H]: all experts on all rows, summed with a dense [E, N] weight matrix."""
        E = self.gate_up_proj.num_experts
        onehot = idx[..., None] == mx.arange(E, dtype=idx.dtype)  # [N, k, E]
        w = (onehot.astype(weights.dtype) * weights[..., None]).sum(axis=1).T[..., None]  # [E, N, 1]
        a = geglu(x[None] @ self.gate_up_proj.weight.swapaxes(-1, -2))  # [E, N, I]
        a = a * w.astype(a.dtype)
        return (a @ self.down_proj.weight.swapaxes(-1, -2)).sum(axis=0)

    def _gather(self, x: mx.array, idx: mx.array) -> mx.array:
        """[N, H] -> [N, k, H] with gathered matmuls."""
        x = mx.expand_dims(x, (-2, -3))  # [N, 1, 1, H]
        do_sort = idx.size >= 64
        inv = None
        indices = idx
        if do_sort:
            x, indices, inv = _gather_sort(x, idx)
        h = self.gate_up_proj(x, indices, sorted_indices=do_sort)
        y = self.down_proj(geglu(h), indices, sorted_indices=do_sort)
        if do_sort:
            y = _scatter_unsort(y, inv, idx.shape)
        return y.squeeze(-2)

    def _grouped(self, x: mx.array, idx: mx.array, weights: mx.array) -> mx.array:
        """[N, H] -> [N, H]: each used expert's rows as one matrix, one BLAS call per expert.

        The rows routed to an expert are packed into an [M, H] block, M its row count rounded up
        to a BLAS-friendly size (:func:`padded_rows`); experts with the same M form a bucket
        [G, M, H] that one gathered matmul handles, reading each expert's weights once. Routing
        weights scale the activations (``w * (a @ Wd) == (w * a) @ Wd``), so the result is a
        gather and a sum over each token's k rows.
        """
        N, k = idx.shape
        E = self.gate_up_proj.num_experts
        flat = idx.flatten()
        order = mx.argsort(flat)
        sorted_experts = flat[order]
        counts = (flat[:, None] == mx.arange(E, dtype=flat.dtype)[None]).sum(axis=0)
        plan = PackingPlan(np.array(counts))  # the one host synchronisation of this layer
        rank = mx.arange(flat.size, dtype=mx.int32) - mx.array(plan.starts)[sorted_experts]
        slot = mx.array(plan.base)[sorted_experts] + rank  # packed row of each sorted pair
        source = mx.zeros((plan.rows,), mx.int32).at[slot].add(order // k)  # padding: token 0
        scale = mx.zeros((plan.rows, 1), mx.float32).at[slot].add(weights.flatten()[order][:, None])
        packed = x[source]
        outs = []
        for start, M, experts in plan.buckets:
            G, rows = len(experts), slice(start, start + len(experts) * M)
            ids = mx.array(experts)
            a = geglu(self._project(self.gate_up_proj, packed[rows].reshape(G, M, -1), ids))
            a = a * scale[rows].reshape(G, M, 1).astype(a.dtype)
            outs.append(self._project(self.down_proj, a, ids).reshape(G * M, -1))
        y = mx.concatenate(outs) if len(outs) > 1 else outs[0]
        token_slots = mx.zeros((flat.size,), mx.int32).at[order].add(slot).reshape(N, k)
        return y[token_slots].sum(axis=1)

    def _project(self, linear: nn.Module, x: mx.array, ids: mx.array) -> mx.array:
        """``x`` [G, M, in] times expert ``ids[g]``'s weight -> [G, M, out]."""
        if self._needs_plain_matmul:
            return x @ linear.weight[ids].swapaxes(-1, -2)
        return linear(x, ids)


def padded_rows(count: int) -> int:
    """Rows a block of ``count`` rows is padded to: a multiple of 8 up to 32, then of 16.

    Measured with OpenBLAS at the real expert shapes: an [M, 2816] x [2816, 1408] product costs
    about the same for M = 4 and 8, 16 is cheap, and odd sizes (e.g. 27, 44) cost more than the
    next multiple of 8 or 16."""
    step = 8 if count <= 32 else 16
    return -(-count // step) * step


class PackingPlan:
    """Where each expert's rows go in the packed matrix (host-side, from per-expert counts).

    Attributes:
        starts: [E] index of each expert's first row among the expert-sorted pairs.
        base: [E] first packed row of each expert's block.
        buckets: (first packed row, rows per expert M, uint32 expert ids) per block size.
        rows: total packed rows.
    """

    def __init__(self, counts: np.ndarray):
        counts = counts.astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
        self.base = np.zeros(len(counts), np.int32)
        self.buckets: list[tuple[int, int, np.ndarray]] = []
        used = np.flatnonzero(counts)
        sizes = np.array([padded_rows(int(c)) for c in counts[used]], np.int64)
        row = 0
        for M in np.unique(sizes):
            experts = used[sizes == M]
            self.base[experts] = row + M * np.arange(len(experts))
            self.buckets.append((row, int(M), experts.astype(np.uint32)))
            row += int(M) * len(experts)
        self.rows = row
