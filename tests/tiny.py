"""Tiny DiffusionGemma checkpoints and tokenizers, built in the tests with transformers.

Nothing here touches the network. ``build_reference`` makes a small random
``DiffusionGemmaForBlockDiffusion`` whose norms, scales and both layer-scalar sets are randomised (so
no weight is an identity), saves it as an original Hugging Face checkpoint (vision tower included,
text stack under ``model.decoder.*``), and writes a Gemma-4-style tokenizer, chat template and
``generation_config.json`` next to it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dgemma_mlx.settings import REFERENCE_GENERATION_CONFIG

SPECIAL_TOKENS = {
    0: "<pad>",
    1: "<eos>",
    2: "<bos>",
    3: "<unk>",
    50: "<|tool_response>",
    60: "<|image>",
    61: "<|image|>",
    62: "<image|>",
    98: "<|think|>",
    100: "<|channel>",
    101: "<channel|>",
    105: "<|turn>",
    106: "<turn|>",
}
VOCAB_SIZE = 512
EOS_IDS = [1, 106, 50]
BOI_ID, IMAGE_ID, EOI_ID = 60, 61, 62

# A Gemma-4-style chat template (written for these tests): bos, an optional system turn that
# carries <|think|> when thinking is on, turns wrapped in <|turn>role ... <turn|>, earlier model
# thoughts stripped, an empty thought channel pre-filled when thinking is off, and (as Gemma 4's)
# list contents whose image items become "\n\n<|image|>\n\n".
CHAT_TEMPLATE = (
    "{%- macro strip_thoughts(text) -%}"
    "{%- set ns = namespace(out='') -%}"
    "{%- for part in text.split('<channel|>') -%}"
    "{%- if '<|channel>' in part -%}{%- set ns.out = ns.out + part.split('<|channel>')[0] -%}"
    "{%- else -%}{%- set ns.out = ns.out + part -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.out | trim -}}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- set think = enable_thinking is defined and enable_thinking -%}"
    "{%- set rest = messages -%}"
    "{%- if think or (messages and messages[0]['role'] == 'system') -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if think -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] | trim -}}{%- set rest = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in rest -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{%- if role == 'model' -%}{{- strip_thoughts(message['content']) -}}"
    "{%- elif message['content'] is string -%}{{- message['content'] | trim -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'image' -%}{{- '\\n\\n<|image|>\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|turn>model\\n' -}}"
    "{%- if not think -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}"
    "{%- endif -%}"
)

GENERATION_CONFIG = {  # the reference's defaults, as a released checkpoint writes them
    **REFERENCE_GENERATION_CONFIG,
    "bos_token_id": 2,
    "eos_token_id": EOS_IDS,
    "pad_token_id": 0,
}


def _vocab() -> dict[str, int]:
    tokens: list[Optional[str]] = [None] * VOCAB_SIZE
    for i, t in SPECIAL_TOKENS.items():
        tokens[i] = t
    nxt = 110
    for b in range(256):
        tokens[nxt] = f"<0x{b:02X}>"
        nxt += 1
    for ch in ["\u2581", "\n"] + [chr(c) for c in range(33, 127)]:
        tokens[nxt] = ch
        nxt += 1
    for word in ["\u2581the", "\u2581a", "\u2581is", "\u2581sky", "\u2581blue", "thought", "model", "user"]:
        tokens[nxt] = word
        nxt += 1
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"<unused{i}>"
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(path: Path, chat_template: str = CHAT_TEMPLATE) -> None:
    """Write a Gemma-style (SentencePiece-BPE layout, byte fallback) tokenizer into ``path``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    merges = [
        ("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e"), ("\u2581", "a"), ("\u2581", "i"),
        ("\u2581i", "s"), ("\u2581", "s"), ("\u2581s", "k"), ("\u2581sk", "y"), ("\u2581", "b"),
        ("\u2581b", "l"), ("\u2581bl", "u"), ("\u2581blu", "e"),
    ]
    for a, b in merges:
        vocab.setdefault(a + b, None)
    # Intermediate merge results must be in the vocab; give them unused slots.
    free = [i for t, i in vocab.items() if t is not None and t.startswith("<unused") and i > 107]
    for t in [t for t, i in vocab.items() if i is None]:
        slot = free.pop()
        del vocab[f"<unused{slot}>"]
        vocab[t] = slot
    model = models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = chat_template
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(chat_template)


