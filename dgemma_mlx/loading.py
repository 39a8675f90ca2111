"""Loading a DiffusionGemma checkpoint: local directory or Hugging Face repo id.

Accepted checkpoints:

* the original transformers checkpoint (sharded safetensors, text stack under ``model.decoder.*``,
  the encoder's layer scalars under ``model.encoder.language_model.*``, the vision tower under
  ``model.encoder.vision_tower.*`` / ``model.encoder.embed_vision.*``);
* this project's converted output (``dgemma convert``), float or quantized;
* the mlx-community / mlx-vlm conversions (their weight names and ``quantization`` block).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .adapters import load_adapters, untie_for_weights
from .bundled import bundled_names, bundled_path
from .config import ModelArgs
from .errors import DGemmaError
from .model import Model, Source

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def looks_like_repo_id(name: str) -> bool:
    return bool(REPO_ID.match(name)) and not name.startswith((".", "/", "~"))


"""Names of models that ship with the package and load without the network (none yet)."""


def default_model_unavailable(name: str) -> str:
    """The error for the default model when it is neither cached nor reachable (offline, no
    network): what to pass instead, including the bundled models (``dgemma models``)."""
    message = (
        f"cannot fetch the default model '{name}': it is not in the Hugging Face cache and the Hub "
        "cannot be reached; pass a local --model PATH"
    )
    names = bundled_names()
    if names:
        message += ", or a bundled model that needs no download: " + ", ".join(f"--model {n}" for n in names)
    return message


def resolve_model_path(path_or_repo: Union[str, Path], *, weights: bool = True, default: bool = False) -> Path:
    """A local directory for ``path_or_repo``, downloading a repo id into the Hugging Face cache
    (with progress) when needed. Honours ``HF_HUB_OFFLINE`` and the cache location variables.
    ``default`` marks the default model (its error names the alternatives)."""
    name = str(path_or_repo)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    bundled = bundled_path(name)
    if bundled is not None:
        return bundled
    if path.exists():
        raise DGemmaError(f"model path '{name}' is a file, not a checkpoint directory")
    if not looks_like_repo_id(name):
        raise DGemmaError(f"model path '{name}' does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # A repo id is also a relative path: until the Hub answers, it may be a mistyped directory.
    local = "" if default else "there is no such local directory, "
    patterns = ALLOW_PATTERNS if weights else [p for p in ALLOW_PATTERNS if "safetensors" not in p]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except GatedRepoError:
        raise DGemmaError(f"'{name}' is a gated repository: log in with `hf auth login` first")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        what = "a Hugging Face repository" if default else "a local directory nor a Hugging Face repository"
        raise DGemmaError(f"'{name}' is {'not' if default else 'neither'} {what}")
    except LocalEntryNotFoundError:
        if default:
            raise DGemmaError(default_model_unavailable(name))
        raise DGemmaError(
            f"cannot fetch '{name}': {local}it is not in the Hugging Face cache and the Hub cannot be reached; "
            "check the path, or pass a local --model PATH"
        )
    except Exception as e:  # connection errors, HTTP errors, disk errors
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DGemmaError(f"cannot fetch '{name}' from the Hugging Face Hub ({local}the Hub failed): {reason}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DGemmaError(f"{path.parent}: no {what} ({path.name}) found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DGemmaError(f"{path}: not valid JSON ({e})")
    if not isinstance(data, dict):
        raise DGemmaError(f"{path}: expected a JSON object")
    return data


def load_config(model_path: Path) -> dict[str, Any]:
    return read_json(model_path / "config.json", "config")


def load_generation_config(model_path: Path) -> dict[str, Any]:
    """``generation_config.json`` as a dict ({} when absent); null entries are dropped."""
    path = model_path / "generation_config.json"
    if not path.exists():
        return {}
    return {k: v for k, v in read_json(path, "generation config").items() if v is not None}


def weight_files(model_path: Path) -> list[Path]:
    index = model_path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "weight index").get("weight_map", {})
        files = sorted({model_path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise DGemmaError(f"{model_path}: weight file {missing[0]} listed in the index is missing")
        return files
    files = sorted(model_path.glob("*.safetensors"))
    if not files:
        raise DGemmaError(f"{model_path}: no *.safetensors weight files found")
    return files


def load_safetensors(files: list[Path]) -> dict[str, mx.array]:
    """Lazily load every tensor of ``files`` (MLX reads the data when it is first evaluated)."""
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DGemmaError(f"{f}: not a readable safetensors file (truncated or corrupt?): {reason}")
    return weights


def quantize_like(model: Model, weights: dict[str, mx.array]) -> None:
    """Turn every layer stored quantized in ``weights`` into its quantized counterpart.

    Bits and group size are recovered from the tensor shapes (mlx-lm's ``infer_quant_config``)."""
    from mlx_lm.utils import infer_quant_config

    names = {}
    for path, module in model.named_modules():
        if hasattr(module, "to_quantized") and f"{path}.scales" in weights:
            names[path] = module
    if not names:
        return

    def params(path: str, module: nn.Module):
        if path not in names:
            return False
        try:
            return infer_quant_config(path, module, weights)
        except (ValueError, ZeroDivisionError) as e:
            raise DGemmaError(f"cannot read the quantization of '{path}': {e}")

    nn.quantize(model, class_predicate=params)


def apply_weights(model: Model, weights: dict[str, mx.array], dtype: Optional[mx.Dtype]) -> None:
    """Check names and shapes against the model, cast floats to ``dtype`` and load."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(k for k in expected if k not in weights)
    if missing:
        raise DGemmaError(f"checkpoint is missing tensor '{missing[0]}' ({len(missing)} missing)")
    unexpected = sorted(k for k in weights if k not in expected)
    if unexpected:
        raise DGemmaError(f"checkpoint has unexpected tensor '{unexpected[0]}'")
    for k, v in weights.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise DGemmaError(
                f"tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith((".scales", ".biases")) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)


def build_model(args: ModelArgs, raw: dict[str, mx.array], text_only: bool = False) -> tuple[Model, dict[str, mx.array]]:
    """The model for ``args`` and its sanitized weights. The vision tower is built when the config
    describes one and the checkpoint holds its weights (checkpoints converted with ``--text-only``
    or older conversions have none) and ``text_only`` is False."""
    from .vision import sanitize_vision_key

    if args.vision is not None and (text_only or not any(sanitize_vision_key(k) for k in raw)):
        args.vision = None
    model = Model(args)
    return model, model.sanitize(raw)


def load_model(
    path_or_repo: Union[str, Path],
    dtype: Optional[Union[str, mx.Dtype]] = None,
    lazy: bool = False,
    text_only: bool = False,
) -> tuple[Model, Path]:
    """The model only (no tokenizer). See :func:`load`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise DGemmaError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
        dtype = DTYPES[dtype]
    model_path = resolve_model_path(path_or_repo)
    args = ModelArgs.from_config(load_config(model_path))
    model, weights = build_model(args, load_safetensors(weight_files(model_path)), text_only)
    untie_for_weights(model, weights)
    quantize_like(model, weights)
    apply_weights(model, weights, dtype)
    if not lazy:
        try:
            mx.eval(model.parameters())
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DGemmaError(f"{model_path}: cannot read the weights (truncated or corrupt?): {reason}")
    model.eval()
    model.source = Source(model_path, load_generation_config(model_path))
    return model, model_path


def load_tokenizer(model_path: Path, eos_token_ids: Optional[list[int]] = None):
    """mlx-lm's ``TokenizerWrapper`` (HF tokenizer + streaming detokenizer) for ``model_path``."""
    from mlx_lm.tokenizer_utils import load as load_wrapper

    if not (model_path / "tokenizer.json").exists() and not (model_path / "tokenizer.model").exists():
        raise DGemmaError(f"{model_path}: no tokenizer (tokenizer.json or tokenizer.model) found")
    try:
        return load_wrapper(model_path, eos_token_ids=eos_token_ids)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DGemmaError(f"{model_path}: cannot load the tokenizer: {reason}")


def load(
    path_or_repo: Union[str, Path],
    dtype: Optional[Union[str, mx.Dtype]] = None,
    adapter_path: Optional[Union[str, Path]] = None,
    *,
    text_only: bool = False,
):
    """Load ``(model, tokenizer)`` from a local directory or a Hugging Face repo id.

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"`` or an ``mx.Dtype``) casts the float
    weights; None keeps the checkpoint's dtype. ``adapter_path``: LoRA adapters (``dgemma train``)
    to apply. The vision tower is loaded when the checkpoint has one, unless ``text_only``. The
    model carries ``model.path`` and ``model.generation_config`` (the checkpoint's
    ``generation_config.json``, nulls dropped).
    """
    model, model_path = load_model(path_or_repo, dtype, text_only=text_only)
    if adapter_path is not None:
        load_adapters(model, Path(adapter_path))
        model.eval()
    eos = model.generation_config.get("eos_token_id", model.args.eos_token_ids)
    eos = eos if isinstance(eos, list) else [eos]
    model.args.eos_token_ids = [int(e) for e in eos]
    tokenizer = load_tokenizer(model_path, model.args.eos_token_ids)
    return model, tokenizer
