"""dgemma-mlx: Google's DiffusionGemma block-diffusion LM on MLX.

    from dgemma_mlx import load
    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")

``load`` is imported on first use, so ``import dgemma_mlx`` (and ``dgemma --help``) stays fast.
"""

from .errors import DGemmaError

__version__ = "0.1.0"
__all__ = ["load", "DGemmaError", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from .loading import load

        return load
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
