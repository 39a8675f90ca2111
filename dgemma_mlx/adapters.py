"""LoRA adapters: training, loading at inference (``--adapter``), fusing, and PEFT export.

The encoder (causal) and the denoiser (bidirectional) passes share every base weight. LoRA can
adapt them with one adapter per linear (``shared``) or, as the reference recipe does, with separate
encoder and decoder adapters over the same base weight (``separate``). The active pass is a context
flag (:func:`encoding_pass`) that :meth:`Model.encoder_pass` sets.

Targets: the attention projections and the dense MLP of every layer (the router, the experts and
the self-conditioning block stay frozen).

Files: ``adapters.safetensors`` (our parameter names) and ``adapter_config.json`` (rank, alpha,
scale, dropout, mode, and the base model's shapes, checked on load).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import DGemmaError
from .files import atomic_dir

TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

_ENCODING = contextvars.ContextVar("dgemma_encoding", default=False)


@contextlib.contextmanager
def encoding_pass():
    """Within this context, split linears use their encoder weights/adapters."""
    token = _ENCODING.set(True)
    try:
        yield
    finally:
        _ENCODING.reset(token)


def _input_dims(linear: nn.Module) -> int:
    out, inp = linear.weight.shape
    return inp * 32 // linear.bits if isinstance(linear, nn.QuantizedLinear) else inp


def _dense_weight(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(
            linear.weight, linear.scales, linear.get("biases"),
            group_size=linear.group_size, bits=linear.bits, mode=linear.mode,
        )
    return linear.weight


class LoRALinear(nn.Module):
    """``linear(x) + scale * dropout(x) @ A @ B`` with A [in, r] and B [r, out] (B starts at zero,
    so a new adapter changes nothing). With ``separate``, the encoder pass uses its own
    ``encoder_lora_a`` / ``encoder_lora_b``."""

    def __init__(self, linear: nn.Module, rank: int, scale: float, dropout: float = 0.0, separate: bool = False):
        super().__init__()
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(p=dropout)
        inp = _input_dims(linear)
        out = linear.weight.shape[0]
        bound = 1 / math.sqrt(inp)
        self.lora_a = mx.random.uniform(-bound, bound, (inp, rank))
        self.lora_b = mx.zeros((rank, out))
        if separate:
            self.encoder_lora_a = mx.random.uniform(-bound, bound, (inp, rank))
            self.encoder_lora_b = mx.zeros((rank, out))

    @property
    def separate(self) -> bool:
        return "encoder_lora_a" in self

    def _pair(self, encoding: bool) -> tuple[mx.array, mx.array]:
        if encoding and self.separate:
            return self.encoder_lora_a, self.encoder_lora_b
        return self.lora_a, self.lora_b

    def __call__(self, x: mx.array) -> mx.array:
        a, b = self._pair(_ENCODING.get())
        y = self.linear(x)
        return y + (self.scale * ((self.dropout(x) @ a) @ b)).astype(y.dtype)

    def delta(self, encoding: bool) -> mx.array:
        """The weight update ``scale * (A @ B).T`` [out, in] of one pass."""
        a, b = self._pair(encoding)
        return self.scale * (a @ b).T

    def fuse(self) -> nn.Module:
        """A plain linear (shared) or :class:`UntiedLinear` (separate) with the updates folded in;
        quantized bases are dequantized and re-quantized the same way."""
        base = self.linear
        w = _dense_weight(base)
        dec = (w + self.delta(False).astype(w.dtype))
        if self.separate:
            fused = UntiedLinear(w.shape[1], w.shape[0])
            fused.weight = dec
            fused.encoder_weight = w + self.delta(True).astype(w.dtype)
            return fused
        fused = nn.Linear(w.shape[1], w.shape[0], bias=False)
        fused.weight = dec
        if isinstance(base, nn.QuantizedLinear):
            fused = nn.QuantizedLinear.from_linear(fused, base.group_size, base.bits, mode=base.mode)
        return fused


class UntiedLinear(nn.Module):
    """A linear whose encoder pass uses its own weight (a fused ``separate`` adapter)."""

    def __init__(self, input_dims: int, output_dims: int):
        super().__init__()
        self.weight = mx.zeros((output_dims, input_dims))
        self.encoder_weight = mx.zeros((output_dims, input_dims))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.encoder_weight if _ENCODING.get() else self.weight
        return x @ w.T


@dataclass
class AdapterConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    scale: Optional[float] = None  # default alpha / rank (PEFT's convention)
    separate: bool = True  # separate encoder and decoder adapters (the reference recipe)
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    base: dict = field(default_factory=dict)  # shapes of the base model, checked on load

    @property
    def effective_scale(self) -> float:
        return self.scale if self.scale is not None else self.alpha / self.rank


def model_fingerprint(model) -> dict:
    a = model.args
    return {
        "vocab_size": a.vocab_size, "hidden_size": a.hidden_size, "num_hidden_layers": a.num_hidden_layers,
        "num_attention_heads": a.num_attention_heads, "intermediate_size": a.intermediate_size,
        "layer_head_dims": list(a.layer_head_dims), "layer_kv_heads": list(a.layer_kv_heads),
    }


def _targets(model, targets) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(parent path, parent module, attribute, linear) for every target linear present."""
    found = []
    for i, layer in enumerate(model.layers):
        for t in targets:
            owner_name, attr = t.split(".")
            owner = getattr(layer, owner_name)
            if attr in owner:
                found.append((f"layers.{i}.{owner_name}", owner, attr, owner[attr]))
    return found


