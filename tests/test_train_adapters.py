"""LoRA adapters: a new adapter changes nothing; saved adapters load (library, generate, chat);
fused checkpoints and PEFT exports give the adapter-on logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import tiny
from dgemma_mlx import load
from dgemma_mlx.adapters import AdapterConfig, LoRALinear, UntiedLinear, apply_lora, export_peft, save_adapters
from dgemma_mlx.train.objective import _Recorder
from test_cli import dgemma, one_line_error

PROMPT = [2, 105, 300, 301, 302, 303, 304, 305, 306, 307, 308, 309, 310, 311, 106, 105]


def logits(model, prompt=PROMPT, seed=0):
    """``(denoiser logits [C, V] after encoding prompt, encoder logits [L, V])`` as numpy."""
    ids = mx.array([prompt])
    canvas = mx.random.randint(0, model.args.vocab_size, (1, model.args.canvas_length), key=mx.random.key(seed))
    cache = model.make_cache()
    model.encode(ids, cache)
    dec = model.denoise(canvas, cache)
    enc = model.logits(model.encoder_pass(ids, [_Recorder() for _ in model.layers], 0))
    return np.array(dec[0]), np.array(enc[0])


def randomise(model, seed=1):
    """Give every adapter (both of a separate pair) non-zero random A and B."""
    rng = np.random.default_rng(seed)
    for _, m in model.named_modules():
        if isinstance(m, LoRALinear):
            for name in ("lora_a", "lora_b", "encoder_lora_a", "encoder_lora_b"):
                if name in m:
                    m[name] = mx.array(0.05 * rng.standard_normal(m[name].shape).astype(np.float32))
    mx.eval(model.parameters())


def make_adapters(checkpoint, path, mode: str):
    """``(model with non-zero adapters, their directory, mode)``."""
    model, _ = load(checkpoint)
    config = AdapterConfig(rank=4, alpha=8.0, separate=mode == "separate")
    apply_lora(model, config)
    randomise(model)
    save_adapters(model, path, config)
    return model, path, mode


@pytest.fixture(params=["separate", "shared"])
def adapted(request, checkpoint, tmp_path):
    return make_adapters(checkpoint, tmp_path / "adapters", request.param)


@pytest.fixture
def separate(checkpoint, tmp_path):
    return make_adapters(checkpoint, tmp_path / "adapters", "separate")


@pytest.mark.parametrize("separate", [True, False])
def test_new_lora_adapter_changes_no_logit(checkpoint, separate):
    model, _ = load(checkpoint)
    before = logits(model)
    apply_lora(model, AdapterConfig(rank=4, separate=separate))
    after = logits(model)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])


def test_lora_trains_only_adapters_and_leaves_router_and_experts_frozen(checkpoint):
    model, _ = load(checkpoint)
    apply_lora(model, AdapterConfig(rank=4, separate=True))
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "encoder_lora_a", "encoder_lora_b") for k in names)
    assert any(".self_attn." in k for k in names) and any(".mlp." in k for k in names)
    assert not any("router" in k or "experts" in k for k in names)


def test_separate_adapters_differ_between_encoder_and_denoiser(checkpoint, tmp_path):
    model, _ = load(checkpoint)
    apply_lora(model, AdapterConfig(rank=4, separate=True))
    base = logits(model)
    randomise(model)
    for _, m in model.named_modules():  # undo the encoder adapters only
        if isinstance(m, LoRALinear):
            m.encoder_lora_b = mx.zeros_like(m.encoder_lora_b)
    dec, enc = logits(model)
    assert np.array_equal(enc, base[1]) and not np.allclose(dec, base[0], atol=1e-3)


def test_saved_adapters_load_with_the_model(adapted, checkpoint):
    model, path, _ = adapted
    again, _ = load(checkpoint, adapter_path=path)
    for a, b in zip(logits(model), logits(again)):
        np.testing.assert_array_equal(a, b)


def test_fused_checkpoint_gives_adapter_on_logits(adapted, checkpoint, tmp_path):
    model, path, mode = adapted
    out = tmp_path / "fused"
    r = dgemma("fuse", "--model", str(checkpoint), "--adapter-path", str(path), "--save-path", str(out))
    assert r.returncode == 0, r.stderr
    fused, _ = load(out)
    untied = [m for _, m in fused.named_modules() if isinstance(m, UntiedLinear)]
    assert bool(untied) == (mode == "separate")
    for a, b in zip(logits(model), logits(fused)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_peft_export_gives_adapter_on_logits_in_transformers(adapted, tmp_path):
    from peft import PeftModel

    model, _, mode = adapted
    export_peft(model, _config(adapted), tmp_path / "peft")
    ref = PeftModel.from_pretrained(tiny.make_reference_model(seed=0), str(tmp_path / "peft")).eval()
    ours_dec, ours_enc = logits(model)
    ids = torch.tensor([PROMPT])
    canvas = torch.tensor(np.array(mx.random.randint(0, model.args.vocab_size, (1, model.args.canvas_length),
                                                     key=mx.random.key(0))), dtype=torch.long)
    with torch.no_grad():
        out = ref(input_ids=ids, decoder_input_ids=canvas)
        cap = ref.config.text_config.final_logit_softcapping
        enc = torch.tanh(ref.base_model.model.lm_head(out.encoder_last_hidden_state) / cap) * cap
    assert np.abs(ours_dec - out.logits[0].numpy()).max() < 1e-4
    assert np.abs(ours_enc - enc[0].numpy()).max() < 1e-4
    # Without the adapters the logits are far from these: the test sees the adapters.
    with torch.no_grad(), ref.disable_adapter():
        plain = ref(input_ids=ids, decoder_input_ids=canvas).logits[0].numpy()
    assert np.abs(ours_dec - plain).max() > 1e-2


def _config(adapted) -> AdapterConfig:
    _, path, _ = adapted
    from dgemma_mlx.adapters import read_adapter_config

    return read_adapter_config(path)


def test_fuse_export_peft_writes_peft_files(adapted, checkpoint, tmp_path):
    _, path, _ = adapted
    out = tmp_path / "peft"
    r = dgemma("fuse", "--model", str(checkpoint), "--adapter-path", str(path), "--save-path", str(out), "--export-peft")
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    assert (out / "adapter_model.safetensors").is_file()


def test_generate_and_chat_accept_adapters(separate, checkpoint):
    _, path, _ = separate
    r = dgemma("generate", "--model", str(checkpoint), "--adapter", str(path), "--steps", "2", "-n", "16",
               "--seed", "1", "hello")
    assert r.returncode == 0, r.stderr
    r = dgemma("chat", "--model", str(checkpoint), "--adapter", str(path), "--steps", "2", "-n", "16",
               "--seed", "1", input="hello\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr.lower()


def test_adapters_made_for_another_model_are_refused(separate, tmp_path):
    _, path, _ = separate
    other = tiny.build_reference(tmp_path / "other", spec=tiny.TinySpec(hidden_size=32, intermediate_size=48))[1]
    r = dgemma("generate", "--model", str(other), "--adapter", str(path), "--steps", "2", "hello")
    one_line_error(r, "another shape")
    r = dgemma("fuse", "--model", str(other), "--adapter-path", str(path), "--save-path", str(tmp_path / "f"))
    one_line_error(r, "another shape")
    assert not (tmp_path / "f").exists()


def test_missing_adapter_directory_is_one_line_error(checkpoint, tmp_path):
    r = dgemma("generate", "--model", str(checkpoint), "--adapter", str(tmp_path / "nope"), "hello")
    one_line_error(r, "nope")
