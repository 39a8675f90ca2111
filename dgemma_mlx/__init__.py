"""dgemma-mlx: Google's DiffusionGemma block-diffusion LM on MLX.

    from dgemma_mlx import load
    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
"""

from .errors import DGemmaError
from .loading import load

__version__ = "0.1.0"
__all__ = ["load", "DGemmaError", "__version__"]