def enc(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class TinySpec:
    """Shapes of a tiny checkpoint. Layers follow the real 5 sliding : 1 full pattern."""

    hidden_size: int = 64
    intermediate_size: int = 96
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    global_head_dim: int = 32
    num_global_key_value_heads: int = 1
    sliding_window: int = 8
    num_experts: int = 8
    top_k_experts: int = 2
    canvas_length: int = 16
    vocab_size: int = VOCAB_SIZE
    max_position_embeddings: int = 4096

    def text_config(self) -> dict:
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            global_head_dim=self.global_head_dim,
            num_global_key_value_heads=self.num_global_key_value_heads,
            sliding_window=self.sliding_window,
            num_experts=self.num_experts,
            top_k_experts=self.top_k_experts,
            max_position_embeddings=self.max_position_embeddings,
            use_bidirectional_attention="vision",
            bos_token_id=2,
            eos_token_id=1,
            pad_token_id=0,
        )


VISION_CONFIG = dict(
    model_type="gemma4_vision",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
)


def make_reference_model(spec: TinySpec = TinySpec(), seed: int = 0):
    """A random float32 ``DiffusionGemmaForBlockDiffusion`` with no identity weights."""
    import torch
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=spec.text_config(),
        vision_config=dict(VISION_CONFIG),
        canvas_length=spec.canvas_length,
        eos_token_id=EOS_IDS,
        boi_token_id=BOI_ID,
        image_token_id=IMAGE_ID,
        eoi_token_id=EOI_ID,
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval().float()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                # Attention runs with scale 1.0 on RMS-normed q/k: keep the scores moderate so
                # float32 rounding is not amplified by a needlessly sharp softmax.
                p.copy_(0.5 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight") or name.endswith("router.scale"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
        for layer in model.model.decoder.layers:
            layer.layer_scalar.copy_(0.6 + 0.8 * torch.rand(1, generator=g))
        for layer in model.model.encoder.language_model.layers:
            layer.layer_scalar.copy_(0.6 + 0.8 * torch.rand(1, generator=g))
        # The model ties the encoder's text weights to the decoder's; only layer scalars differ.
    return model


def to_real_config_form(config: dict) -> dict:
    """Rewrite a transformers-5.24 ``per_layer_config`` text config into the released checkpoint's
    form (``global_head_dim`` / ``num_global_key_value_heads``, no ``attention_k_eq_v``)."""
    config = json.loads(json.dumps(config))
    tc = config["text_config"]
    plc = tc.pop("per_layer_config")
    first = next(iter(plc.values()))
    tc["global_head_dim"] = first["head_dim"]
    tc["num_global_key_value_heads"] = first.get("num_key_value_heads", tc["num_key_value_heads"])
    return config


def save_reference(model, path: Path, *, config_form: str = "real", max_shard_size: str = "200KB") -> Path:
    """Save ``model`` as an original (sharded) transformers checkpoint with tokenizer files."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    model.save_pretrained(str(path), max_shard_size=max_shard_size)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    if config_form == "real":
        config = to_real_config_form(config)
    config_file.write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer(path)
    return path


def build_reference(path: Path, spec: TinySpec = TinySpec(), seed: int = 0, config_form: str = "real"):
    """Make, save and return ``(torch_model, checkpoint_dir)``."""
    model = make_reference_model(spec, seed)
    return model, save_reference(model, path, config_form=config_form)


def install_in_hf_cache(src: Path, cache_dir: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay ``src``'s files out as huggingface_hub's cache does for ``repo_id`` (refs/main ->
    snapshots/<revision>/...), so ``snapshot_download`` finds them offline."""
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file():
            shutil.copy2(f, snapshot / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


class DenoiseSpy:
    """Wraps a model; records the first row of every canvas ``denoise`` reads (``.canvases``)."""

    def __init__(self, model):
        self.model, self.canvases = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def denoise(self, canvas, cache, *args, **kwargs):
        import numpy as np

        self.canvases.append(np.array(canvas)[0].tolist())
        return self.model.denoise(canvas, cache, *args, **kwargs)
