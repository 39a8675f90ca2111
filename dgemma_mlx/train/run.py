"""``dgemma train`` as a function: load (or build from a config) the model, read the data, train."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Union

import mlx.core as mx

from ..errors import DGemmaError
from .data import load_datasets
from .trainer import Report, Trainer, TrainingArgs


def _load_for_training(model: Union[str, Path], args: TrainingArgs):
    from ..config import ModelArgs
    from ..loading import load, load_config, load_tokenizer, resolve_model_path
    from ..model import Model

    if args.from_scratch:
        path = resolve_model_path(model, weights=False)
        margs = ModelArgs.from_config(load_config(path))
        mx.random.seed(args.seed)
        m = Model(margs)
        m.set_dtype(mx.float32)
        mx.eval(m.parameters())
        from ..loading import load_generation_config

        gen = load_generation_config(path)
        eos = gen.get("eos_token_id", margs.eos_token_ids)
        margs.eos_token_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        return m, load_tokenizer(path, margs.eos_token_ids), path
    m, tokenizer = load(model)
    path = resolve_model_path(model)
    if args.fine_tune_type == "full" and m.args.quantization:
        raise DGemmaError("full fine-tuning needs a float checkpoint; use LoRA (QLoRA) on a quantized one")
    return m, tokenizer, path


def prepare(model, data, out, args: TrainingArgs, *, resume: Optional[Path] = None, force: bool = False) -> Trainer:
    """Everything up to the first step: checks, model, data, trainer (resumed when asked)."""
    args.validate()
    out = Path(out).expanduser()
    resuming_here = resume is not None and Path(resume).expanduser().resolve().is_relative_to(out.resolve())
    if out.exists() and any(out.iterdir()) and not force and not resuming_here:
        raise DGemmaError(f"{out} already exists; pass --force to replace it")
    m, tokenizer, path = _load_for_training(model, args)
    datasets = load_datasets(data, tokenizer, m.args.eos_token_ids, args.max_seq_length)
    trainer = Trainer(m, tokenizer, datasets, args, out, source=path)
    if resume is not None:
        trainer.resume(Path(resume))
    return trainer


def run(model, data, out, args: TrainingArgs, *, resume: Optional[Path] = None, force: bool = False,
        report: Callable[[Report], None] = lambda r: None) -> Trainer:
    """Train and write the result into ``out`` (see :class:`Trainer`)."""
    trainer = prepare(model, data, out, args, resume=resume, force=force)
    trainer.run(report)
    return trainer


def run_test(model, data, args: TrainingArgs, *, adapter: Optional[Path] = None) -> tuple[float, float, float]:
    """Test-set loss (loss, diffusion, encoder) of a model, with adapters when given."""
    from ..loading import load

    m, tokenizer = load(model, adapter_path=adapter)
    datasets = load_datasets(data, tokenizer, m.args.eos_token_ids, args.max_seq_length)
    if "test" not in datasets:
        raise DGemmaError(f"{data}: no test.jsonl found")
    # Evaluation only: no adapters to add, no steps to schedule (``--iters 0 --test``).
    args = replace(args, fine_tune_type="full", from_scratch=False, iters=max(args.iters, 1), warmup=0)
    trainer = Trainer(m, tokenizer, datasets, args, Path("."), source=None)
    return trainer.evaluate(datasets["test"], None)
