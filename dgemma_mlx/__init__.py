"""dgemma-mlx: Google's DiffusionGemma block-diffusion LM on MLX."""

__version__ = "0.1.0"