def apply_lora(model, config: AdapterConfig) -> int:
    """Freeze the model and wrap its target linears in :class:`LoRALinear`; returns the number of
    trainable parameters."""
    if config.rank <= 0:
        raise DGemmaError(f"LoRA rank must be at least 1 (got {config.rank})")
    unknown = [t for t in config.targets if t not in TARGETS]
    if unknown:
        raise DGemmaError(f"unknown LoRA target '{unknown[0]}' (choose from {', '.join(TARGETS)})")
    config.base = model_fingerprint(model)
    model.freeze()
    for _, owner, attr, linear in _targets(model, config.targets):
        owner[attr] = LoRALinear(linear, config.rank, config.effective_scale, config.dropout, config.separate)
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model, path: Path, config: AdapterConfig) -> None:
    """Write ``adapters.safetensors`` and ``adapter_config.json`` into ``path`` atomically."""
    with atomic_dir(path) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter_weights(model))
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2))


def read_adapter_config(path: Path) -> AdapterConfig:
    path = Path(path).expanduser()
    cfg_file = path / CONFIG_FILE if path.is_dir() else path.parent / CONFIG_FILE
    if not cfg_file.is_file():
        raise DGemmaError(f"{path}: no {CONFIG_FILE} found (not an adapter directory)")
    try:
        data = json.loads(cfg_file.read_text())
        known = set(AdapterConfig.__dataclass_fields__)
        return AdapterConfig(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as e:
        raise DGemmaError(f"{cfg_file}: not a valid adapter config ({e})")


def load_adapters(model, path: Path) -> AdapterConfig:
    """Apply the adapters saved in ``path`` (a directory or its ``adapters.safetensors``)."""
    path = Path(path).expanduser()
    config = read_adapter_config(path)
    if config.base and config.base != model_fingerprint(model):
        raise DGemmaError(f"{path}: these adapters were made for a model of another shape")
    weights_file = path / ADAPTER_FILE if path.is_dir() else path
    try:
        weights = mx.load(str(weights_file))
    except Exception:
        raise DGemmaError(f"{weights_file}: not a readable adapter file (missing, truncated or corrupt?)")
    apply_lora(model, config)
    expected = adapter_weights(model)
    if set(weights) != set(expected):
        raise DGemmaError(f"{weights_file}: adapter tensors do not match this model")
    for k, v in weights.items():
        if v.shape != expected[k].shape:
            raise DGemmaError(f"{weights_file}: tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    return config


def fuse_adapters(model) -> None:
    """Fold every :class:`LoRALinear` into its base weight, in place."""
    for layer in model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.children().items()):
                if isinstance(child, LoRALinear):
                    owner[name] = child.fuse()


def untie_for_weights(model, weights: dict[str, mx.array]) -> None:
    """Before loading a fused checkpoint: make the linears that have an ``encoder_weight`` in
    ``weights`` :class:`UntiedLinear` s."""
    for path, owner, attr, linear in _targets(model, TARGETS):
        if f"{path}.{attr}.encoder_weight" in weights:
            out, inp = linear.weight.shape
            owner[attr] = UntiedLinear(inp, out)


# ------------------------------------------------------------------------------------------- PEFT
_PEFT_PREFIX = {False: "base_model.model.model.decoder.layers", True: "base_model.model.model.encoder.language_model.layers"}


def export_peft(model, config: AdapterConfig, out: Path, base_model_name: str = "") -> None:
    """Write the adapters in PEFT's LoRA format for transformers' ``DiffusionGemmaForBlockDiffusion``:
    encoder and decoder layers get their own adapters (the same ones in ``shared`` mode)."""
    tensors = {}
    for path, owner, attr, lora in _targets(model, config.targets):
        if not isinstance(lora, LoRALinear):
            continue
        layer = path.split(".")[1]
        sub = f"{path.split('.')[2]}.{attr}"
        for encoding in (False, True):
            a, b = lora._pair(encoding)
            prefix = f"{_PEFT_PREFIX[encoding]}.{layer}.{sub}"
            tensors[f"{prefix}.lora_A.weight"] = a.T
            tensors[f"{prefix}.lora_B.weight"] = b.T
    modules = "|".join(t.replace(".", r"\.") for t in config.targets)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "r": config.rank,
        # PEFT scales by alpha / r: choose alpha so the scale is ours.
        "lora_alpha": config.effective_scale * config.rank,
        "lora_dropout": config.dropout,
        "bias": "none",
        "target_modules": rf"model\.(encoder\.language_model|decoder)\.layers\.\d+\.({modules})",
        "inference_mode": True,
    }
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "adapter_model.safetensors"), tensors)
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
