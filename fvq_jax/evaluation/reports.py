"""Reports people can look at: reconstruction grids and code-usage plots (PNG), metrics.json.

Plots use matplotlib's object API with the Agg canvas (no display, no pyplot global state).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from fvq_jax.data.value_range import to_uint8
from fvq_jax.evaluation.host import to_host


def host_uint8(images) -> np.ndarray:
    """uint8 images, or floats in [-1, 1] (any device layout) -> uint8 numpy [..., H, W, C]."""
    images = to_host(images)
    return images if images.dtype == np.uint8 else to_uint8(images)


def image_grid(images, *, columns: int, pad: int = 2) -> np.ndarray:
    """images [B, H, W, C] (uint8, or floats in [-1, 1]) -> uint8 grid of `columns` per row, row-major,
    separated by `pad` white pixels: [r H + (r + 1) pad, columns W + (columns + 1) pad, C]."""
    images = host_uint8(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got {images.shape}")
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * h + (rows + 1) * pad, columns * w + (columns + 1) * pad, c), 255, np.uint8)
    for i in range(n):
        y, x = pad + (i // columns) * (h + pad), pad + (i % columns) * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def reconstruction_grid(inputs, reconstructions, *, max_images: int = 8, pad: int = 2) -> np.ndarray:
    """inputs, reconstructions: [B, H, W, 3] -> uint8 grid, inputs on the top row, reconstructions below.

    Shows the first min(B, max_images) pairs, separated by `pad` white pixels:
    [2 H + 3 pad, n W + (n + 1) pad, 3].
    """
    top, bottom = host_uint8(inputs)[:max_images], host_uint8(reconstructions)[:max_images]
    if top.shape != bottom.shape or top.ndim != 4:
        raise ValueError(f"inputs {top.shape} and reconstructions {bottom.shape} must be matching [B, H, W, C]")
    return image_grid(np.concatenate([top, bottom]), columns=top.shape[0], pad=pad)


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 [H, W, C] image (C = 1 or 3) as a PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")
    return path


def save_reconstruction_grid(inputs, reconstructions, path: str | os.PathLike, **grid_args) -> Path:
    """Write `reconstruction_grid(...)` as a PNG."""
    return save_png(reconstruction_grid(inputs, reconstructions, **grid_args), path)


def save_usage_histogram(counts, path: str | os.PathLike, *, title: str = "code usage",
                         size: tuple[float, float] = (6.0, 3.5), dpi: int = 100) -> Path:
    """Codes sorted by how often they were chosen (log scale), dead codes marked; a PNG.

    counts: [K] assignments per code (e.g. `UsageCounter.counts`). A healthy codebook gives a
    flat curve with no dead tail; collapse shows as a cliff.
    """
    counts = np.sort(np.asarray(counts).reshape(-1))[::-1]
    used = int(np.count_nonzero(counts))
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ranks = np.arange(1, counts.size + 1)
    ax.step(ranks[:used], counts[:used], where="post", color="tab:blue", label=f"used: {used}")
    if used < counts.size:
        ax.axvspan(used + 0.5, counts.size + 0.5, color="tab:red", alpha=0.2,
                   label=f"dead: {counts.size - used}")
    ax.set_yscale("log")
    ax.set_xlim(0.5, counts.size + 0.5)
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("assignments")
    ax.set_title(f"{title}: {used / counts.size:.2%} of {counts.size} codes used")
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _json_value(value):
    if isinstance(value, Mapping):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    array = to_host(value)
    if array.ndim:
        return [_json_value(v) for v in array]
    scalar = array.item()
    if isinstance(scalar, float) and not math.isfinite(scalar):
        return str(scalar)  # JSON has no inf / nan: "inf", "-inf", "nan"
    return scalar


def write_metrics_json(metrics: Mapping, path: str | os.PathLike) -> Path:
    """Write nested metrics (python, numpy or jax scalars and arrays) as sorted, indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_value(metrics), indent=2, sort_keys=True) + "\n")
    return path
