"""Image files a user brings, decoded as the datasets' images are: uint8 tensors C x H x W."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Larger images are refused unread, as unreadable: 100 megapixels is far above any real input (a 50-megapixel
# camera's photos pass), and decoding a "decompression bomb" (a few KB that unpack to gigabytes) would exhaust memory.
MAX_PIXELS = 100_000_000


class ImageTooLargeError(ValueError):
    """An image with more pixels than MAX_PIXELS."""


def read_image(path: Path, shape: tuple[int, int, int]) -> Tensor:
    """An image file as the dataset's images are: uint8, grayscale or RGB as ``shape`` says, resized to its size.

    Shrinking averages whole pixel areas (an image enlarged by a whole factor comes back exactly); the aspect ratio
    is not kept. Raises OSError or ValueError (ImageTooLargeError among them) for a file it cannot use.
    """
    channels, height, width = shape
    with warnings.catch_warnings():
        # Pillow warns above its own limit and refuses at twice it; one limit of ours, checked before decoding.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            image_file = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with image_file as image:
        if image.width * image.height > MAX_PIXELS:
            raise ImageTooLargeError(
                f"{image.width}x{image.height} pixels, more than the limit of {MAX_PIXELS:,} "
                "(mlplab.data.images.MAX_PIXELS)"
            )
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            shrinking = image.width >= width and image.height >= height
            image = image.resize((width, height), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    return pixels.unsqueeze(0) if channels == 1 else pixels.permute(2, 0, 1).contiguous()
