"""The prefix KV cache that ``encode`` writes and ``denoise`` reads.

Keys and values are stored per layer as ``[B, kv_heads, T, head_dim]`` with RoPE already applied.

* Full-attention layers keep every cached token (:class:`FullAttentionCache`). Storage grows in
  place inside a preallocated buffer, so appending a block never copies the prefix unless the
  buffer must grow (geometrically, or never after :meth:`PrefixCache.reserve`).
* Sliding-window layers keep only the last ``window - 1`` tokens (:class:`SlidingWindowCache`):
  exactly what a canvas placed after the prefix may attend to. Their memory does not grow with the
  prompt.

``denoise`` never changes what the cache holds: it reads :meth:`prefix` views (and, with the fused
kernels, writes the canvas into a full-attention buffer's room past the prefix, see
:meth:`FullAttentionCache.with_canvas`).
For multi-turn chat, :meth:`PrefixCache.checkpoint` remembers the sliding windows at the current
length so the cache can later be rewound to it (:meth:`PrefixCache.rewind`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import mlx.core as mx

KV = tuple[mx.array, mx.array]


class _LayerCache:
    keys: Optional[mx.array] = None
    values: Optional[mx.array] = None

    def prefix(self) -> Optional[KV]:
        raise NotImplementedError

    def prefix_mask(self) -> Optional[mx.array]:
        """Additive mask over the :meth:`prefix` keys, or None when the canvas sees all of them."""
        return None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class FullAttentionCache(_LayerCache):
    """All cached keys/values of a full-attention layer."""

    def __init__(self) -> None:
        self.offset = 0
        self.reserved = 0  # capacity to allocate at the next growth

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _grow(self, like_k: mx.array, like_v: mx.array, needed: int) -> None:
        B, H, _, Dk = like_k.shape
        Dv = like_v.shape[3]
        cap = max(needed, 2 * self.capacity, self.reserved, 256)
        keys = mx.zeros((B, H, cap, Dk), like_k.dtype)
        values = mx.zeros((B, H, cap, Dv), like_v.dtype)
        if self.offset:
            keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = keys, values

    def append(self, keys: mx.array, values: mx.array) -> KV:
        """Store ``[B, H, L, D]`` new keys/values; return views of the whole prefix including them."""
        end = self.offset + keys.shape[2]
        if end > self.capacity:
            self._grow(keys, values, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def with_canvas(self, keys: mx.array, values: mx.array) -> KV:
        """Views of the prefix followed by a canvas's ``[B, H, C, D]`` keys/values, which are
        written into the buffer's room after the prefix (grown when needed). :attr:`offset` does
        not move, so the cache's content is unchanged (the next :meth:`append` overwrites the
        room): one contiguous key range for a fused attention kernel, without copying the prefix."""
        end = self.offset + keys.shape[2]
        if end > self.capacity:
            self._grow(keys, values, end)
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        return self.keys[..., :end, :], self.values[..., :end, :]

    def prefix(self) -> Optional[KV]:
        """Views of the cached keys/values (no copy), or None when empty."""
        if not self.offset:
            return None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def trim_to(self, length: int) -> None:
        self.offset = min(self.offset, length)


class SlidingWindowCache(_LayerCache):
    """The last ``window - 1`` keys/values of a sliding-window layer, oldest first."""

    def __init__(self, window: int) -> None:
        self.window = window

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: mx.array, values: mx.array) -> KV:
        """Store new keys/values and return the keys/values the new queries may need.

        The returned arrays hold the previously kept tokens followed by the new ones (so at most
        ``window - 1 + L`` tokens); the caller masks them to each query's window.
        """
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        keep = self.window - 1
        self.keys = keys[..., -keep:, :] if keys.shape[2] > keep else keys
        self.values = values[..., -keep:, :] if values.shape[2] > keep else values
        return keys, values

    def prefix(self) -> Optional[KV]:
        if self.keys is None:
            return None
        return self.keys, self.values


LayerCache = Union[FullAttentionCache, SlidingWindowCache]


@dataclass
class _Checkpoint:
    offset: int
    windows: list[Optional[KV]]


class PrefixCache:
    """The per-layer caches of one sequence (batch rows share the same length).

    Attributes:
        layers: one cache per transformer layer.
        offset: number of tokens encoded so far; the next canvas starts at this position.
    """

    max_checkpoints = 8

    def __init__(self, layers: list[LayerCache]) -> None:
        self.layers = layers
        self.offset = 0
        self._checkpoints: list[_Checkpoint] = []

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def reserve(self, total: int) -> None:
        """Make room for ``total`` tokens at the next allocation, so that appending the blocks of a
        generation never has to grow (copy) the full-attention buffers."""
        for c in self.layers:
            if isinstance(c, FullAttentionCache):
                c.reserved = max(c.reserved, total)

    def advance(self, n: int) -> None:
        """Record that ``n`` tokens were appended to every layer."""
        self.offset += n

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def arrays(self) -> list[mx.array]:
        """Every array the cache holds (for ``mx.eval``)."""
        out = []
        for c in self.layers:
            if c.keys is not None:
                out += [c.keys, c.values]
        return out

    def checkpoint(self) -> None:
        """Remember the sliding windows at the current length so :meth:`rewind` can return here."""
        if self._checkpoints and self._checkpoints[-1].offset == self.offset:
            return
        windows = [c.prefix() if isinstance(c, SlidingWindowCache) else None for c in self.layers]
        self._checkpoints.append(_Checkpoint(self.offset, windows))
        del self._checkpoints[: -self.max_checkpoints]

    def rewind(self, length: int, *, force: bool = False) -> int:
        """Shrink the cache to at most ``length`` tokens and return the length it now holds.

        Full-attention layers can be cut anywhere; sliding-window layers only at a checkpoint (their
        older tokens were dropped), so the result is the latest checkpoint at or before ``length``
        (0 when there is none: the cache is then empty). The caller re-encodes the tokens between
        the returned length and the length it wanted. ``force`` resets every layer even when
        ``length`` is not below :attr:`offset` (after an interrupted ``encode`` appended to some
        layers only).
        """
        if length >= self.offset and not force:
            return self.offset
        target = None
        for cp in reversed(self._checkpoints):
            if cp.offset <= length:
                target = cp
                break
        new_offset = target.offset if target else 0
        for i, c in enumerate(self.layers):
            if isinstance(c, FullAttentionCache):
                c.trim_to(new_offset)
            else:
                window = target.windows[i] if target else None
                c.keys, c.values = window if window is not None else (None, None)
        self.offset = new_offset
        self._checkpoints = [cp for cp in self._checkpoints if cp.offset <= new_offset]
        return new_offset
