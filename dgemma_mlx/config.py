"""Model configuration, built from a checkpoint's ``config.json``.

Three forms of the DiffusionGemma config exist and all are accepted:

* the released checkpoint: ``text_config`` carries ``global_head_dim`` and
  ``num_global_key_value_heads`` for the full-attention layers;
* ``save_pretrained`` from transformers 5.24: ``text_config.per_layer_config`` maps layer indices
  (or layer types) to ``head_dim`` / ``num_key_value_heads`` overrides;
* mlx-community / mlx-vlm conversions and this project's own output: either of the above plus a
  top-level ``quantization`` (or ``quantization_config``) block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import DGemmaError
from .vision import VisionArgs

MODEL_TYPE = "diffusion_gemma"
SLIDING = "sliding_attention"
FULL = "full_attention"

DEFAULT_ROPE = {
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}


@dataclass
class ModelArgs:
    """Everything the MLX model needs, flattened from ``config.json``.

    ``layer_head_dims[i]`` / ``layer_kv_heads[i]`` give layer i's attention head size and number of
    key/value heads (full-attention layers differ from sliding ones).
    """

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    moe_intermediate_size: int = 704
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    num_experts: int = 128
    top_k_experts: int = 8
    sliding_window: int = 1024
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: Optional[float] = 30.0
    max_position_embeddings: int = 262_144
    canvas_length: int = 256
    layer_types: list[str] = field(default_factory=list)
    layer_head_dims: list[int] = field(default_factory=list)
    layer_kv_heads: list[int] = field(default_factory=list)
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_ROPE))
    bos_token_id: int = 2
    pad_token_id: int = 0
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    quantization: Optional[dict[str, Any]] = None
    vision: Optional[VisionArgs] = None  # None: a text-only checkpoint
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        """Build from a parsed ``config.json``; raises ``DGemmaError`` on a config of another model."""
        if not isinstance(config, dict):
            raise DGemmaError("config.json does not hold a JSON object")
        model_type = config.get("model_type")
        if model_type != MODEL_TYPE:
            raise DGemmaError(
                f"config.json describes a '{model_type}' model, not DiffusionGemma "
                f"(model_type '{MODEL_TYPE}')"
            )
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise DGemmaError("config.json has no text_config")
        if text.get("use_bidirectional_attention") == "all":
            raise DGemmaError("use_bidirectional_attention='all' is not a DiffusionGemma text config")

        def get(name: str, default: Any = None, kind: type = int) -> Any:
            value = text.get(name, default)
            if value is None:
                raise DGemmaError(f"config.json text_config is missing '{name}'")
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise DGemmaError(f"config.json text_config '{name}' is not a {kind.__name__}: {value!r}")

        n_layers = get("num_hidden_layers")
        layer_types = text.get("layer_types") or [
            SLIDING if (i + 1) % 6 else FULL for i in range(n_layers)
        ]
        if len(layer_types) != n_layers or any(t not in (SLIDING, FULL) for t in layer_types):
            raise DGemmaError("config.json text_config 'layer_types' does not match num_hidden_layers")
        layer_types = list(layer_types)
        layer_types[-1] = FULL  # the reference forces the last layer to full attention

        head_dim = get("head_dim", 256)
        kv_heads = get("num_key_value_heads")
        head_dims = [head_dim] * n_layers
        kv = [kv_heads] * n_layers
        per_layer = text.get("per_layer_config")
        if per_layer:
            for key, override in per_layer.items():
                idxs = (
                    [i for i, t in enumerate(layer_types) if t == key]
                    if key in (SLIDING, FULL)
                    else [int(key)]
                )
                for i in idxs:
                    head_dims[i] = int(override.get("head_dim", head_dims[i]))
                    kv[i] = int(override.get("num_key_value_heads", kv[i]))
        else:
            global_head_dim = int(text.get("global_head_dim") or 512)
            global_kv = text.get("num_global_key_value_heads")
            k_eq_v = text.get("attention_k_eq_v", True)
            for i, t in enumerate(layer_types):
                if t == FULL:
                    head_dims[i] = global_head_dim
                    if global_kv is not None and k_eq_v:
                        kv[i] = int(global_kv)

        rope = dict(DEFAULT_ROPE)
        rope.update(text.get("rope_parameters") or {})

        eos = config.get("eos_token_id", text.get("eos_token_id", 1))
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
        softcap = text.get("final_logit_softcapping", 30.0)

        args = cls(
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            moe_intermediate_size=get("moe_intermediate_size"),
            num_hidden_layers=n_layers,
            num_attention_heads=get("num_attention_heads"),
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_experts=get("num_experts"),
            top_k_experts=get("top_k_experts"),
            sliding_window=get("sliding_window"),
            rms_norm_eps=get("rms_norm_eps", 1e-6, float),
            final_logit_softcapping=None if softcap is None else float(softcap),
            max_position_embeddings=get("max_position_embeddings", 262_144),
            canvas_length=int(config.get("canvas_length") or 256),
            layer_types=layer_types,
            layer_head_dims=head_dims,
            layer_kv_heads=kv,
            rope_parameters=rope,
            bos_token_id=int(text.get("bos_token_id", 2) or 2),
            pad_token_id=int(text.get("pad_token_id", 0) or 0),
            eos_token_ids=eos_ids or [1],
            quantization=config.get("quantization") or config.get("quantization_config"),
            vision=VisionArgs.from_config(config["vision_config"]) if config.get("vision_config") else None,
            **{k: int(config[k]) for k in ("image_token_id", "boi_token_id", "eoi_token_id") if config.get(k) is not None},
        )
        args.validate()
        return args

    def validate(self) -> None:
        if self.num_attention_heads <= 0 or any(
            k <= 0 or self.num_attention_heads % k for k in self.layer_kv_heads
        ):
            raise DGemmaError("config.json: num_attention_heads must be a multiple of the key/value heads")
        if not 0 < self.top_k_experts <= self.num_experts:
            raise DGemmaError("config.json: top_k_experts must be between 1 and num_experts")
        if self.sliding_window < 2:
            raise DGemmaError("config.json: sliding_window must be at least 2")
        if self.canvas_length <= 0:
            raise DGemmaError("config.json: canvas_length must be positive")


def small_model_config(canvas_length: int, **shape: Any) -> dict[str, Any]:
    """A ``config.json`` (the released form) for a small DiffusionGemma-architecture model: the
    text shape given (vocab, widths, layers, heads, experts, window, positions) with the
    reference's fixed choices (norm epsilon, soft cap, activation, causal text in the encoder,
    special ids). The recipes in ``recipes/`` train these from scratch."""
    text = dict(
        rms_norm_eps=1e-6,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
        use_bidirectional_attention="vision",
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    )
    text.update(shape)
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "canvas_length": canvas_length,
        "eos_token_id": [1],
        "text_config": text,
        "tie_word_embeddings": True,
    }
