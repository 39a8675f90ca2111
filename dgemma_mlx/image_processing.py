"""Reading images and turning them into the vision tower's patches, as transformers' Gemma 4 image
processor (``Gemma4ImageProcessorPil``) does.

For a visual-token budget ``max_soft_tokens`` (70, 140, 280, 560 or 1120) an image is:

1. read with Pillow (PNG, JPEG, WebP, ...), turned upright by its EXIF orientation, converted to
   RGB (transparency composited over white);
2. resized (bicubic, aspect ratio kept) to the largest size whose sides are multiples of
   ``pooling_kernel_size * patch_size`` and that has at most ``max_soft_tokens * k**2`` patches;
3. scaled to [0, 1] and cut into ``patch_size x patch_size`` patches, row-major, each flattened
   as (row, column, channel);
4. padded to ``max_soft_tokens * k**2`` patches, with (x, y) patch positions and (-1, -1) for the
   padding.

The image then takes ``patches / k**2`` soft tokens in the prompt.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .errors import DGemmaError

IMAGE_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_IMAGE_TOKENS = 280


@dataclass(frozen=True)
class ProcessedImage:
    """One image ready for the vision tower.

    ``pixel_values``: float32 [max_patches, 3 * patch**2] in [0, 1] (padding rows zero);
    ``position_ids``: int64 [max_patches, 2], (x, y) per patch, (-1, -1) for padding;
    ``num_soft_tokens``: how many image tokens it takes in the prompt;
    ``size``: (height, width) after resizing.
    """

    pixel_values: np.ndarray
    position_ids: np.ndarray
    num_soft_tokens: int
    size: tuple[int, int]


def check_budget(max_soft_tokens: int) -> int:
    if max_soft_tokens not in IMAGE_TOKEN_BUDGETS:
        raise DGemmaError(
            f"unsupported image token budget {max_soft_tokens} (choose from "
            f"{', '.join(map(str, IMAGE_TOKEN_BUDGETS))})"
        )
    return max_soft_tokens


def load_image(path: Union[str, os.PathLike]):
    """A Pillow RGB image from ``path``, upright by its EXIF orientation.

    Raises :class:`DGemmaError` for a missing, unreadable or non-image file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DGemmaError(f"image '{path}' does not exist")
    if p.is_dir():
        raise DGemmaError(f"image '{path}' is a directory, not an image file")
    return _open(p, str(path))


def decode_image(data: bytes, name: str = "the image"):
    """:func:`load_image` for an image file's bytes (e.g. a data URL's)."""
    import io

    return _open(io.BytesIO(data), name)


def _open(source, name: str):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(source) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except UnidentifiedImageError:
        raise DGemmaError(f"'{name}' is not an image Pillow can read (PNG, JPEG, WebP, ...)")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DGemmaError(f"cannot read image '{name}': {reason}")


def to_rgb(image):
    """RGB, with any transparency composited over white (as transformers' ``convert_to_rgb``)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling: int) -> tuple[int, int]:
    """The resized (height, width): the largest multiples of ``pooling * patch_size`` that keep the
    aspect ratio within ``max_patches`` patches (very thin images keep one pooled row/column)."""
    target_px = max_patches * patch_size**2
    factor = math.sqrt(target_px / (height * width))
    side = pooling * patch_size
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise DGemmaError(f"image of {width}x{height} pixels is too small to resize")
    longest = (max_patches // pooling**2) * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        w, h = side, min(int(math.floor(height / width)) * side, longest)
    if h * w > target_px:
        raise DGemmaError(f"image of {width}x{height} pixels cannot fit {max_patches} patches")
    return h, w


def process_image(
    image, max_soft_tokens: int = DEFAULT_IMAGE_TOKENS, *, patch_size: int = 16, pooling_kernel_size: int = 3
) -> ProcessedImage:
    """Patches and positions of a Pillow image (see the module docstring)."""
    from PIL import Image

    check_budget(max_soft_tokens)
    image = to_rgb(image)
    max_patches = max_soft_tokens * pooling_kernel_size**2
    h, w = target_size(image.height, image.width, patch_size, max_patches, pooling_kernel_size)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # [h, w, 3]
    ph, pw = h // patch_size, w // patch_size
    patches = pixels.reshape(ph, patch_size, pw, patch_size, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(ph * pw, -1)
    gx, gy = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
    positions = np.stack([gx, gy], axis=-1).reshape(-1, 2)
    n = len(patches)
    padded = np.zeros((max_patches, patches.shape[1]), np.float32)
    padded[:n] = patches
    padded_positions = np.full((max_patches, 2), -1, np.int64)
    padded_positions[:n] = positions
    return ProcessedImage(padded, padded_positions, n // pooling_kernel_size**2, (h, w))
