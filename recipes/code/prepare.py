"""Make the code recipe's data, tokenizer and base model directory from the Python standard
library's own source (every machine has it), deterministically.

    python recipes/code/prepare.py --out recipes/code/work

* files: every ``.py`` under the running Python's stdlib, minus test suites and site-packages;
  about 1 file in 25 (by a hash of its relative path) is held out for evaluation (``test``), and
  as many again for validation;
* tokenizer: a SentencePiece BPE model (byte fallback, 4096 pieces) trained on the training files,
  converted to a fast ``tokenizer.json``;
* data: ``{"text": ...}`` rows, each a chunk of a file cut at top-level statement boundaries to at
  most ``--chunk-tokens`` tokens;
* ``OUT/base``: ``config.json`` (DiffusionGemma's architecture, small), ``generation_config.json``
  and the tokenizer, for ``dgemma train --from-scratch``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import tempfile
from pathlib import Path

from dgemma_mlx.config import small_model_config
from dgemma_mlx.settings import REFERENCE_GENERATION_CONFIG

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = 4096
SKIP_DIRS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "lib2to3", "turtledemo"}

TEXT_SHAPE = dict(  # the rest of the config: dgemma_mlx.config.small_model_config
    vocab_size=VOCAB,
    hidden_size=192,
    intermediate_size=384,
    moe_intermediate_size=96,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    global_head_dim=96,
    num_global_key_value_heads=1,
    sliding_window=128,
    num_experts=4,
    top_k_experts=2,
    max_position_embeddings=4096,
)
CANVAS = 64
GENERATION_CONFIG = {
    **REFERENCE_GENERATION_CONFIG,  # the reference sampler ...
    "t_max": 0.6,  # ... with this model's temperatures (README: "The sampler's temperatures")
    "t_min": 0.3,
    "max_new_tokens": 128,
    "bos_token_id": 2,
    "eos_token_id": [1],
    "pad_token_id": 0,
}


def split_of(rel: str) -> str:
    h = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 25
    return "test" if h == 0 else "valid" if h == 1 else "train"


def source_files(root: Path) -> dict[str, list[Path]]:
    out = {"train": [], "valid": [], "test": []}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        try:
            f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out[split_of(str(rel))].append(f)
    return out


def train_tokenizer(files: list[Path], dst: Path) -> None:
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        with open(corpus, "w", encoding="utf-8") as f:
            for p in files:
                f.write(p.read_text(encoding="utf-8") + "\n")
        prefix = str(Path(tmp) / "sp")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=prefix, vocab_size=VOCAB, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", max_sentence_length=1 << 16,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
            unk_piece="<unk>", user_defined_symbols=["\n", "    ", "\t"],
            input_sentence_size=2_000_000, shuffle_input_sentence=True, seed_sentencepiece_size=200_000,
            num_threads=2, minloglevel=2,
        )
        _write_fast_tokenizer(prefix + ".model", dst)


def _write_fast_tokenizer(model_file: str, dst: Path) -> None:
    """The SentencePiece BPE model as a Gemma-style fast tokenizer (``tokenizer.json``): the same
    pieces and merges, byte fallback, BOS added."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_file)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # BPE merges in the order SentencePiece learned them (a merged piece's id is its rank).
    merges = sorted(
        ((vocab[p], vocab[p[:k]], vocab[p[k:]]), (p[:k], p[k:]))
        for p in vocab
        if len(p) > 1 and not sp.is_control(vocab[p]) and not sp.is_byte(vocab[p])
        for k in range(1, len(p))
        if p[:k] in vocab and p[k:] in vocab
    )
    merges = [m for _, m in merges]
    bpe = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(dst))


def chunks(text: str, tokenizer, limit: int) -> list[str]:
    """Cut a file at top-level statement boundaries (lines starting a column-0 statement) into
    pieces of at most ``limit`` tokens; an over-long statement is cut at line boundaries."""
    blocks, cur = [], []
    for line in text.splitlines(keepends=True):
        if cur and line[:1] not in ("", " ", "\t", "\n", ")", "]", "}", "#") and not line.startswith(("else", "elif", "except", "finally")):
            blocks.append("".join(cur))
            cur = []
        cur.append(line)
    if cur:
        blocks.append("".join(cur))
    out, piece, n = [], "", 0
    for b in blocks:
        t = len(tokenizer.encode(b, add_special_tokens=False))
        if t > limit:
            lines = b.splitlines(keepends=True)
            for ln in lines:
                lt = len(tokenizer.encode(ln, add_special_tokens=False))
                if n + lt > limit and piece:
                    out.append(piece)
                    piece, n = "", 0
                piece += ln
                n += lt
            continue
        if n + t > limit and piece:
            out.append(piece)
            piece, n = "", 0
        piece += b
        n += t
    if piece.strip():
        out.append(piece)
    return [p for p in out if p.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "work")
    p.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    p.add_argument("--chunk-tokens", type=int, default=255)
    a = p.parse_args()
    files = source_files(a.stdlib)
    base = a.out / "base"
    base.mkdir(parents=True, exist_ok=True)
    train_tokenizer(files["train"], base)
    config = small_model_config(CANVAS, **TEXT_SHAPE)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    data = a.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    manifest = {"python": sys.version.split()[0], "stdlib": str(a.stdlib)}
    for split, fs in files.items():
        rows = 0
        with open(data / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for path in fs:
                for piece in chunks(path.read_text(encoding="utf-8"), tok, a.chunk_tokens):
                    f.write(json.dumps({"text": piece}) + "\n")
                    rows += 1
        manifest[split] = {"files": [str(x.relative_to(a.stdlib)) for x in fs], "rows": rows}
        print(f"{split}: {len(fs)} files, {rows} rows")
    (a.out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
