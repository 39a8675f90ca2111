"""Random float32 DiffusionGemma checkpoints for the benchmark, built once with transformers.

Each named config is a :class:`BenchSpec` (``tests/tiny.py``'s ``TinySpec`` plus explicit layer types).
:func:`ensure_checkpoint` builds the checkpoint in a subprocess (so the parent never holds the torch
copy), into ``<cache-dir>/<config>-<hash>/``, and reuses it on later runs. The checkpoint is an
original transformers checkpoint in the released config form (``global_head_dim`` /
``num_global_key_value_heads``), so all three implementations load the same files.

Run as a script to build one directly: ``python benchmarks/checkpoints.py mid [--cache-dir DIR]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

import tiny  # noqa: E402  (tests/tiny.py: make_reference_model, save_reference, write_tokenizer)

SLIDING, FULL = "sliding_attention", "full_attention"
BUILDER_VERSION = 1  # bump when the way checkpoints are built changes (invalidates the cache)


@dataclass
class BenchSpec(tiny.TinySpec):
    """``TinySpec`` with explicit ``layer_types`` (written into the text config)."""

    layer_types: Optional[list] = None

    def text_config(self) -> dict:
        config = super().text_config()
        if self.layer_types:
            config["layer_types"] = list(self.layer_types)
        return config


def layer_pattern(n: int) -> list[str]:
    """The real 5 sliding : 1 full pattern, with the last layer full (so 2 layers = sliding, full)."""
    return [FULL if (i + 1) % 6 == 0 or i == n - 1 else SLIDING for i in range(n)]


def spec_for(config: str, layers: Optional[int] = None) -> BenchSpec:
    """The named config's shapes; ``layers`` overrides its layer count."""
    if config == "tiny":
        n = layers or 2
        return BenchSpec(
            hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=n,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, sliding_window=64, num_experts=8, top_k_experts=2,
            canvas_length=256, vocab_size=1024, max_position_embeddings=262_144,
            layer_types=layer_pattern(n),
        )
    if config == "mid":
        n = layers or 6
        return BenchSpec(
            hidden_size=1024, intermediate_size=768, moe_intermediate_size=256, num_hidden_layers=n,
            num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
            num_global_key_value_heads=2, sliding_window=1024, num_experts=32, top_k_experts=4,
            canvas_length=256, vocab_size=32_768, max_position_embeddings=262_144,
            layer_types=layer_pattern(n),
        )
    if config == "real-shape":
        # Three layers (sliding, sliding, full): the real per-layer shapes, two thirds of the
        # layers sliding (the real model: five sixths), ~10 GB in float32.
        n = layers or 3
        return BenchSpec(
            hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_hidden_layers=n,
            num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
            num_global_key_value_heads=2, sliding_window=1024, num_experts=128, top_k_experts=8,
            canvas_length=256, vocab_size=32_768, max_position_embeddings=262_144,
            layer_types=layer_pattern(n),
        )
    raise ValueError(f"unknown config '{config}' (choose from {', '.join(CONFIGS)})")


CONFIGS = ("tiny", "mid", "real-shape")


def spec_dict(spec: BenchSpec) -> dict:
    return asdict(spec)


def spec_from_dict(d: dict) -> BenchSpec:
    names = {f.name for f in fields(BenchSpec)}
    return BenchSpec(**{k: v for k, v in d.items() if k in names})


def param_count(spec: BenchSpec) -> int:
    """Text-stack parameters (embedding counted once: the head is tied)."""
    H, I, Im, E = spec.hidden_size, spec.intermediate_size, spec.moe_intermediate_size, spec.num_experts
    total = spec.vocab_size * H + 3 * H * I  # embedding + self-conditioning MLP
    for t in spec.layer_types or layer_pattern(spec.num_hidden_layers):
        if t == FULL:
            hd, kv, v = spec.global_head_dim, spec.num_global_key_value_heads, 0
        else:
            hd, kv, v = spec.head_dim, spec.num_key_value_heads, 1
        q = spec.num_attention_heads * hd
        total += H * (2 * q + kv * hd * (1 + v))  # q, o, k, (v)
        total += 3 * H * I + H * E + E * 3 * H * Im  # dense MLP, router, experts
    return total


def cache_key(config: str, spec: BenchSpec, seed: int) -> str:
    blob = json.dumps({"spec": spec_dict(spec), "seed": seed, "v": BUILDER_VERSION}, sort_keys=True)
    return f"{config}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def build(spec: BenchSpec, out: Path, seed: int = 0) -> Path:
    """Make a random reference model with transformers and save it (with a tokenizer covering the
    whole vocabulary, so every generated id decodes) into ``out``."""
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = tiny.make_reference_model(spec, seed)
    tiny.VOCAB_SIZE = spec.vocab_size  # write_tokenizer sizes its vocabulary from this
    size_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    shard = "2GB" if size_gb > 0.5 else "200MB"
    tiny.save_reference(model, out, config_form="real", max_shard_size=shard)
    return out


def ensure_checkpoint(
    config: str, cache_dir: Path, *, layers: Optional[int] = None, seed: int = 0, log=print,
    spec: Optional[BenchSpec] = None,
) -> tuple[Path, BenchSpec, bool]:
    """The cached checkpoint for ``config`` (built in a subprocess when missing). ``spec`` gives
    the shapes explicitly (``config`` then only names the cache entry); by default they are the
    named config's (:func:`spec_for`).

    Returns ``(path, spec, built_now)``."""
    spec = spec if spec is not None else spec_for(config, layers)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / cache_key(config, spec, seed)
    if (path / "config.json").exists() and (path / ".complete").exists():
        return path, spec, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    gb = param_count(spec) * 4 / 1e9
    log(f"building the '{config}' checkpoint ({gb:.2f} GB float32 text weights) into {path} ...")
    t = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "_build", json.dumps(spec_dict(spec)), str(tmp), str(seed)]
    proc = subprocess.run(cmd, env=_quiet_env())
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"building the '{config}' checkpoint failed (exit {proc.returncode})")
    (tmp / "bench_spec.json").write_text(json.dumps({"config": config, "seed": seed, "spec": spec_dict(spec)}, indent=2))
    (tmp / ".complete").write_text("")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    log(f"built in {time.perf_counter() - t:.0f} s")
    return path, spec, True


def _quiet_env() -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def main(argv: list[str]) -> int:
    if argv and argv[0] == "_build":
        spec = spec_from_dict(json.loads(argv[1]))
        build(spec, Path(argv[2]), int(argv[3]))
        return 0
    import argparse

    p = argparse.ArgumentParser(description="Build (or find) a cached benchmark checkpoint.")
    p.add_argument("config", choices=CONFIGS)
    p.add_argument("--cache-dir", default="~/.cache/dgemma-bench")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path, _, _ = ensure_checkpoint(a.config, Path(a.cache_dir), layers=a.layers, seed=a.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
