"""The training loop: LoRA, full fine-tuning or training from scratch with the block-diffusion
objective, with evaluation, atomic resumable checkpoints and progress reports.

Randomness depends only on the seed and the iteration (batch order, the objective's draws,
dropout), so a run resumed from a checkpoint (weights, optimizer state, iteration) continues the
loss curve an uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..adapters import AdapterConfig, apply_lora, load_adapters, save_adapters
from ..errors import DGemmaError
from ..files import atomic_dir
from .checkpoint import save_model
from .data import Batch, Dataset, fixed_batches, iterate_batches
from .objective import EPS, block_diffusion_loss, prefix_length, sample_draws

FINE_TUNE_TYPES = ("lora", "full")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
COMPILED_LENGTH_MULTIPLE = 64


@dataclass
class TrainingArgs:
    fine_tune_type: str = "lora"
    from_scratch: bool = False
    iters: int = 1000
    batch_size: int = 4
    grad_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    min_learning_rate: float = 0.0
    warmup: int = 0
    weight_decay: float = 0.0
    max_seq_length: int = 2048
    seed: int = 0
    steps_per_report: int = 10
    steps_per_eval: int = 200
    val_batches: int = 25
    save_every: int = 100
    encoder_loss_weight: float = 1.0
    noise_min: float = EPS
    noise_max: float = 1.0
    self_conditioning_p: float = 0.5
    blocks_per_example: int = 1  # blocks denoised per example on one encoder pass (1: the reference's)
    ordered_p: float = 0.0  # share of canvases corrupted only right of a random cut (0: the reference's)
    grad_checkpoint: bool = False
    compile: bool = True  # compile the step (with grad_accumulation_steps == 1)
    stop_after: Optional[int] = None  # end this run there with a resumable checkpoint (schedule: iters)
    lora: AdapterConfig = field(default_factory=AdapterConfig)

    def validate(self) -> None:
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise DGemmaError(f"unknown --fine-tune-type '{self.fine_tune_type}' (choose lora or full)")
        if self.from_scratch and self.fine_tune_type != "full":
            raise DGemmaError("--from-scratch trains every weight: use it with --fine-tune-type full")
        for name in ("iters", "batch_size", "grad_accumulation_steps", "steps_per_report", "steps_per_eval", "save_every",
                     "blocks_per_example"):
            if getattr(self, name) <= 0:
                extra = " (or 0 with --test: evaluation only)" if name == "iters" else ""
                raise DGemmaError(f"--{name.replace('_', '-')} must be at least 1{extra}")
        if self.learning_rate <= 0:
            raise DGemmaError("--learning-rate must be positive")
        if self.max_seq_length <= 0:
            raise DGemmaError("--max-seq-length must be at least 1")
        if self.stop_after is not None and self.stop_after <= 0:
            raise DGemmaError("--stop-after must be at least 1")
        if self.val_batches == 0:
            raise DGemmaError("--val-batches must be at least 1 (or -1: the whole validation set)")
        if self.seed < 0:
            raise DGemmaError("--seed must be non-negative")
        if self.encoder_loss_weight < 0:
            raise DGemmaError("--encoder-loss-weight must be non-negative")
        if self.weight_decay < 0 or self.min_learning_rate < 0:
            raise DGemmaError("--weight-decay and --min-learning-rate must be non-negative")
        if self.fine_tune_type == "lora":
            if self.lora.rank <= 0:
                raise DGemmaError(f"--lora-rank must be at least 1 (got {self.lora.rank})")
            if not 0 <= self.lora.dropout < 1:
                raise DGemmaError(f"--lora-dropout must be in [0, 1) (got {self.lora.dropout})")
        if not 0 <= self.noise_min < self.noise_max <= 1:
            raise DGemmaError("corruption ratios need 0 <= noise-min < noise-max <= 1")
        if not 0 <= self.self_conditioning_p <= 1:
            raise DGemmaError("self-conditioning probability must be in [0, 1]")
        if not 0 <= self.ordered_p <= 1:
            raise DGemmaError(f"--ordered-corruption must be in [0, 1] (got {self.ordered_p})")
        if self.warmup < 0 or self.warmup >= self.iters + 1:
            raise DGemmaError("--warmup must be between 0 and --iters")


def learning_rate_schedule(args: TrainingArgs):
    """Linear warm-up to ``learning_rate``, then cosine decay to ``min_learning_rate``."""
    decay = optim.cosine_decay(args.learning_rate, max(args.iters - args.warmup, 1), end=args.min_learning_rate)
    if not args.warmup:
        return decay
    warm = optim.linear_schedule(args.learning_rate / args.warmup, args.learning_rate, args.warmup)
    return optim.join_schedules([warm, decay], [args.warmup])


def step_key(seed: int, iteration: int, micro: int = 0) -> mx.array:
    """The random key of one (micro-)batch: a function of the seed and the position only
    (all non-negative)."""
    return mx.random.key(int(np.random.default_rng((seed, iteration, micro)).integers(0, 2**62)))


def eval_key(seed: int, batch: int) -> mx.array:
    """The fixed draws of evaluation batch ``batch`` (a stream apart from the training steps')."""
    return mx.random.key(int(np.random.default_rng((seed, batch, 0, 0, 1)).integers(0, 2**62)))


@dataclass
class Report:
    """One progress report (``kind`` is ``train``, ``val``, ``save`` or ``test``)."""

    kind: str
    iteration: int
    loss: float = float("nan")
    diffusion_loss: float = float("nan")
    encoder_loss: float = float("nan")
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0
    eta_seconds: float = 0.0
    path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Trainer:
    """Owns the model being trained, the optimizer and the data; :meth:`run` trains."""

    def __init__(self, model, tokenizer, datasets: dict[str, Dataset], args: TrainingArgs, out: Path,
                 *, source: Optional[Path] = None, eos_id: Optional[int] = None):
        args.validate()
        self.model, self.tokenizer, self.args, self.out = model, tokenizer, args, Path(out)
        self.source = source
        self.train_set = datasets["train"]
        self.valid_set = datasets.get("valid")
        self.test_set = datasets.get("test")
        self.eos_id = eos_id if eos_id is not None else _eos_id(tokenizer, model)
        if args.fine_tune_type == "lora":
            mx.random.seed(args.seed)  # the adapters' initial A: same seed, same run
            self.trainable = apply_lora(model, args.lora)
        else:
            model.unfreeze()
            self.trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        if args.grad_checkpoint:
            _checkpoint_layers(model)
        self.optimizer = optim.AdamW(learning_rate=learning_rate_schedule(args), weight_decay=args.weight_decay)
        self.iteration = 0
        self.history: list[dict] = []
        self._loss_and_grad = nn.value_and_grad(model, self._loss)
        self._compiled: dict = {}

    # ------------------------------------------------------------------------------ the step
    def _draws(self, batch: Batch, key: mx.array, reference: bool = False) -> tuple:
        """The step's inputs: ``(input_ids, attention_mask, response_mask, block_index, canvas_ids,
        self_conditioning_mask)`` and the encoder length needed (see :func:`prefix_length`).
        ``reference``: one block per example, iid corruption (evaluation's draws, whatever the
        run's ``blocks_per_example`` and ``ordered_p``)."""
        m, a = self.model, self.args
        ids, rm = mx.array(batch.input_ids), mx.array(batch.response_mask)
        d = sample_draws(
            key, ids, rm, canvas_length=m.args.canvas_length, vocab_size=m.args.vocab_size,
            eos_id=self.eos_id, t_range=(a.noise_min, a.noise_max), self_conditioning_p=a.self_conditioning_p,
            blocks_per_example=1 if reference else a.blocks_per_example,
            ordered_p=0.0 if reference else a.ordered_p,
        )
        inputs = (ids, mx.array(batch.attention_mask), rm, d.block_index, d.canvas_ids, d.self_conditioning_mask)
        K = d.canvas_ids.shape[0] // ids.shape[0]
        length = (None if a.encoder_loss_weight else
                  prefix_length(np.repeat(batch.response_mask, K, axis=0), d.block_index, m.args.canvas_length))
        return inputs, length

    def _objective(self, *inputs, prefix_length: Optional[int] = None):
        return block_diffusion_loss(
            self.model, *inputs, eos_id=self.eos_id, encoder_weight=self.args.encoder_loss_weight,
            prefix_length=prefix_length,
        )

    def _loss(self, batch: Batch, key: mx.array, reference: bool = False):
        inputs, length = self._draws(batch, key, reference)
        return self._objective(*inputs, prefix_length=length)

    @property
    def compilable(self) -> bool:
        """Whether steps run compiled: asked for, no gradient accumulation, and no expert
        strategy that waits for the device inside the step."""
        return (self.args.compile and self.args.grad_accumulation_steps == 1
                and not self.model.host_syncs)

    def _compiled_step(self, length: Optional[int]):
        """One optimizer step (gradient and update) compiled into one graph: MLX fuses the
        elementwise work of the forward and backward passes (about twice as fast on the CPU).
        One compiled step per encoder length (a Python constant of the graph)."""
        if length not in self._compiled:
            model, optimizer = self.model, self.optimizer
            grad_fn = nn.value_and_grad(model, lambda *x: self._objective(*x, prefix_length=length))
            state = [model.state, optimizer.state, mx.random.state]

            def step(*inputs):
                out, grads = grad_fn(*inputs)
                optimizer.update(model, grads)
                return mx.stack(list(out))

            self._compiled[length] = mx.compile(step, inputs=state, outputs=state)
        return self._compiled[length]

    def evaluate(self, dataset: Dataset, limit: Optional[int]) -> tuple[float, float, float]:
        """Mean (loss, diffusion, encoder) over the first ``limit`` batches (all when ``limit`` is
        None or negative), with fixed draws: the reference's (one block per example, iid corruption),
        whatever ``blocks_per_example`` and ``ordered_p``."""
        self.model.eval()
        totals = np.zeros(3)
        batches = fixed_batches(dataset, self.args.batch_size, limit)
        for i, batch in enumerate(batches):
            out = self._loss(batch, eval_key(self.args.seed, i), reference=True)
            mx.eval(out)
            totals += [float(x) for x in out]
        self.model.train()
        return tuple(totals / max(len(batches), 1))

    def _step(self) -> tuple[np.ndarray, int]:
        a = self.args
        grads, totals, tokens = None, np.zeros(3), 0
        batches = self._batches
        if self.compilable:
            _, batch = next(batches)
            batch = _pad_batch(batch, COMPILED_LENGTH_MULTIPLE)
            mx.random.seed(int(np.random.default_rng((a.seed, self.iteration, 0, 7)).integers(0, 2**31)))
            inputs, length = self._draws(batch, step_key(a.seed, self.iteration, 0))
            out = self._compiled_step(length)(*inputs)
            mx.eval(out, self.model.parameters(), self.optimizer.state)
            self.iteration += 1
            return np.array(out, dtype=np.float64), batch.tokens
        for micro in range(a.grad_accumulation_steps):
            _, batch = next(batches)
            mx.random.seed(int(np.random.default_rng((a.seed, self.iteration, micro, 7)).integers(0, 2**31)))
            out, g = self._loss_and_grad(batch, step_key(a.seed, self.iteration, micro))
            grads = g if grads is None else _tree_add(grads, g)
            mx.eval(out, grads)
            totals += [float(x) for x in out]
            tokens += batch.tokens
        if a.grad_accumulation_steps > 1:
            grads = _tree_scale(grads, 1.0 / a.grad_accumulation_steps)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.iteration += 1
        return totals / a.grad_accumulation_steps, tokens

    # ------------------------------------------------------------------------------- the loop
    def run(self, report: Callable[[Report], None] = lambda r: None) -> None:
        """Train until ``iters`` (or ``stop_after``: then leave a resumable checkpoint, as Ctrl-C
        does, and return); Ctrl-C saves a resumable checkpoint and re-raises."""
        a = self.args
        self.model.train()
        self._batches = iterate_batches(
            self.train_set, a.batch_size, a.seed, start=self.iteration * a.grad_accumulation_steps
        )
        mx.reset_peak_memory()
        window = np.zeros(3)
        window_steps = window_tokens = 0
        start = tick = time.perf_counter()
        first = self.iteration
        try:
            while self.iteration < a.iters:
                losses, tokens = self._step()
                window += losses
                window_steps += 1
                window_tokens += tokens
                it = self.iteration
                if it % a.steps_per_report == 0 or it == a.iters:
                    now = time.perf_counter()
                    mean = window / window_steps
                    rate = (it - first) / (now - start)
                    r = Report("train", it, *mean, learning_rate=float(self.optimizer.learning_rate),
                               tokens_per_second=window_tokens / (now - tick),
                               peak_memory_gb=mx.get_peak_memory() / 1e9,
                               eta_seconds=(a.iters - it) / max(rate, 1e-9))
                    self._record(r, report)
                    window[:] = 0
                    window_steps = window_tokens = 0
                    tick = now
                if self.valid_set is not None and (it % a.steps_per_eval == 0 or it == a.iters):
                    self._record(Report("val", it, *self.evaluate(self.valid_set, a.val_batches)), report)
                if it < a.iters and (it % a.save_every == 0 or it == a.stop_after):
                    self.save_checkpoint()
                    report(Report("save", it, path=str(self.checkpoint_dir)))
                if a.stop_after is not None and a.stop_after <= it < a.iters:
                    return
        except KeyboardInterrupt:
            if self.iteration > first:
                self.save_checkpoint()
                report(Report("save", self.iteration, path=str(self.checkpoint_dir)))
            raise
        self.save_final()
        report(Report("save", self.iteration, path=str(self.out)))

    def _record(self, r: Report, report) -> None:
        self.history.append({k: v for k, v in r.to_dict().items() if k not in ("path",)})
        report(r)

    # -------------------------------------------------------------------------------- saving
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoint"

    def _write_result(self, dst: Path) -> None:
        if self.args.fine_tune_type == "lora":
            save_adapters(self.model, dst, self.args.lora)
        else:
            save_model(self.model, self.source, dst)

    def save_checkpoint(self) -> None:
        """A resumable checkpoint in ``OUT/checkpoint``: the result so far, optimizer and state."""
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.checkpoint_dir) as tmp:
            self._write_result(tmp / "result")
            state = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(tmp / OPTIMIZER_FILE), {k: v for k, v in state.items() if isinstance(v, mx.array)})
            (tmp / STATE_FILE).write_text(json.dumps(
                {"iteration": self.iteration, "args": _jsonable(self.args), "history": self.history}, indent=1
            ))

    def save_final(self) -> None:
        """The finished result in ``OUT`` (adapters, or a complete checkpoint), replacing the
        resumable checkpoint; the training log goes beside it."""
        self.out.mkdir(parents=True, exist_ok=True)
        with atomic_dir(self.out / ".final") as tmp:
            self._write_result(tmp)
            (tmp / "training_log.json").write_text(json.dumps(
                {"iterations": self.iteration, "args": _jsonable(self.args), "history": self.history}, indent=1
            ))
        final = self.out / ".final"
        for f in final.iterdir():
            f.replace(self.out / f.name)
        final.rmdir()
        if self.checkpoint_dir.exists():
            import shutil

            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint directory (weights/adapters, optimizer state, iteration), or
        start from the weights of an adapter file/directory (``--resume-adapter-file``)."""
        path = Path(path).expanduser()
        state_file = path / STATE_FILE
        if not state_file.is_file():
            if self.args.fine_tune_type != "lora":
                raise DGemmaError(f"{path}: not a training checkpoint (no {STATE_FILE})")
            _load_adapter_weights(self.model, path)
            return
        try:
            state = json.loads(state_file.read_text())
            iteration = int(state["iteration"])
            opt = mx.load(str(path / OPTIMIZER_FILE))
        except Exception as e:
            raise DGemmaError(f"{path}: a broken training checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        result = path / "result"
        if self.args.fine_tune_type == "lora":
            _load_adapter_weights(self.model, result)
        else:
            from ..loading import load_model

            try:
                loaded, _ = load_model(result)
            except DGemmaError as e:
                raise DGemmaError(f"{path}: a broken training checkpoint ({e})")
            self.model.update(loaded.parameters())
        self.optimizer.init(self.model.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(opt.items()))
        self.iteration = iteration
        self.history = list(state.get("history", []))


def _pad_batch(batch: Batch, multiple: int) -> Batch:
    """Right-pad a batch to a length multiple of ``multiple``: padding is outside every mask, so
    the loss is unchanged, and a compiled step sees few distinct shapes (each one compiles once)."""
    B, L = batch.input_ids.shape
    pad = -L % multiple
    if not pad:
        return batch
    grow = lambda x: np.pad(x, ((0, 0), (0, pad)))
    return Batch(grow(batch.input_ids), grow(batch.attention_mask), grow(batch.response_mask))


def _load_adapter_weights(model, path: Path) -> None:
    f = path / "adapters.safetensors" if path.is_dir() else path
    try:
        weights = mx.load(str(f))
    except Exception:
        raise DGemmaError(f"{f}: not a readable adapter file")
    expected = dict(tree_flatten(model.trainable_parameters()))
    if set(weights) != set(expected) or any(weights[k].shape != expected[k].shape for k in weights):
        raise DGemmaError(f"{f}: these adapters do not match this model and LoRA settings")
    model.load_weights(list(weights.items()), strict=False)


def _eos_id(tokenizer, model) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return int(eos) if eos is not None else int(model.args.eos_token_ids[0])


def _jsonable(args: TrainingArgs) -> dict:
    return json.loads(json.dumps(asdict(args), default=str))


def _tree_add(a, b):
    from mlx.utils import tree_map

    return tree_map(lambda x, y: x + y, a, b)


def _tree_scale(a, s: float):
    from mlx.utils import tree_map

    return tree_map(lambda x: x * s, a)


def _checkpoint_layers(model) -> None:
    """Recompute the dense MLPs' activations in the backward pass (mlx-lm's gradient
    checkpointing; the attention and expert blocks read caches and routing state, so they keep
    theirs)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    grad_checkpoint(model.layers[0].mlp)
