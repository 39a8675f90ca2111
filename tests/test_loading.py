"""``load()`` reads local directories and Hugging Face repo ids, and reports bad input in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny
from dgemma_mlx import DGemmaError, load

HERE = Path(__file__).parent


def logits_of(model, seed=0):
    rng = np.random.default_rng(seed)
    cache = model.make_cache()
    model.encode(mx.array(rng.integers(0, model.args.vocab_size, (1, 9))), cache)
    canvas = mx.array(rng.integers(0, model.args.vocab_size, (1, model.args.canvas_length)))
    return np.array(model.denoise(canvas, cache))


def test_original_checkpoint_loads_with_tokenizer_and_generation_config(loaded, checkpoint):
    model, tokenizer = loaded
    assert model.args.num_hidden_layers == 6
    assert model.generation_config["max_denoising_steps"] == 48
    assert model.args.eos_token_ids == tiny.EOS_IDS
    assert set(tiny.EOS_IDS) <= set(tokenizer.eos_token_ids)
    assert tokenizer.encode("<|turn>", add_special_tokens=False) == [105]


def test_dtype_casts_float_weights(checkpoint):
    model, _ = load(checkpoint, dtype="bfloat16")
    assert model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.layers[0].self_attn.q_proj.weight.dtype == mx.bfloat16


def test_transformers_save_pretrained_config_form_loads(tmp_path, reference_model, model):
    path = tiny.save_reference(reference_model, tmp_path / "ckpt", config_form="per_layer")
    assert "per_layer_config" in json.loads((path / "config.json").read_text())["text_config"]
    other, _ = load(path)
    assert np.array_equal(logits_of(other), logits_of(model))


def run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_repo_id_loads_from_local_hf_cache_offline(tmp_path, checkpoint):
    cache = tmp_path / "hub"
    tiny.install_in_hf_cache(checkpoint, cache, "acme/tiny-diffusiongemma")
    code = (
        "from dgemma_mlx import load\n"
        "m, t = load('acme/tiny-diffusiongemma')\n"
        "print(m.args.num_hidden_layers, m.path)\n"
    )
    result = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert result.returncode == 0, result.stderr
    layers, path = result.stdout.split()
    assert layers == "6" and path.startswith(str(cache))


def test_repo_id_that_cannot_be_fetched_offline_is_one_clear_error(tmp_path):
    code = (
        "from dgemma_mlx import load, DGemmaError\n"
        "try:\n    load('acme/not-there')\nexcept DGemmaError as e:\n    print(e)\n"
    )
    result = run_python(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "cannot fetch 'acme/not-there'" in result.stdout and "--model PATH" in result.stdout


def test_repo_id_with_unreachable_hub_is_one_clear_error(tmp_path):
    code = (
        "from dgemma_mlx import load, DGemmaError\n"
        "try:\n    load('acme/not-there')\nexcept DGemmaError as e:\n    print(e)\n"
    )
    env = {"HF_HUB_CACHE": str(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_OFFLINE": "0"}
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    assert "acme/not-there" in result.stdout and len(result.stdout.strip().splitlines()) == 1


@pytest.fixture
def broken(tmp_path, checkpoint):
    """A writable copy of the tiny checkpoint to damage."""
    dst = tmp_path / "broken"
    shutil.copytree(checkpoint, dst)
    return dst


def first_shard_with(path: Path, suffix: str) -> tuple[Path, str]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(k for k in sorted(index) if k.endswith(suffix))
    return path / index[name], name


def expect_error(path, *words):
    with pytest.raises(DGemmaError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_path_is_reported(tmp_path):
    expect_error(tmp_path / "nowhere", "does not exist")


def test_config_of_another_model_is_reported(broken):
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "llama"
    (broken / "config.json").write_text(json.dumps(config))
    expect_error(broken, "llama", "not DiffusionGemma")


def test_missing_config_is_reported(broken):
    (broken / "config.json").unlink()
    expect_error(broken, "config.json")


def test_missing_tensor_is_reported(broken):
    shard, name = first_shard_with(broken, "q_norm.weight")
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    expect_error(broken, "missing", "q_norm")


def test_misshaped_tensor_is_reported(broken):
    shard, name = first_shard_with(broken, "mlp.up_proj.weight")
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    expect_error(broken, "shape", "mlp.up_proj")


def test_truncated_safetensors_file_is_reported(broken):
    shard, _ = first_shard_with(broken, "embed_tokens.weight")
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    expect_error(broken, shard.name, "truncated")


def test_missing_tokenizer_is_reported(broken):
    (broken / "tokenizer.json").unlink()
    expect_error(broken, "tokenizer")


def to_mlx_vlm_layout(model, source: Path, dst: Path) -> Path:
    """Write ``model`` (possibly quantized) the way mlx-vlm's converter lays a DiffusionGemma out
    (checked against mlx-vlm 0.7.10): everything under ``model.decoder.*``, the encoder's layer
    scalars under ``model.encoder.language_model.*``, the vision tower under
    ``model.encoder.vision_tower.*`` / ``model.encoder.embed_vision.*``, and a ``quantization``
    block keyed by those names."""
    from mlx.utils import tree_flatten

    def vlm_name(key: str) -> str:
        if key.startswith(("vision_tower", "embed_vision")):
            return "model.encoder." + key
        if ".encoder_layer_scalar" in key:
            return "model.encoder.language_model." + key.replace("encoder_layer_scalar", "layer_scalar")
        return "model.decoder." + key

    weights = {vlm_name(k): v for k, v in tree_flatten(model.parameters())}
    dst.mkdir(parents=True)
    mx.save_safetensors(str(dst / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = json.loads((source / "config.json").read_text())
    quantization = {}
    for path, module in model.named_modules():
        if hasattr(module, "bits"):
            quantization[vlm_name(path)] = {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
    if quantization:
        quantization.update(group_size=32, bits=4, mode="affine")
        config["quantization"] = config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy2(source / name, dst / name)
    return dst


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_mlx_vlm_conversions_load_with_their_names_and_quantization(tmp_path, checkpoint, mode):
    import mlx.nn as nn

    quantized, _ = load(checkpoint)
    nn.quantize(quantized, group_size=32, bits=4, mode=mode, class_predicate=lambda p, m: ".experts." in p)
    nn.quantize(quantized, group_size=32, bits=8, class_predicate=lambda p, m: p == "embed_tokens")
    path = to_mlx_vlm_layout(quantized, checkpoint, tmp_path / "vlm")
    loaded, _ = load(path)
    experts = loaded.layers[0].experts.gate_up_proj
    assert (experts.bits, experts.mode) == (4, mode) and loaded.embed_tokens.bits == 8
    assert np.array_equal(logits_of(loaded), logits_of(quantized))
