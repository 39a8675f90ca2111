"""Training data: JSON Lines rows -> token ids with the supervised (response) span marked.

A dataset is a directory holding ``train.jsonl`` (and optionally ``valid.jsonl`` / ``test.jsonl``),
as mlx-lm expects, or a single ``.jsonl`` file (training rows only). Each row is one of:

* ``{"messages": [...]}`` — rendered with the tokenizer's chat template; the loss is on the last
  assistant turn (earlier turns are context), as mlx-lm does;
* ``{"prompt": ..., "completion": ...}`` — through the chat template as a user turn and the model's
  reply when the tokenizer has one (so ``dgemma generate PROMPT`` asks what training taught), else
  raw text;
* ``{"text": ...}`` — every token after BOS is supervised.

The prompt is rendered exactly as generation renders it (``add_generation_prompt=True``), and a
reply ends with the template's end-of-turn token, so a trained model stops where it should.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import DGemmaError

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    ids: list[int]
    response_start: int  # first supervised position; the rest of ``ids`` is the response


@dataclass
class Dataset:
    examples: list[Example]
    truncated: int = 0  # rows cut to max_seq_length
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)


def find_data(path: str | Path) -> dict[str, Path]:
    """``{split: file}`` for a data directory or a single JSONL file (``train`` only)."""
    p = Path(path).expanduser()
    if p.is_file():
        return {"train": p}
    if not p.is_dir():
        raise DGemmaError(f"data path '{path}' does not exist")
    found = {s: p / f"{s}.jsonl" for s in SPLITS if (p / f"{s}.jsonl").is_file()}
    if "train" not in found:
        raise DGemmaError(f"{p}: no train.jsonl found")
    return found


def read_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, row)`` for each non-blank line; a malformed line raises naming file:line."""
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DGemmaError(f"{path}:{n}: not valid JSON ({e.msg})")
                if not isinstance(row, dict):
                    raise DGemmaError(f"{path}:{n}: expected a JSON object")
                yield n, row
    except UnicodeDecodeError:
        raise DGemmaError(f"{path}: not UTF-8 text")
    except OSError as e:
        raise DGemmaError(f"{path}: cannot read ({e.strerror})")


class Formatter:
    """Turns rows into :class:`Example` s for one tokenizer."""

    def __init__(self, tokenizer, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "has_chat_template", False))
        self.bos = getattr(tokenizer, "bos_token_id", None)
        self.turn_end = self._turn_end(eos_ids) if self.chat else None
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = eos if eos is not None else (eos_ids[0] if eos_ids else None)

    def _turn_end(self, eos_ids: list[int]) -> Optional[int]:
        # The end-of-turn token the template writes after a reply (Gemma: <turn|>).
        from ..generate import render_chat

        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        ids = render_chat(self.tokenizer, msgs, think=False, add_generation_prompt=False)
        for t in reversed(ids):
            if t in eos_ids:
                return t
        return None

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.bos is not None and (not ids or ids[0] != self.bos):
            return [self.bos] + ids
        return ids

    def __call__(self, row: dict, where: str) -> Example:
        from ..generate import render_chat

        def text(key: str, value) -> str:
            if not isinstance(value, str):
                raise DGemmaError(f"{where}: '{key}' must be a string")
            return value

        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
                raise DGemmaError(f"{where}: 'messages' must be a non-empty list of objects")
            if msgs[-1].get("role") != "assistant":
                raise DGemmaError(f"{where}: the last message must be the assistant's (it is supervised)")
            if not self.chat:
                raise DGemmaError(f"{where}: 'messages' rows need a tokenizer with a chat template")
            prompt = render_chat(self.tokenizer, msgs[:-1], think=False)
            reply = self._encode(text("content", msgs[-1].get("content")))
            return self._reply(prompt, reply, where)
        if "prompt" in row and "completion" in row:
            p, c = text("prompt", row["prompt"]), text("completion", row["completion"])
            if self.chat:
                prompt = render_chat(self.tokenizer, [{"role": "user", "content": p}], think=False)
            else:
                prompt = self._with_bos(self._encode(p))
            return self._reply(prompt, self._encode(c), where)
        if "text" in row:
            ids = self._with_bos(self._encode(text("text", row["text"])))
            start = 1 if self.bos is not None else 0
            if len(ids) <= start:
                raise DGemmaError(f"{where}: the row has no supervised token (empty text)")
            return Example(ids, start)
        raise DGemmaError(f"{where}: a row needs 'messages', 'prompt' and 'completion', or 'text'")

    def _reply(self, prompt: list[int], reply: list[int], where: str) -> Example:
        end = self.turn_end if self.chat else self.eos
        response = reply + ([end] if end is not None else [])
        if not reply:
            raise DGemmaError(f"{where}: the row has no supervised token (empty completion)")
        return Example(prompt + response, len(prompt))


