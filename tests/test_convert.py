"""Weight conversion: layout of the output, quantized fidelity, atomic writes, bounded memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

import tiny
from dgemma_mlx import DGemmaError, load
from dgemma_mlx.convert import convert


def probe_logits(model, seed=7, self_conditioning=True):
    """Denoise logits for a fixed random prompt/canvas (with self-conditioning logits)."""
    rng = np.random.default_rng(seed)
    V, C = model.args.vocab_size, model.args.canvas_length
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, V, (1, 40))), cache)
    canvas = mx.array(rng.integers(0, V, (1, C)))
    sc = mx.array((rng.normal(size=(1, C, V)) * 3).astype(np.float32)) if self_conditioning else None
    return np.array(model.denoise(canvas, cache, sc))[0]


def cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def smooth_checkpoint(tmp_path_factory):
    """A residual-dominated random model (post-norm weights scaled by 0.2, as in trained
    transformers, where each sublayer adds a small update to the residual stream). In the default
    tiny model every sublayer rewrites the stream and tiny-router top-2 decisions flip under any
    perturbation, which amplifies 8-bit rounding chaotically (mean cosine ~0.98 for any bits)."""
    model = tiny.make_reference_model(seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".post_" in name and name.endswith("norm.weight"):
                p.mul_(0.2)
    return tiny.save_reference(model, tmp_path_factory.mktemp("smooth") / "checkpoint")


def test_float_conversion_reproduces_the_original(tmp_path, checkpoint, model):
    out = convert(checkpoint, tmp_path / "mlx", dtype="float32", shard_gb=0)
    converted, _ = load(out)
    assert np.array_equal(probe_logits(converted), probe_logits(model))


def test_output_has_config_shards_index_tokenizer_template_and_generation_config(tmp_path, checkpoint):
    out = convert(checkpoint, tmp_path / "mlx", shard_gb=0)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {p.name for p in out.glob("model-*.safetensors")}
    assert len(shards) > 1 and set(index.values()) == shards
    assert not any("lm_head" in k for k in index)
    assert sum(k.startswith("embed_tokens.") for k in index) == 1  # tied embedding stored once
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "diffusion_gemma"
    assert json.loads((out / "generation_config.json").read_text())["max_denoising_steps"] == 48
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_missing_generation_config_gets_the_reference_defaults(tmp_path, checkpoint):
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoint.iterdir():
        if f.name != "generation_config.json":
            (src / f.name).write_bytes(f.read_bytes())
    out = convert(src, tmp_path / "mlx")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["t_max"] == 0.8 and generation["sampler_config"]["entropy_bound"] == 0.1


@pytest.mark.parametrize("bits, min_cosine, min_top1", [(8, 0.99, 0.95), (4, 0.98, 0.9)])
def test_quantized_conversion_stays_close_to_float(tmp_path, smooth_checkpoint, bits, min_cosine, min_top1):
    base, _ = load(smooth_checkpoint)
    out = convert(smooth_checkpoint, tmp_path / f"q{bits}", quantize=True, q_bits=bits, q_group_size=32)
    quantized, _ = load(out)
    a, b = probe_logits(base), probe_logits(quantized)
    cos, top1 = cosine(a, b).mean(), (a.argmax(-1) == b.argmax(-1)).mean()
    print(f"{bits}-bit: mean cosine {cos:.5f}, top-1 agreement {top1:.3f}")
    assert cos >= min_cosine and top1 >= min_top1


def test_default_recipe_puts_experts_at_the_chosen_bits_and_the_rest_at_8(tmp_path, checkpoint):
    out = convert(checkpoint, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["layers.0.experts.gate_up_proj"]["bits"] == 4
    assert q["layers.0.experts.down_proj"]["bits"] == 4
    for path in ("embed_tokens", "layers.0.self_attn.q_proj", "layers.0.mlp.down_proj",
                 "layers.0.router.proj", "self_conditioning.gate_proj"):
        assert q[path]["bits"] == 8, path
    model, _ = load(out)
    assert model.layers[0].experts.quantized and model.layers[0].experts.gate_up_proj.bits == 4
    assert model.embed_tokens.bits == 8


def test_quantized_embedding_serves_the_self_conditioning_soft_embedding(tmp_path, smooth_checkpoint):
    out = convert(smooth_checkpoint, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    quantized, _ = load(out)
    base, _ = load(smooth_checkpoint)
    probs = mx.softmax(mx.array(np.random.default_rng(0).normal(size=(1, 4, base.args.vocab_size)).astype(np.float32)), -1)
    a = np.array(base.soft_embedding(probs))
    b = np.array(quantized.soft_embedding(probs))
    assert cosine(a, b).min() > 0.999


def test_existing_output_is_refused_without_force(tmp_path, checkpoint):
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DGemmaError, match="already exists"):
        convert(checkpoint, out)
    assert (out / "keep.txt").read_text() == "mine"


def test_force_replaces_the_output(tmp_path, checkpoint):
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert(checkpoint, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()


def test_failed_conversion_leaves_no_partial_output_and_keeps_the_old_one(tmp_path, checkpoint):
    out = tmp_path / "mlx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def explode(stage, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint, out, force=True, shard_gb=0, progress=explode)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlx"]


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(q_bits=3), "--q-bits"), (dict(q_group_size=48), "--q-group-size"), (dict(dtype="float8"), "--dtype")],
)
def test_bad_settings_are_rejected_before_any_work(tmp_path, checkpoint, kwargs, message):
    with pytest.raises(DGemmaError, match=message):
        convert(checkpoint, tmp_path / "mlx", quantize=True, **kwargs)
    assert not (tmp_path / "mlx").exists()


def test_already_quantized_source_cannot_be_quantized_again(tmp_path, checkpoint):
    q = convert(checkpoint, tmp_path / "q", quantize=True, q_group_size=32)
    with pytest.raises(DGemmaError, match="already quantized"):
        convert(q, tmp_path / "qq", quantize=True)


def test_conversion_peak_memory_stays_near_one_shard(tmp_path):
    """Convert a ~130 MB checkpoint shard by shard: MLX's peak stays far below the model size."""
    spec = tiny.TinySpec(hidden_size=256, moe_intermediate_size=256, num_experts=32, top_k_experts=4,
                         head_dim=32, global_head_dim=64)
    _, src = tiny.build_reference(tmp_path / "big", spec, config_form="real")
    total = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    code = (
        "import sys, mlx.core as mx\n"
        "from dgemma_mlx.convert import convert\n"
        "mx.reset_peak_memory()\n"
        f"convert({str(src)!r}, {str(tmp_path / 'out')!r}, quantize=True, shard_gb=0)\n"
        "print(mx.get_peak_memory())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ})
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1])
    print(f"checkpoint {total / 2**20:.0f} MiB, conversion peak {peak / 2**20:.0f} MiB")
    assert peak < 0.35 * total


