"""Image files to tensors: PIL decoding, colour modes, preprocessing transforms and up-front verification.

Colour. RGB benchmarks: colour modes other than RGB (RGBA, CMYK, YCbCr, P with
a colour palette, ...) go through PIL's ``convert("RGB")``; RGBA's alpha channel
is dropped (transparent pixels keep their stored colour), not composited on a
background. Grayscale images (modes 1, L, LA,
I, I;16, F, or P with a gray palette) are an error unless
``convert_grayscale=True`` (the config's ``allow_grayscale: true``), which
replicates the gray channel; :func:`verify` counts them. 1-channel benchmarks
convert everything to "L" (ITU-R 601 luma, the weights of
:func:`~diffguard_pl.data.benchmark.to_channels`). 16-bit and float images are
scaled to 8 bits before conversion rather than clipped.

Errors. An image that cannot be decoded (undecodable, truncated), or a
grayscale image in an RGB benchmark without ``convert_grayscale``, raises a
:class:`DataError` naming the file (and its list line); :func:`verify` checks
every image up front (open, ``verify()``, full decode) and, with
``on_error="skip"``, drops the bad ones as :class:`~diffguard_pl.data.image_lists.Problem` records.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffguard_pl.data.definition import benchmark_definition
from diffguard_pl.data.image_lists import ImageEntry, Problem, check_on_error, problem_for
from diffguard_pl.errors import DataError

# What PIL raises on broken files (UnidentifiedImageError is an OSError; verify() raises SyntaxError for bad PNGs).
DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, Image.DecompressionBombError
)
GRAYSCALE_FIX = (
    "set data.allow_grayscale=true to convert grayscale images to RGB, "
    "or fix the list / replace the image"
)

Transform = Callable[[Image.Image], torch.Tensor]


# --------------------------------------------------------------------------- decoding and colour


_GRAY_MODES = {"1", "L", "LA", "I", "F"}


def is_grayscale(image: Image.Image) -> bool:
    """Whether an image has no colour: a gray mode, or a palette whose used colours are all gray."""
    if image.mode in _GRAY_MODES or image.mode.startswith("I;"):
        return True
    if image.mode in ("P", "PA"):
        rgb = np.asarray(image.convert("RGB"))
        return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    return False


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float gray images to "L" by scaling (PIL's convert would clip at 255)."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;"):
        return image.convert("L")
    values = np.asarray(image, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if image.mode == "F" and top <= 1.0:
        scale = 255.0
    elif top > 255.0:
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), "L")


def to_mode(image: Image.Image, channels: int, convert_grayscale: bool, where: str) -> Image.Image:
    """``image`` as "RGB" (channels=3) or "L" (channels=1), by the rules in the module docstring."""
    if channels == 1:
        if image.mode == "L":
            return image
        if image.mode in _GRAY_MODES or image.mode.startswith("I;"):
            return _to_8bit_gray(image)
        return (image if image.mode == "RGB" else image.convert("RGB")).convert("L")
    if channels != 3:
        raise ValueError(f"channels={channels}: use 1 or 3")
    if is_grayscale(image):
        if not convert_grayscale:
            raise DataError(f"{where}: grayscale image (mode {image.mode}) in an RGB benchmark; {GRAYSCALE_FIX}")
        return _to_8bit_gray(image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An "L" or "RGB" PIL image as a float tensor [C, H, W] in [0, 1]."""
    array = np.array(image, dtype=np.uint8, copy=True)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def decode(path: str) -> Image.Image:
    """The image at ``path``, fully decoded, its file closed."""
    with Image.open(path) as image:
        image.load()
        return image.copy()  # closing the file releases the decoded data of ``image`` itself


# --------------------------------------------------------------------------- preprocessing

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def _resample(name: str) -> Image.Resampling:
    if name not in _RESAMPLE:
        raise ValueError(f"interpolation={name!r}: use one of {', '.join(_RESAMPLE)}")
    return _RESAMPLE[name]


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Resize the shorter side to ``resize`` (aspect kept), then centre-crop ``crop`` x ``crop``.

    The sizes and rounding follow torchvision's ``Resize(int)`` + ``CenterCrop``
    (OpenOOD's test preprocessing: 32 / 32 for CIFAR, 256 / 224 for ImageNet).
    PIL's resize filters are antialiased when downscaling.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"resize={self.resize}, crop={self.crop}: need resize >= crop >= 1")
        _resample(self.interpolation)

    @property
    def output_size(self) -> int:
        return self.crop

    def __call__(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.resize:
            new_short, new_long = self.resize, int(self.resize * long / short)
            size = (new_short, new_long) if w <= h else (new_long, new_short)
            image = image.resize(size, _resample(self.interpolation))
            w, h = image.size
        top, left = round((h - self.crop) / 2.0), round((w - self.crop) / 2.0)
        return to_tensor(image.crop((left, top, left + self.crop, top + self.crop)))


@dataclass(frozen=True)
class SquareResize:
    """Resize to ``size`` x ``size``, ignoring the aspect ratio (e.g. 32 x 32 for CIFAR-style sets)."""

    size: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size={self.size} must be >= 1")
        _resample(self.interpolation)

    @property
    def output_size(self) -> int:
        return self.size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), _resample(self.interpolation))
        return to_tensor(image)


