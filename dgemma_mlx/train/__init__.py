"""Training DiffusionGemma with its block-diffusion objective: LoRA (also over a quantized base),
full fine-tuning, and training from scratch (:func:`run`, ``dgemma train``)."""

from .objective import Draws, block_diffusion_loss, canvas_targets, sample_draws
from .run import run, run_test
from .trainer import Report, Trainer, TrainingArgs

__all__ = [
    "Draws", "Report", "Trainer", "TrainingArgs", "block_diffusion_loss", "canvas_targets", "run",
    "run_test", "sample_draws",
]
