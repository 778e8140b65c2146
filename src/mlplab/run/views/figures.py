"""Images for TensorBoard, drawn with Pillow: a confusion matrix and a captioned grid of images.

Pillow draws either in a few milliseconds; matplotlib takes ~0.2 s a figure (and ~0.5 s to import), too much to
draw one after every validation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Row shares from 0 to 1 go from near-white to dark blue; counts on dark cells are written in white.
LIGHT, DARK = np.array([247, 251, 255]), np.array([8, 48, 107])
MARGIN = 8


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int]:
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def confusion_image(counts: np.ndarray, class_names: Sequence[str], title: str, cell: int = 44) -> np.ndarray:
    """Rows are the true classes, columns the predicted ones; each cell shows its count, coloured by its row share.

    Returns an H x W x 3 uint8 array.
    """
    n = len(class_names)
    font, small = _font(13), _font(12)
    name_width = max(_text_size(small, name)[0] for name in class_names) + MARGIN
    title_height = _text_size(font, title)[1] + 2 * MARGIN
    left, top = name_width + 24, title_height + name_width + 24
    image = Image.new("RGB", (left + n * cell + MARGIN, top + n * cell + MARGIN), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, MARGIN), title, fill="black", font=font)
    draw.text((MARGIN, top - 18), "rows: true, columns: predicted", fill="black", font=small)
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    shares = counts / totals
    for row, name in enumerate(class_names):
        width, height = _text_size(small, name)
        y = top + row * cell + (cell - height) // 2
        draw.text((left - width - MARGIN, y), name, fill="black", font=small)
        label = _vertical_text(name, small)  # the same class as a column, above the grid
        image.paste(label, (left + row * cell + (cell - label.width) // 2, title_height + name_width - label.height))
        for column in range(n):
            x0, y0 = left + column * cell, top + row * cell
            colour = tuple(int(c) for c in LIGHT + (DARK - LIGHT) * shares[row, column])
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=colour, outline=(200, 200, 200))
            text = str(int(counts[row, column]))
            width, height = _text_size(small, text)
            draw.text(
                (x0 + (cell - width) // 2, y0 + (cell - height) // 2),
                text,
                font=small,
                fill="white" if shares[row, column] > 0.5 else "black",
            )
    return np.asarray(image)


def _vertical_text(text: str, font) -> Image.Image:
    """``text`` written bottom to top, for the column labels; its width is the text's height."""
    width, height = _text_size(font, text)
    label = Image.new("RGB", (width + 2, height + 4), "white")
    ImageDraw.Draw(label).text((0, 0), text, fill="black", font=font)
    return label.rotate(90, expand=True)


def image_grid(images: np.ndarray, captions: Sequence[str], columns: int = 8, scale: int = 3) -> np.ndarray:
    """Images (N x C x H x W, uint8; C is 1 or 3) in rows of ``columns``, each enlarged and captioned below.

    Returns an H x W x 3 uint8 array.
    """
    font = _font(11)
    count, channels, height, width = images.shape
    caption_height = max((_text_size(font, caption)[1] for caption in captions), default=0) + 6
    tile_width = max(width * scale, *(_text_size(font, caption)[0] + 4 for caption in captions))
    tile_height = height * scale + caption_height
    rows = max(1, -(-count // columns))
    grid = Image.new(
        "RGB", (min(count, columns) * (tile_width + MARGIN) + MARGIN, rows * (tile_height + MARGIN) + MARGIN), "white"
    )
    draw = ImageDraw.Draw(grid)
    for index, (pixels, caption) in enumerate(zip(images, captions)):
        mode_pixels = pixels[0] if channels == 1 else pixels.transpose(1, 2, 0)
        tile = Image.fromarray(np.ascontiguousarray(mode_pixels)).convert("RGB")
        tile = tile.resize((width * scale, height * scale), Image.Resampling.NEAREST)
        x = MARGIN + (index % columns) * (tile_width + MARGIN)
        y = MARGIN + (index // columns) * (tile_height + MARGIN)
        grid.paste(tile, (x + (tile_width - width * scale) // 2, y))
        draw.multiline_text((x + 2, y + height * scale + 3), caption, fill="black", font=font)
    return np.asarray(grid)
