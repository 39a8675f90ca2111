"""Complete, loadable checkpoints of a trained (full / from-scratch / fused) model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from ..convert import _copy_tokenizer, _output_config
from ..errors import DGemmaError
from ..loading import load_config


def save_model(model, source: Optional[Path], dst: Path, *, dtype: Optional[mx.Dtype] = None) -> None:
    """Write ``model`` into the directory ``dst`` (created): ``config.json`` (the source's, with
    the trained model's dtype and quantization), sharded ``model*.safetensors`` with an index, the
    source's tokenizer files and ``generation_config.json``."""
    from mlx_lm.utils import make_shards

    if source is None:
        raise DGemmaError("saving a model needs the checkpoint it came from (config and tokenizer)")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    shards = make_shards(weights, max_file_size_gb=5)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map = {}
    for name, shard in zip(names, shards):
        mx.save_safetensors(str(dst / name), shard, metadata={"format": "mlx"})
        weight_map.update({k: name for k in shard})
    total = sum(v.nbytes for v in weights.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
    )
    float_dtype = next((v.dtype for v in weights.values() if mx.issubdtype(v.dtype, mx.floating)), mx.float32)
    # The vision config stays only when the model carries the vision tower.
    config = _output_config(
        load_config(source), str(float_dtype).split(".")[-1], model.args.quantization, vision="vision_tower" in model
    )
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(source, dst)
    if (source / "generation_config.json").is_file():
        shutil.copy2(source / "generation_config.json", dst / "generation_config.json")