TRANSFORM_KINDS = ("resize_center_crop", "resize")
StandardTransform = ResizeCenterCrop | SquareResize


def standard_transform(
    kind: str, size: int, *, resize: int | None = None, interpolation: str = "bilinear"
) -> StandardTransform:
    """A preprocessing transform that gives ``size`` x ``size`` images.

    - ``"resize_center_crop"``: shorter side to ``resize`` (default ``size``: a
      square centre crop of the whole short side), then centre crop ``size``.
      ImageNet/OpenOOD style: ``standard_transform("resize_center_crop", 224, resize=256)``.
    - ``"resize"``: straight to ``size`` x ``size`` (``resize`` must be unset).
    """
    if kind == "resize_center_crop":
        return ResizeCenterCrop(size if resize is None else resize, size, interpolation)
    if kind == "resize":
        if resize is not None:
            raise ValueError("standard_transform('resize', ...) takes no resize=; it resizes straight to size")
        return SquareResize(size, interpolation)
    raise ValueError(f"unknown transform kind {kind!r}: use one of {', '.join(TRANSFORM_KINDS)}")


def default_transform(definition: str | Mapping[str, Any], resolution: int) -> StandardTransform:
    """The definition's preprocessing scaled to ``resolution`` (e.g. ImageNet 256/224 at 256: resize 293, crop 256)."""
    _, spec = benchmark_definition(definition)
    pre = spec.get("preprocess", {"kind": "resize", "size": resolution})
    if pre["kind"] == "resize":
        return standard_transform("resize", resolution)
    resize = pre.get("resize", pre["size"])
    return standard_transform(pre["kind"], resolution, resize=round(resolution * resize / pre["size"]))


# --------------------------------------------------------------------------- verification


@dataclass
class VerifyResult:
    """What :func:`verify` kept, what it dropped, and which kept ids are grayscale images converted to RGB."""

    entries: list[ImageEntry]
    problems: list[Problem]
    grayscale: list[str]


def _inspect(entry: ImageEntry, channels: int) -> tuple[str | None, bool]:
    """(reason it cannot be read or None, whether it is grayscale)."""
    try:
        with Image.open(entry.path) as image:
            image.verify()
        with Image.open(entry.path) as image:
            image.load()
            return None, channels == 3 and is_grayscale(image)
    except DECODE_ERRORS as error:
        return f"cannot decode the image ({type(error).__name__}: {error})", False


def verify(
    entries: Sequence[ImageEntry],
    *,
    channels: int = 3,
    convert_grayscale: bool = False,
    on_error: str = "raise",
    workers: int = 1,
) -> VerifyResult:
    """Open and fully decode every image up front (``workers`` threads; order is kept).

    Unreadable images, and grayscale images in an RGB benchmark without
    ``convert_grayscale``, raise :class:`DataError` (``on_error="raise"``) or
    are dropped as problems (``"skip"``). Grayscale images that will be
    converted are listed in ``grayscale``.
    """
    check_on_error(on_error)
    kept: list[ImageEntry] = []
    problems: list[Problem] = []
    grayscale: list[str] = []

    def check(entry: ImageEntry) -> tuple[str | None, bool]:
        return _inspect(entry, channels)

    chunk = 64 * max(1, workers)  # bounded number of pending decodes; a raise stops soon
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            results = list(pool.map(check, part) if workers > 1 else map(check, part))
            for entry, (reason, gray) in zip(part, results):
                if reason is None and gray and not convert_grayscale:
                    reason = f"grayscale image in an RGB benchmark; {GRAYSCALE_FIX}"
                if reason is not None:
                    if on_error == "raise":
                        raise DataError(f"{entry.where}: {reason}")
                    problems.append(problem_for(entry, reason))
                    continue
                kept.append(entry)
                if gray:
                    grayscale.append(entry.id)
    return VerifyResult(kept, problems, grayscale)


__all__ = [
    "DECODE_ERRORS",
    "GRAYSCALE_FIX",
    "TRANSFORM_KINDS",
    "ResizeCenterCrop",
    "SquareResize",
    "StandardTransform",
    "Transform",
    "VerifyResult",
    "decode",
    "default_transform",
    "is_grayscale",
    "standard_transform",
    "to_mode",
    "to_tensor",
    "verify",
]
