"""ModelArgs accepts every config form of DiffusionGemma and rejects other models."""

from __future__ import annotations

import copy

import pytest

from dgemma_mlx.config import FULL, SLIDING, ModelArgs
from dgemma_mlx.errors import DGemmaError

REAL_TEXT_CONFIG = {
    "vocab_size": 262144, "hidden_size": 2816, "intermediate_size": 2112, "moe_intermediate_size": 704,
    "num_hidden_layers": 30, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
    "global_head_dim": 512, "num_global_key_value_heads": 2, "sliding_window": 1024,
    "num_experts": 128, "top_k_experts": 8, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh",
    "use_bidirectional_attention": "vision", "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}
REAL_CONFIG = {
    "model_type": "diffusion_gemma", "architectures": ["DiffusionGemmaForBlockDiffusion"],
    "canvas_length": 256, "tie_word_embeddings": True, "eos_token_id": [1, 106],
    "text_config": REAL_TEXT_CONFIG, "vision_config": {"model_type": "gemma4_vision"},
}


def test_released_config_gives_the_published_shapes():
    args = ModelArgs.from_config(REAL_CONFIG)
    full = [i for i, t in enumerate(args.layer_types) if t == FULL]
    assert full == [5, 11, 17, 23, 29]
    assert all(args.layer_head_dims[i] == 512 and args.layer_kv_heads[i] == 2 for i in full)
    assert all(args.layer_head_dims[i] == 256 and args.layer_kv_heads[i] == 8 for i in range(30) if i not in full)
    assert args.canvas_length == 256 and args.eos_token_ids == [1, 106]
    assert args.rope_parameters[FULL]["rope_type"] == "proportional"


def test_per_layer_config_form_gives_the_same_shapes():
    config = copy.deepcopy(REAL_CONFIG)
    text = config["text_config"]
    del text["global_head_dim"], text["num_global_key_value_heads"]
    text["per_layer_config"] = {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in (5, 11, 17, 23, 29)}
    a, b = ModelArgs.from_config(config), ModelArgs.from_config(REAL_CONFIG)
    assert (a.layer_head_dims, a.layer_kv_heads) == (b.layer_head_dims, b.layer_kv_heads)


def test_per_layer_config_keyed_by_layer_type_is_accepted():
    config = copy.deepcopy(REAL_CONFIG)
    config["text_config"]["per_layer_config"] = {FULL: {"head_dim": 512, "num_key_value_heads": 2}}
    args = ModelArgs.from_config(config)
    assert args.layer_head_dims[29] == 512 and args.layer_kv_heads[29] == 2


def test_quantization_block_is_kept():
    config = copy.deepcopy(REAL_CONFIG)
    config["quantization"] = {"group_size": 64, "bits": 4, "mode": "affine"}
    assert ModelArgs.from_config(config).quantization["bits"] == 4


def test_missing_layer_types_follow_five_sliding_one_full():
    args = ModelArgs.from_config(REAL_CONFIG)
    assert args.layer_types[:6] == [SLIDING] * 5 + [FULL]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(model_type="gemma4"), "gemma4"),
        (lambda c: c.pop("text_config"), "text_config"),
        (lambda c: c["text_config"].pop("hidden_size"), "hidden_size"),
        (lambda c: c["text_config"].update(top_k_experts=999), "top_k_experts"),
        (lambda c: c["text_config"].update(hidden_size="big"), "hidden_size"),
    ],
)
def test_configs_of_other_models_are_rejected_with_one_line(change, message):
    config = copy.deepcopy(REAL_CONFIG)
    change(config)
    with pytest.raises(DGemmaError) as e:
        ModelArgs.from_config(config)
    assert message in str(e.value) and "\n" not in str(e.value)
