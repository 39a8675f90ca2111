"""``dgemma train`` and ``dgemma fuse``: the command-line face of :mod:`dgemma_mlx.train` and
:mod:`dgemma_mlx.adapters` (flags named as ``mlx_lm.lora`` names them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import app, err, user_errors
from .errors import DGemmaError

CONFIG_KEYS = {
    "model", "data", "adapter_path", "fine_tune_type", "from_scratch", "iters", "batch_size",
    "grad_accumulation_steps", "learning_rate", "min_learning_rate", "warmup", "weight_decay",
    "max_seq_length", "seed", "steps_per_report", "steps_per_eval", "val_batches", "save_every",
    "resume_adapter_file", "grad_checkpoint", "test", "encoder_loss_weight", "noise_min", "noise_max",
    "self_conditioning_p", "blocks_per_example", "ordered_p", "lora_rank", "lora_alpha", "lora_dropout", "lora_scale", "lora_mode",
    "force", "compile", "stop_after",
}


def read_yaml_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise DGemmaError(f"cannot read config '{path}': {e.strerror}")
    except yaml.YAMLError as e:
        raise DGemmaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(data, dict):
        raise DGemmaError(f"{path}: expected a mapping of option names to values")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise DGemmaError(f"{path}: unknown option '{unknown[0]}'")
    return data


class TrainingView:
    """Rich progress for a training run: a bar with iteration and ETA, and one line per report."""

    def __init__(self, total: int, start: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]Training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
            TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, status="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def __call__(self, r) -> None:
        if r.kind == "train":
            line = (
                f"iter {r.iteration}: loss {r.loss:.4f} (diffusion {r.diffusion_loss:.4f}, encoder "
                f"{r.encoder_loss:.4f}), lr {r.learning_rate:.2e}, {r.tokens_per_second:.0f} tok/s, "
                f"peak {_memory(r.peak_memory_gb)}"
            )
            self.progress.update(self.task, completed=r.iteration, status=f"loss {r.loss:.3f}")
            self.progress.console.print(line, style="dim", highlight=False)
        elif r.kind == "val":
            self.progress.console.print(
                f"iter {r.iteration}: validation loss {r.loss:.4f} (diffusion {r.diffusion_loss:.4f}, "
                f"encoder {r.encoder_loss:.4f})", highlight=False,
            )
        elif r.kind == "save":
            self.progress.console.print(f"iter {r.iteration}: saved {r.path}", style="dim", highlight=False)


def _memory(gb: float) -> str:
    return f"{gb * 1000:.0f} MB" if gb < 1 else f"{gb:.2f} GB"


@app.command()
@user_errors
def train(
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="PATH", help="Base checkpoint (directory or repo id); with --from-scratch only its config and tokenizer are used."),
    data: Optional[str] = typer.Option(None, "--data", metavar="PATH", help="Directory with train.jsonl (valid.jsonl, test.jsonl), or one .jsonl file."),
    adapter_path: Optional[str] = typer.Option(None, "--adapter-path", metavar="PATH", help="Output directory: adapters (LoRA) or a complete checkpoint (full, from scratch)."),
    fine_tune_type: Optional[str] = typer.Option(None, "--fine-tune-type", metavar="TYPE", help="lora (default) or full."),
    from_scratch: bool = typer.Option(False, "--from-scratch", help="Random initial weights from the model's config (implies full)."),
    iters: Optional[int] = typer.Option(None, "--iters", metavar="N", help="Optimizer steps (default 1000)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N", help="Examples per step (default 4)."),
    grad_accumulation_steps: Optional[int] = typer.Option(None, "--grad-accumulation-steps", metavar="N", help="Batches whose gradients make one step (default 1)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", metavar="X", help="Peak learning rate (default 1e-5)."),
    min_learning_rate: Optional[float] = typer.Option(None, "--min-learning-rate", metavar="X", help="Learning rate at the end of the cosine decay (default 0)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", metavar="N", help="Linear warm-up steps (default 0)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", metavar="X", help="AdamW weight decay (default 0)."),
    max_seq_length: Optional[int] = typer.Option(None, "--max-seq-length", metavar="N", help="Longer rows are truncated (default 2048)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Random seed (default 0)."),
    steps_per_report: Optional[int] = typer.Option(None, "--steps-per-report", metavar="N", help="Report the training loss every N steps (default 10)."),
    steps_per_eval: Optional[int] = typer.Option(None, "--steps-per-eval", metavar="N", help="Validation loss every N steps (default 200)."),
    val_batches: Optional[int] = typer.Option(None, "--val-batches", metavar="N", help="Validation batches per evaluation; -1: the whole set (default 25)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", metavar="N", help="Resumable checkpoint every N steps (default 100)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", metavar="N", help="End this run at iteration N with a resumable checkpoint; the schedule stays set for --iters."),
    resume_adapter_file: Optional[str] = typer.Option(None, "--resume-adapter-file", metavar="PATH", help="Continue from OUT/checkpoint, or start from saved adapters."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute MLP activations in the backward pass (less memory)."),
    no_compile: bool = typer.Option(False, "--no-compile", help="Run steps uncompiled (by default a step compiles into one graph when the experts allow it)."),
    test: bool = typer.Option(False, "--test", help="After training (or instead, with --iters 0), report the test-set loss."),
    encoder_loss_weight: Optional[float] = typer.Option(None, "--encoder-loss-weight", metavar="X", help="Weight of the encoder's causal-LM loss (default 1.0)."),
    noise_min: Optional[float] = typer.Option(None, "--noise-min", metavar="X", help="Lowest corruption ratio t (default 1e-3)."),
    noise_max: Optional[float] = typer.Option(None, "--noise-max", metavar="X", help="Highest corruption ratio t (default 1.0)."),
    self_conditioning_p: Optional[float] = typer.Option(None, "--self-conditioning-p", metavar="X", help="Share of examples trained with self-conditioning (default 0.5)."),
    blocks_per_example: Optional[int] = typer.Option(None, "--blocks-per-example", metavar="N", help="Response blocks denoised per example on one encoder pass: N times the denoiser's signal per step (default 1, the reference's)."),
    ordered_p: Optional[float] = typer.Option(None, "--ordered-corruption", metavar="X", help="Share of canvases corrupted only right of a random cut, clean left of it: the states of a left-to-right run (default 0, the reference's iid corruption)."),
    lora_rank: Optional[int] = typer.Option(None, "--lora-rank", metavar="N", help="LoRA rank (default 16)."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", metavar="X", help="LoRA alpha; scale = alpha / rank (default 32)."),
    lora_dropout: Optional[float] = typer.Option(None, "--lora-dropout", metavar="X", help="LoRA dropout (default 0)."),
    lora_scale: Optional[float] = typer.Option(None, "--lora-scale", metavar="X", help="LoRA scale, overriding alpha / rank."),
    lora_mode: Optional[str] = typer.Option(None, "--lora-mode", metavar="MODE", help="separate (encoder and decoder adapters, default) or shared."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", metavar="PATH", help="YAML file of these options (flags override it)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --adapter-path."),
):
    """Fine-tune (LoRA, QLoRA, full) or train from scratch with the block-diffusion objective."""
    flags = {k: v for k, v in locals().items() if k != "config" and v is not None and v is not False}
    options = {**(read_yaml_config(config) if config else {}), **flags}
    from .adapters import AdapterConfig
    from .train import TrainingArgs, run, run_test
    from .train.run import prepare

    for name in ("model", "data", "adapter_path"):
        if not options.get(name):
            raise DGemmaError(f"--{name.replace('_', '-')} is required")
    lora_mode = options.pop("lora_mode", "separate")
    if lora_mode not in ("separate", "shared"):
        raise DGemmaError(f"--lora-mode must be separate or shared (got {lora_mode})")
    lora = AdapterConfig(
        rank=options.pop("lora_rank", 16), alpha=options.pop("lora_alpha", 32.0),
        dropout=options.pop("lora_dropout", 0.0), scale=options.pop("lora_scale", None),
        separate=lora_mode == "separate",
    )
    model_name, data, out = options.pop("model"), options.pop("data"), Path(options.pop("adapter_path"))
    resume = options.pop("resume_adapter_file", None)
    do_test, force = options.pop("test", False), options.pop("force", False)
    if options.pop("no_compile", False):
        options["compile"] = False
    if options.get("from_scratch"):
        options.setdefault("fine_tune_type", "full")
    try:
        args = TrainingArgs(**options, lora=lora)
    except TypeError as e:
        raise DGemmaError(f"bad option: {e}")
    if args.iters == 0 and do_test:
        loss = run_test(model_name, data, args, adapter=Path(resume) if resume else None)
        _print_test(loss)
        return
    trainer = prepare(model_name, data, out, args, resume=Path(resume) if resume else None, force=force)
    train_set = trainer.train_set
    err.print(
        f"Training {trainer.trainable:,} parameters ({args.fine_tune_type}{', from scratch' if args.from_scratch else ''}) "
        f"on {len(train_set)} examples ({train_set.tokens:,} tokens"
        + (f"; {train_set.truncated} truncated to {args.max_seq_length}" if train_set.truncated else "")
        + ")", highlight=False,
    )
    with TrainingView(args.iters, trainer.iteration) as view:
        trainer.run(view)
    if trainer.iteration < args.iters:
        err.print(f"Stopped at iteration {trainer.iteration} of {args.iters}: continue with "
                  f"--resume-adapter-file {trainer.checkpoint_dir}", highlight=False)
        return
    err.print(f"Wrote {out}", highlight=False)
    if do_test:
        if trainer.test_set is None:
            raise DGemmaError(f"{data}: no test.jsonl found")
        _print_test(trainer.evaluate(trainer.test_set, None))


def _print_test(loss) -> None:
    total, diffusion, encoder = loss
    print(f"test loss {total:.4f} (diffusion {diffusion:.4f}, encoder {encoder:.4f})")


@app.command()
@user_errors
def fuse(
    model: str = typer.Option(..., "--model", "-m", metavar="PATH", help="Base checkpoint (directory or repo id)."),
    adapter_path: str = typer.Option(..., "--adapter-path", metavar="PATH", help="Trained adapters."),
    save_path: str = typer.Option(..., "--save-path", metavar="PATH", help="Output directory for the standalone checkpoint."),
    export_peft: bool = typer.Option(False, "--export-peft", help="Write the adapters in PEFT's format instead (for transformers / vLLM)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --save-path."),
):
    """Fold adapters into a standalone checkpoint (or export them for PEFT)."""
    from .adapters import export_peft as write_peft, fuse_adapters, read_adapter_config
    from .files import atomic_dir
    from .loading import load, resolve_model_path
    from .train.checkpoint import save_model

    out = Path(save_path).expanduser()
    if out.exists() and not force:
        raise DGemmaError(f"{out} already exists; pass --force to replace it")
    mdl, _ = load(model, adapter_path=adapter_path)
    if export_peft:
        write_peft(mdl, read_adapter_config(Path(adapter_path)), out, base_model_name=model)
    else:
        fuse_adapters(mdl)
        with atomic_dir(out) as tmp:
            save_model(mdl, resolve_model_path(model), tmp)
    err.print(f"Wrote {out}", highlight=False)
