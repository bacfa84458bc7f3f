"""Batch transforms from Parquet rows to model tensors: decode, resize-and-pad, profile
normalisation and resampling, and the paired augmentations.

Pure numpy + PIL, vectorised per batch where the arithmetic allows it (per-image work is only
decode/crop/resize, which PIL does in C). These run inside Ray Data ``map_batches`` for training
and directly for validation/embedding, so train and eval see the same preprocessing.

Every transform is defined for every value an instrument can produce: signed Curvature, FWS above
the 7488 mV saturation, all-zero channels, negative baseline samples, profiles of length 1.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from xmodal.data.schema import CHANNELS, LOG_NORM, N_CHANNELS

META_NORM = math.log1p(1024.0)  # original sizes/lengths are fed to the model as log1p(x)/log1p(1024)
CURVATURE = CHANNELS.index("Curvature")
INTENSITY = [i for i in range(N_CHANNELS) if i != CURVATURE]
MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb guard for crops (a real crop is ~1e4-1e5 px)


@dataclass
class Augment:
    """Per-batch augmentation strengths (mirrors ``config.AugmentConfig``; 0 disables each)."""

    flip: float = 0.0
    resized_crop: float = 0.0
    crop_scale_min: float = 0.6
    brightness: float = 0.0
    contrast: float = 0.0
    blur: float = 0.0
    blur_sigma_max: float = 1.0
    noise: float = 0.0
    amplitude: float = 0.0
    band_drop: float = 0.0
    temporal_crop: float = 0.0
    temporal_crop_min: float = 0.8

    @classmethod
    def from_config(cls, cfg: Any) -> Augment:
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_gray8(im: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit luminance ("L"). 16-bit (and 32-bit integer) grayscale is scaled from
    the full 0-65535 range: PIL's own ``convert("L")`` clips it at 255, which turns a 16-bit
    camera image into a white square. Floating-point gray in 0-1 is scaled to 0-255."""
    if im.mode in _WIDE_INT_MODES:
        a = np.asarray(im, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if im.mode == "F":
        # floating-point gray (a 32-bit TIFF): 0-255 as PIL assumes, or 0-1 as scikit-image and most
        # Python image code write it, which PIL would turn into a black square
        a = np.nan_to_num(np.asarray(im, dtype=np.float32))
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return im if im.mode == "L" else im.convert("L")


def decode_gray(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W). Colour images are converted to luminance."""
    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {im.width}x{im.height} px exceeds the {MAX_IMAGE_PIXELS} px limit")
        return np.asarray(to_gray8(im))


def resize_and_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Keep the aspect ratio, fit the long side to ``size``, pad the short side with edge pixels
    (the paper's preprocessing: edge padding continues the background instead of adding a frame)."""
    h, w = img.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    top, left = (size - nh) // 2, (size - nw) // 2
    return np.pad(resized, ((top, size - nh - top), (left, size - nw - left)), mode="edge")


def _random_crop_box(h: int, w: int, scale_min: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    area = rng.uniform(scale_min, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    ch = min(h, max(1, round(h * math.sqrt(area / aspect))))
    cw = min(w, max(1, round(w * math.sqrt(area * aspect))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


IMAGE_NORMS = ("fixed", "background")  # see DataConfig.image_norm


def check_image_norm(image_norm: str) -> None:
    if image_norm not in IMAGE_NORMS:
        raise ValueError(f"data.image_norm must be one of {list(IMAGE_NORMS)}, got {image_norm!r}")


def images_to_array(
    images: list[bytes | None],
    size: int,
    aug: Augment | None = None,
    rng: np.random.Generator | None = None,
    image_norm: str = "fixed",
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch -> (float32 (B, 1, S, S) in [-1, 1], float32 (B, 2) original H, W).

    ``image_norm`` (``DataConfig.image_norm``): "fixed" = pixel / 127.5 - 1, "background" = (pixel -
    median of the resized crop's border) / 255. Rows without an image are zeros with H = W = 0.
    """
    check_image_norm(image_norm)
    out = np.zeros((len(images), 1, size, size), dtype=np.float32)
    hw = np.zeros((len(images), 2), dtype=np.float32)
    for i, data in enumerate(images):
        if data is None:
            continue
        img = decode_gray(data)
        hw[i] = img.shape
        if aug is not None and rng is not None and aug.resized_crop > 0 and rng.random() < aug.resized_crop:
            top, left, ch, cw = _random_crop_box(img.shape[0], img.shape[1], aug.crop_scale_min, rng)
            img = img[top : top + ch, left : left + cw]
        out[i, 0] = resize_and_pad(img, size)
    if image_norm == "background":
        # edge padding repeats the crop's own border, so the border median is its background
        s = out[:, 0]
        border = np.concatenate([s[:, 0, :], s[:, -1, :], s[:, 1:-1, 0], s[:, 1:-1, -1]], axis=1)
        out = (out - np.median(border, axis=1)[:, None, None, None]) * (1.0 / 255.0)
    else:
        out = out * (2.0 / 255.0) - 1.0
    out[hw[:, 0] == 0] = 0.0
    return out, hw


def normalise_profile(values: np.ndarray) -> np.ndarray:
    """mV (..., C, L) -> model range. Intensity channels: signed log1p / log1p(7488) mapped to
    [-1, 1] (0 mV -> -1, saturation -> 1; FWS above saturation and negative baselines stay finite,
    bounded to [-1.5, 1.5]). Curvature is already a signed ratio: clipped to [-1, 1]."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    out = np.empty_like(v)
    x = v[..., INTENSITY, :]
    out[..., INTENSITY, :] = np.clip(2.0 * np.sign(x) * np.log1p(np.abs(x)) / LOG_NORM - 1.0, -1.5, 1.5)
    out[..., CURVATURE, :] = np.clip(v[..., CURVATURE, :], -1.0, 1.0)
    return out


def resample(profile: np.ndarray, length: int) -> np.ndarray:
    """(C, L) -> (C, length). Downsampling averages each output bin (anti-aliased: a narrow peak
    keeps its energy); upsampling interpolates linearly; L = 1 gives a constant profile."""
    c, n = profile.shape
    if n == length:
        return profile.astype(np.float32, copy=False)
    if n == 1:
        return np.repeat(profile, length, axis=1).astype(np.float32)
    if n > length:
        edges = np.linspace(0.0, n, length + 1)
        cum = np.concatenate([np.zeros((c, 1)), np.cumsum(profile, axis=1, dtype=np.float64)], axis=1)

        # integral of the piecewise-constant signal up to fractional position x
        def integral(x: np.ndarray) -> np.ndarray:
            i = np.minimum(np.floor(x).astype(int), n - 1)
            return cum[:, i] + (x - i) * profile[:, i]

        return ((integral(edges[1:]) - integral(edges[:-1])) / np.diff(edges)).astype(np.float32)
    pos = np.linspace(0.0, n - 1, length)
    i0 = np.floor(pos).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    frac = (pos - i0).astype(np.float32)
    return (profile[:, i0] * (1 - frac) + profile[:, i1] * frac).astype(np.float32)


def profiles_to_array(
    profiles: list[Any],
    lengths: np.ndarray,
    length: int,
    aug: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Flat channel-major mV profiles -> float32 (B, C, length) in model range (zeros if absent)."""
    out = np.zeros((len(profiles), N_CHANNELS, length), dtype=np.float32)
    for i, (flat, n) in enumerate(zip(profiles, lengths)):
        n = int(n)
        if flat is None or n == 0:
            continue
        p = np.asarray(flat, dtype=np.float32).reshape(N_CHANNELS, n)
        if (
            aug is not None
            and rng is not None
            and aug.temporal_crop > 0
            and n > 2
            and rng.random() < aug.temporal_crop
        ):
            keep = max(2, round(n * rng.uniform(aug.temporal_crop_min, 1.0)))
            start = int(rng.integers(0, n - keep + 1))
            p = p[:, start : start + keep]
        out[i] = resample(p, length)
    if aug is not None and rng is not None and aug.amplitude > 0:
        # detector gain jitter: a multiplicative factor per particle and intensity channel
        gain = np.exp(rng.normal(0.0, aug.amplitude, size=(len(profiles), len(INTENSITY), 1)))
        out[:, INTENSITY] *= gain.astype(np.float32)
    out = normalise_profile(out)
    if aug is not None and rng is not None and aug.band_drop > 0:
        drop = rng.random(len(profiles)) < aug.band_drop
        ch = rng.integers(0, N_CHANNELS, size=len(profiles))
        rows = np.flatnonzero(drop)
        # a dropped band reads as an empty detector (0 mV), not as a hole
        out[rows, ch[rows]] = np.where(ch[rows, None] == CURVATURE, 0.0, -1.0)
    return out


def to_model_batch(
    batch: dict[str, Any],
    image_size: int,
    profile_length: int,
    aug: Augment | None = None,
    rng: np.random.Generator | None = None,
    image_norm: str = "fixed",
) -> dict[str, np.ndarray]:
    """Parquet columns (numpy batch) -> the model batch of docs/INTERFACES.md."""
    has_image = np.asarray(batch["has_image"], dtype=bool)
    has_profile = np.asarray(batch["has_profile"], dtype=bool)
    images = [b if h else None for b, h in zip(batch["image"], has_image)]
    lengths = np.asarray(batch["profile_length"], dtype=np.int64)
    image, _ = images_to_array(images, image_size, aug, rng, image_norm)
    hw = np.stack([np.asarray(batch["image_height"]), np.asarray(batch["image_width"])], axis=1).astype(
        np.float32
    )
    profile = profiles_to_array(
        list(batch["profile"]), np.where(has_profile, lengths, 0), profile_length, aug, rng
    )
    if aug is not None and rng is not None:
        image, profile = _photometric_and_flip(image, profile, has_image, aug, rng)
    b = len(has_image)
    return {
        "image": image,
        "image_meta": (np.log1p(hw) / META_NORM).astype(np.float32),
        "profile": profile,
        "profile_mask": np.ones((b, profile_length), dtype=bool),
        "profile_meta": (np.log1p(lengths.astype(np.float32)) / META_NORM)[:, None].astype(np.float32),
        "has_image": has_image,
        "has_profile": has_profile,
    }


def _photometric_and_flip(
    image: np.ndarray, profile: np.ndarray, has_image: np.ndarray, aug: Augment, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    b = image.shape[0]
    if aug.contrast > 0 or aug.brightness > 0:
        c = rng.uniform(1 - aug.contrast, 1 + aug.contrast, size=(b, 1, 1, 1)).astype(np.float32)
        off = rng.uniform(-aug.brightness, aug.brightness, size=(b, 1, 1, 1)).astype(np.float32)
        mean = image.mean(axis=(1, 2, 3), keepdims=True)
        jittered = np.clip((image - mean) * c + mean + off, -1.0, 1.0)
        image = np.where(has_image[:, None, None, None], jittered, image)
    if aug.blur > 0:
        rows = np.flatnonzero((rng.random(b) < aug.blur) & has_image)
        if rows.size:
            sigma = rng.uniform(0.3, max(0.3, aug.blur_sigma_max), size=rows.size)
            image[rows] = gaussian_blur(image[rows], sigma)
    if aug.noise > 0:
        std = rng.uniform(0.0, aug.noise, size=(b, 1, 1, 1)) * has_image[:, None, None, None]
        noise = rng.standard_normal(image.shape, dtype=np.float32) * std.astype(np.float32)
        image = np.clip(image + noise, -1.0, 1.0)
    if aug.flip > 0:
        # The paired flip: the particle flipped along the flow axis passes the laser in reverse, so
        # the image flips horizontally and the profile reverses in time together.
        flip = rng.random(b) < aug.flip
        image[flip] = image[flip][..., ::-1]
        profile[flip] = profile[flip][..., ::-1]
    return image, profile


def gaussian_blur(image: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(B, C, H, W) images, each blurred by a Gaussian of its own ``sigma`` (B,) in pixels: two
    separable passes, edges extended (a crop's border is background)."""
    r = max(1, int(np.ceil(3 * float(sigma.max()))))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x[None, :] / sigma[:, None]) ** 2)
    k = (k / k.sum(axis=1, keepdims=True)).astype(np.float32)[:, :, None, None, None]  # (B, K, 1, 1, 1)
    h, w = image.shape[-2:]
    pad = np.pad(image, ((0, 0), (0, 0), (r, r), (r, r)), mode="edge")
    rows = sum(k[:, i] * pad[..., i : i + w] for i in range(2 * r + 1))  # (B, C, H + 2r, W)
    return sum(k[:, i] * rows[..., i : i + h, :] for i in range(2 * r + 1)).astype(image.dtype)
