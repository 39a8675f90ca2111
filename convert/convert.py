#!/usr/bin/env python3
"""Convert a Hugging Face DiffusionGemma checkpoint to MLX.

    python convert/convert.py --hf-path google/diffusiongemma-26B-A4B-it --mlx-path dgemma-4bit -q

Same options as ``dgemma convert`` (run with ``--help``).
"""

import sys

from dgemma_mlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
