"""Torch references for the block-diffusion training loss, on ``DiffusionGemmaForBlockDiffusion``.

* :func:`trl_loss` — TRL's batched formulation (``examples/scripts/sft_diffusion_gemma.py``): one
  forward whose encoder cache covers the whole sequence, the denoiser's view cut by the attention
  mask. It matches inference only while sequences fit the sliding window.
* :func:`inference_loss` — per example, as inference runs: the clean tokens before the block are
  encoded into a ``DynamicCache`` and the decoder reads exactly that cache; the encoder loss comes
  from the full-sequence encoder.

Both take numpy batches (right-padded ``ids`` / ``attention`` / ``response`` [B, L], ``block`` [B],
``canvas`` [B, C], ``sc`` [B]) and return torch scalars ``(loss, diffusion, encoder)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def batch(rng, lengths, prompts, vocab_size: int, low: int = 3):
    """A right-padded batch of random sequences: ``(ids, attention, response)`` int arrays [B, L]."""
    B, L = len(lengths), max(lengths)
    ids = np.zeros((B, L), np.int64)
    am = np.zeros((B, L), np.int64)
    rm = np.zeros((B, L), np.int64)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        ids[b, :n] = rng.integers(low, vocab_size, n)
        am[b, :n] = 1
        rm[b, p:n] = 1
    return ids, am, rm


def clean_canvas(ids, rm, block, canvas_length: int, eos: int):
    """The clean canvas [B, C] and the block's start (cache length) [B], as numpy."""
    B, L = ids.shape
    start = rm.argmax(1)
    length = rm.sum(1)
    cut = start + block * canvas_length
    offsets = np.arange(canvas_length)
    pos = np.minimum(cut[:, None] + offsets, L - 1)
    inside = offsets[None] < (length - block * canvas_length)[:, None]
    return np.where(inside, np.take_along_axis(ids, pos, 1), eos), cut


def _softcap(ref, logits):
    cap = ref.config.text_config.final_logit_softcapping
    logits = logits.float()
    return torch.tanh(logits / cap) * cap if cap else logits


def encoder_loss(ref, ids, am):
    """Mean causal next-token cross-entropy of the encoder over every valid pair (torch scalar)."""
    input_ids, attention = torch.tensor(ids), torch.tensor(am)
    hidden = ref.model.encoder(input_ids=input_ids, attention_mask=attention).last_hidden_state
    logits = _softcap(ref, ref.lm_head(hidden))
    pairs = attention[:, :-1].bool() & attention[:, 1:].bool()
    targets = torch.where(pairs, input_ids[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)


def trl_loss(ref, ids, am, rm, block, canvas, sc, eos: int, encoder_weight: float = 1.0):
    C = canvas.shape[1]
    B, L = ids.shape
    target, cut = clean_canvas(ids, rm, block, C, eos)
    input_ids, attention = torch.tensor(ids), torch.tensor(am)
    cut_t = torch.tensor(cut)
    offsets = torch.arange(C)
    cache_mask = (torch.arange(L) < cut_t[:, None]).long()
    kw = dict(
        input_ids=input_ids, attention_mask=attention, decoder_input_ids=torch.tensor(canvas),
        decoder_attention_mask=torch.cat([cache_mask, torch.ones(B, C, dtype=torch.long)], 1),
        decoder_position_ids=cut_t[:, None] + offsets,
    )
    with torch.no_grad():
        kw["self_conditioning_logits"] = ref(**kw).logits
    kw["self_conditioning_mask"] = torch.tensor(sc)
    out = ref(**kw)
    dl = F.cross_entropy(out.logits.flatten(0, 1), torch.tensor(target).flatten())
    logits = _softcap(ref, ref.lm_head(out.encoder_last_hidden_state))
    pairs = attention[:, :-1].bool() & attention[:, 1:].bool()
    targets = torch.where(pairs, input_ids[:, 1:], -100)
    el = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    return dl + encoder_weight * el, dl, el


def _denoise(ref, prefix_ids, canvas, sc_logits=None, sc_mask=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    ref.model.encoder(input_ids=torch.tensor(prefix_ids)[None], cache=cache, use_cache=True)
    kw = {}
    if sc_logits is not None:
        kw = dict(self_conditioning_logits=sc_logits, self_conditioning_mask=sc_mask)
    return ref(cache=cache, decoder_input_ids=torch.tensor(canvas)[None], **kw).logits[0]


def inference_loss(ref, ids, am, rm, block, canvas, sc, eos: int, encoder_weight: float = 1.0):
    C = canvas.shape[1]
    target, cut = clean_canvas(ids, rm, block, C, eos)
    ces = []
    for b in range(ids.shape[0]):
        prefix = ids[b, : cut[b]]
        with torch.no_grad():
            first = _denoise(ref, prefix, canvas[b])
        logits = _denoise(ref, prefix, canvas[b], first[None], torch.tensor([bool(sc[b])]))
        ces.append(F.cross_entropy(logits, torch.tensor(target[b]), reduction="none"))
    dl = torch.cat(ces).mean()
    el = encoder_loss(ref, ids, am)
    return dl + encoder_weight * el, dl, el


def write_jsonl(path, rows) -> None:
    """Write ``rows`` (dicts) as JSON Lines into ``path`` (parents created)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def reverse_rows(n: int, digits: int, seed: int = 0) -> list[dict]:
    """``n`` prompt/completion rows: a digit string and its reverse."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        x = "".join(rng.choice("0123456789") for _ in range(digits))
        rows.append({"prompt": x, "completion": x[::-1]})
    return rows