def load_split(path: Path, formatter: Formatter, max_seq_length: Optional[int]) -> Dataset:
    """Every row of one JSONL file, tokenized; rows longer than ``max_seq_length`` are truncated
    (and counted); a row whose supervised part does not survive truncation is an error."""
    examples, truncated = [], 0
    for n, row in read_rows(path):
        where = f"{path}:{n}"
        ex = formatter(row, where)
        if max_seq_length and len(ex.ids) > max_seq_length:
            truncated += 1
            ex = Example(ex.ids[:max_seq_length], ex.response_start)
            if ex.response_start >= len(ex.ids):
                raise DGemmaError(
                    f"{where}: the prompt fills --max-seq-length ({max_seq_length}); no supervised token is left"
                )
        examples.append(ex)
    if not examples:
        raise DGemmaError(f"{path}: no rows")
    return Dataset(examples, truncated, str(path))


def load_datasets(path, tokenizer, eos_ids: list[int], max_seq_length: Optional[int]) -> dict[str, Dataset]:
    formatter = Formatter(tokenizer, eos_ids)
    return {split: load_split(p, formatter, max_seq_length) for split, p in find_data(path).items()}


@dataclass
class Batch:
    input_ids: np.ndarray  # int32 [B, L], right-padded
    attention_mask: np.ndarray  # int32 [B, L]
    response_mask: np.ndarray  # int32 [B, L]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: list[Example], pad_id: int = 0, multiple: int = 8) -> Batch:
    """Right-pad to the longest row, rounded up to ``multiple`` (fewer distinct shapes)."""
    L = max(len(e.ids) for e in examples)
    L = -(-L // multiple) * multiple
    B = len(examples)
    ids = np.full((B, L), pad_id, np.int32)
    am = np.zeros((B, L), np.int32)
    rm = np.zeros((B, L), np.int32)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = e.ids
        am[i, :n] = 1
        rm[i, e.response_start : n] = 1
    return Batch(ids, am, rm)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of one epoch: a seeded shuffle, full batches only (one short
    batch when the set is smaller than a batch)."""
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    if n < batch_size:
        return [perm.tolist()]
    return [perm[i : i + batch_size].tolist() for i in range(0, n - batch_size + 1, batch_size)]


def iterate_batches(dataset: Dataset, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
    """``(iteration, batch)`` forever from iteration ``start``: epoch after epoch, each reshuffled;
    the order depends only on ``seed`` so a resumed run sees the batches it would have seen."""
    per_epoch = len(batch_order(len(dataset), batch_size, seed, 0))
    it = start
    while True:
        epoch, index = divmod(it, per_epoch)
        order = batch_order(len(dataset), batch_size, seed, epoch)
        yield it, collate([dataset.examples[i] for i in order[index]])
        it += 1


def fixed_batches(dataset: Dataset, batch_size: int, limit: Optional[int] = None) -> list[Batch]:
    """The dataset in order, in batches (evaluation); at most ``limit`` batches (None or
    negative: all)."""
    out = []
    for i in range(0, len(dataset), batch_size):
        if limit is not None and 0 <= limit <= len(out):
            break
        out.append(collate(dataset.examples[i : i + batch_size]))
    return out