def vision_probe(model):
    from PIL import Image

    from dgemma_mlx.image_processing import process_image
    from dgemma_mlx.multimodal import image_features

    pixels = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    return np.array(image_features(model, process_image(Image.fromarray(pixels), 70)))


def test_float_conversion_keeps_the_vision_tower(tmp_path, checkpoint, model):
    out = convert(checkpoint, tmp_path / "mlx", dtype="float32", shard_gb=0)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("vision_tower.") for k in index) and any(k.startswith("embed_vision.") for k in index)
    assert "vision_config" in json.loads((out / "config.json").read_text())
    converted, _ = load(out)
    assert np.array_equal(vision_probe(converted), vision_probe(model))


def test_quantized_conversion_keeps_vision_linears_at_8_bits(tmp_path, checkpoint, model):
    out = convert(checkpoint, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["vision_tower.encoder.layers.0.self_attn.q_proj.linear"]["bits"] == 8
    assert q["embed_vision.embedding_projection"]["bits"] == 8
    quantized, _ = load(out)
    a, b = vision_probe(model), vision_probe(quantized)
    assert cosine(a, b).min() > 0.99


def test_text_only_conversion_drops_the_vision_tower_and_keeps_the_text_model(tmp_path, checkpoint, model):
    out = convert(checkpoint, tmp_path / "text", dtype="float32", text_only=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("vision" in k for k in index)
    assert "vision_config" not in json.loads((out / "config.json").read_text())
    text_only, _ = load(out)
    assert getattr(text_only, "vision_tower", None) is None
    assert np.array_equal(probe_logits(text_only), probe_logits(model))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_permissions_follow_the_umask(tmp_path, checkpoint, umask, mode):
    old = os.umask(umask)
    try:
        out = convert(checkpoint, tmp_path / f"mlx-{umask:o}")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == mode  # built in a private temporary directory, then moved
    assert all(f.stat().st_mode & 0o777 == mode & 0o666 for f in out.iterdir() if f.suffix == ".safetensors")
