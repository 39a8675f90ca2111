"""Convert a DiffusionGemma checkpoint (transformers layout) into this project's MLX format.

The output directory holds ``config.json`` (with a ``quantization`` block when quantized), sharded
``model-*.safetensors`` with ``model.safetensors.index.json``, the tokenizer files,
``chat_template.jinja`` and ``generation_config.json``. Vision weights are dropped and the tied
embedding is stored once.

Weights are read lazily and written shard by shard, so peak memory stays near one shard. The
output is assembled in a temporary directory next to ``mlx_path`` and moved into place only when
complete; an existing ``mlx_path`` is replaced only with ``force=True``.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

from .config import ModelArgs
from .errors import DGemmaError
from .loading import (
    DTYPES,
    apply_weights,
    load_config,
    load_generation_config,
    load_safetensors,
    quantize_like,
    resolve_model_path,
    weight_files,
)
from .model import Model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# The reference's defaults (transformers DiffusionGemmaGenerationConfig), for sources without
# a generation_config.json.
DEFAULT_GENERATION_CONFIG = {
    "max_denoising_steps": 48,
    "t_max": 0.8,
    "t_min": 0.4,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "max_new_tokens": 256,
}
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
SHARD_GB = 5

Progress = Callable[[str, int, int], None]


def _validate(q_bits: int, q_group_size: int, dtype: Optional[str]) -> None:
    if q_bits not in Q_BITS:
        raise DGemmaError(f"--q-bits must be one of {', '.join(map(str, Q_BITS))} (got {q_bits})")
    if q_group_size not in Q_GROUP_SIZES:
        raise DGemmaError(
            f"--q-group-size must be one of {', '.join(map(str, Q_GROUP_SIZES))} (got {q_group_size})"
        )
    if dtype is not None and dtype not in DTYPES:
        raise DGemmaError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype})")


def _output_config(source: dict, dtype: Optional[str], quantization: Optional[dict]) -> dict:
    config = {k: v for k, v in source.items() if k not in ("vision_config", "quantization", "quantization_config")}
    if dtype:
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
    if quantization:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def _copy_tokenizer(src: Path, dst: Path) -> None:
    copied = False
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied |= name in ("tokenizer.json", "tokenizer.model")
    if not copied:
        raise DGemmaError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model) to copy")
    if not (dst / "chat_template.jinja").exists() and (dst / "tokenizer_config.json").exists():
        template = json.loads((dst / "tokenizer_config.json").read_text()).get("chat_template")
        if isinstance(template, str):
            (dst / "chat_template.jinja").write_text(template)


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    *,
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    dtype: Optional[str] = None,
    force: bool = False,
    shard_gb: int = SHARD_GB,
    progress: Optional[Progress] = None,
) -> Path:
    """Convert ``hf_path`` (local directory or repo id) into ``mlx_path``; return ``mlx_path``.

    ``quantize`` applies the default recipe: experts at ``q_bits``; embeddings, attention, dense
    MLPs, self-conditioning and router at 8 bits (affine, ``q_group_size``). ``dtype`` casts the
    float weights (None keeps the source dtype). ``progress(stage, done, total)`` is called as the
    work advances. ``shard_gb`` caps a weight file's size (0: one tensor per file).
    """
    _validate(q_bits, q_group_size, dtype)
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise DGemmaError(f"output directory '{out}' already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise DGemmaError(f"output path '{out}' exists and is not a directory")

    src = resolve_model_path(hf_path)
    source_config = load_config(src)
    args = ModelArgs.from_config(source_config)
    model = Model(args)
    weights = model.sanitize(load_safetensors(weight_files(src)))
    already_quantized = any(k.endswith(".scales") for k in weights)
    if already_quantized and quantize:
        raise DGemmaError(f"'{hf_path}' is already quantized; convert from the original checkpoint")
    quantize_like(model, weights)
    apply_weights(model, weights, DTYPES[dtype] if dtype else None)
    del weights

    quantization = args.quantization if already_quantized else None
    if quantize:
        from mlx_lm.utils import quantize_model

        with contextlib.redirect_stdout(io.StringIO()):
            _, qconfig = quantize_model(
                model,
                {},
                q_group_size,
                q_bits,
                quant_predicate=model.quantization_recipe(q_bits, q_group_size),
            )
        quantization = qconfig["quantization"]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_weights(model, tmp, shard_gb, progress)
        config = _output_config(source_config, dtype, quantization)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        generation = load_generation_config(src) or dict(DEFAULT_GENERATION_CONFIG)
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _copy_tokenizer(src, tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_weights(model: Model, dst: Path, shard_gb: int, progress: Optional[Progress]) -> None:
    from mlx_lm.utils import make_shards

    weights = dict(tree_flatten(model.parameters()))
    # Only the shards hold the (lazy) weights from here on, so each shard's memory is released as
    # soon as it is written.
    model.update(tree_map(lambda _: mx.array([]), model.parameters()))
    total_bytes = sum(v.nbytes for v in weights.values())
    shards = make_shards(weights, max_file_size_gb=shard_gb)
    weights.clear()
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    done = 0
    for i in range(n):
        shard, shards[i] = shards[i], None
        for v in shard.values():
            mx.eval(v)
            done += v.nbytes
            if progress:
                progress("weights", done, total_bytes)
        mx.save_safetensors(str(dst / names[i]), shard, metadata={"format": "mlx"})
        weight_map.update({k: names[i] for k in shard})
        del shard
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
