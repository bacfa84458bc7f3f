import io
import math

import numpy as np
import pytest
from PIL import Image

from xmodal.data.readers.validate import ReaderOptions, check_image
from xmodal.data.schema import LOG_NORM, N_CHANNELS, SATURATION_MV
from xmodal.data.transforms import (
    CURVATURE,
    Augment,
    decode_gray,
    gaussian_blur,
    images_to_array,
    normalise_profile,
    resample,
    resize_and_pad,
    to_model_batch,
)


def png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def test_resize_and_pad_keeps_aspect_and_pads_with_edges():
    img = np.zeros((20, 40), np.uint8)
    img[:, :] = np.arange(40, dtype=np.uint8)[None, :] * 5
    img[0, :] = 200  # top edge row
    img[-1, :] = 100  # bottom edge row
    out = resize_and_pad(img, 32)
    assert out.shape == (32, 32)
    # 40 -> 32 wide, 20 -> 16 high, padded 8 rows above and below with the edge rows
    assert (out[:8] == out[8]).all() and (out[-8:] == out[-9]).all()
    assert abs(int(out[8, 16]) - 200) < 40 and abs(int(out[-9, 16]) - 100) < 40


def test_16_bit_images_are_scaled_not_clipped_and_ingest_agrees():
    # a dim background with a bright object, stored as a 16-bit PNG (PIL's convert("L") would clip
    # every value above 255 to white: the whole image)
    rng = np.random.default_rng(0)
    a8 = rng.integers(20, 40, (48, 64)).astype(np.uint8)
    a8[16:32, 20:44] = 220
    a16 = a8.astype(np.uint16) * 257  # the same picture on the 16-bit scale
    b16 = io.BytesIO()
    Image.fromarray(a16).save(b16, format="PNG")
    assert Image.open(io.BytesIO(b16.getvalue())).mode.startswith("I")
    np.testing.assert_array_equal(decode_gray(b16.getvalue()), a8)
    np.testing.assert_array_equal(decode_gray(png(a8)), a8)
    # the ingest check sees the same object as in the 8-bit file (not an empty or saturated crop)
    assert check_image(b16.getvalue(), ReaderOptions())[1] == (48, 64)
    flat16 = io.BytesIO()
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(flat16, format="PNG")
    with pytest.raises(Exception, match="no object"):
        check_image(flat16.getvalue(), ReaderOptions())


@pytest.mark.parametrize("scale", [1.0, 1.0 / 255.0])
def test_float_tiffs_in_0_255_or_0_1_decode_to_the_same_gray_levels(scale: float):
    # 32-bit float gray: PIL reads 0-255; scikit-image and most Python code write 0-1, which PIL
    # would convert to black (and ingest would quarantine as an empty crop)
    a8 = np.full((48, 64), 220, np.uint8)
    a8[16:32, 20:44] = 60
    b = io.BytesIO()
    Image.fromarray(a8.astype(np.float32) * np.float32(scale)).save(b, format="TIFF")
    assert Image.open(io.BytesIO(b.getvalue())).mode == "F"
    np.testing.assert_array_equal(decode_gray(b.getvalue()), a8)
    assert check_image(b.getvalue(), ReaderOptions())[1] == (48, 64)


def test_images_to_array_range_and_missing_rows():
    rng = np.random.default_rng(0)
    imgs = [png(rng.integers(0, 256, (30, 10), dtype=np.uint8)), None, png(np.full((5, 5), 255, np.uint8))]
    x, hw = images_to_array(imgs, 16, image_norm="fixed")
    assert x.shape == (3, 1, 16, 16) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
    assert (x[1] == 0).all() and (hw[1] == 0).all()
    assert np.allclose(x[2], 1.0)
    assert hw[0].tolist() == [30, 10]


def test_background_norm_maps_the_crop_background_to_zero_whatever_its_level():
    """(pixel - border median) / 255 against the formula, and the same particle on a background
    40 gray levels brighter gives the same input."""
    a = np.full((20, 30), 150, np.uint8)
    a[6:14, 10:20] = 60  # a dark particle
    x, _ = images_to_array([png(a), png(a + 40)], 30, image_norm="background")
    fixed, _ = images_to_array([png(a)], 30, image_norm="fixed")
    np.testing.assert_allclose(x[0], x[1], atol=1e-6)
    resized = (fixed[0] + 1.0) * 127.5  # back to gray levels
    np.testing.assert_allclose(x[0], (resized - 150) / 255, atol=1e-5)
    assert x[0].min() == pytest.approx(-90 / 255, abs=1e-5) and np.median(x[0]) == pytest.approx(0, abs=1e-6)
    extreme, _ = images_to_array(
        [png(np.array([[0, 255], [255, 255]], np.uint8))], 8, image_norm="background"
    )
    assert extreme.min() >= -1 and extreme.max() <= 1
    with pytest.raises(ValueError, match="image_norm"):
        images_to_array([png(a)], 30, image_norm="per-image")


def test_normalise_profile_formula_and_extremes():
    v = np.zeros((N_CHANNELS, 5), np.float32)
    v[0] = [
        0,
        1,
        SATURATION_MV,
        20000,
        -5,
    ]  # FWS: zero, small, saturated, above saturation, negative baseline
    v[CURVATURE] = [-0.98, 0, 0.5, -3, np.nan]
    out = normalise_profile(v)
    assert np.isfinite(out).all()
    assert out[0, 0] == pytest.approx(-1.0)
    assert out[0, 1] == pytest.approx(2 * math.log1p(1) / LOG_NORM - 1, rel=1e-6)
    assert out[0, 2] == pytest.approx(1.0, rel=1e-6)
    assert 1.0 < out[0, 3] <= 1.5
    assert -1.5 <= out[0, 4] < -1.0
    assert out[CURVATURE].tolist() == pytest.approx([-0.98, 0, 0.5, -1.0, 0.0])


@pytest.mark.parametrize("n, length", [(516, 64), (64, 64), (12, 64), (1, 64), (2, 7), (100, 33)])
def test_resample_shapes_and_mean(n, length):
    rng = np.random.default_rng(n)
    p = rng.uniform(0, 100, (N_CHANNELS, n)).astype(np.float32)
    r = resample(p, length)
    assert r.shape == (N_CHANNELS, length) and np.isfinite(r).all()
    if n >= length:  # bin averaging preserves the mean exactly (energy of every peak is kept)
        np.testing.assert_allclose(r.mean(1), p.mean(1), rtol=1e-4)
    if n == 1:
        assert (r == p[:, :1]).all()


def test_resample_bins_against_brute_force():
    p = np.arange(12, dtype=np.float32)[None].repeat(N_CHANNELS, 0)
    r = resample(p, 4)  # bins of exactly 3 samples
    np.testing.assert_allclose(r[0], [1, 4, 7, 10])


def batch_of(n=8, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, n)
    return {
        "particle_id": np.array([f"p{i}" for i in range(n)], dtype=object),
        "has_image": np.ones(n, bool),
        "has_profile": np.ones(n, bool),
        "image": np.array(
            [
                png(rng.integers(0, 256, (rng.integers(8, 90), rng.integers(8, 90)), dtype=np.uint8))
                for _ in range(n)
            ],
            dtype=object,
        ),
        "image_height": np.zeros(n, np.int32) + 50,
        "image_width": np.zeros(n, np.int32) + 40,
        "profile": [rng.uniform(-10, 9000, N_CHANNELS * L).astype(np.float32) for L in lengths],
        "profile_length": lengths.astype(np.int32),
    }


def test_model_batch_contract_with_all_augmentations():
    aug = Augment(
        flip=0.5,
        resized_crop=1.0,
        brightness=0.3,
        contrast=0.3,
        amplitude=0.2,
        band_drop=0.5,
        temporal_crop=0.5,
        blur=0.5,
        noise=0.1,
    )
    out = to_model_batch(batch_of(), 32, 64, aug, np.random.default_rng(1))
    assert out["image"].shape == (8, 1, 32, 32) and out["profile"].shape == (8, N_CHANNELS, 64)
    assert out["image_meta"].shape == (8, 2) and out["profile_meta"].shape == (8, 1)
    assert out["profile_mask"].all()
    for k in ("image", "profile", "image_meta", "profile_meta"):
        assert np.isfinite(out[k]).all(), k
    assert out["image"].min() >= -1 and out["image"].max() <= 1


def test_paired_flip_flips_image_and_reverses_profile_together():
    b = batch_of(4)
    plain = to_model_batch(b, 32, 64)
    flipped = to_model_batch(b, 32, 64, Augment(flip=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(flipped["image"], plain["image"][..., ::-1])
    np.testing.assert_array_equal(flipped["profile"], plain["profile"][..., ::-1])


def test_gaussian_blur_matches_scipy_per_image():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 1, 20, 24)).astype(np.float32)
    sigma = np.array([0.3, 0.55, 0.8, 1.0])
    got = gaussian_blur(images, sigma)
    r = 3  # the radius of the largest sigma; scipy's radius is int(truncate * sigma + 0.5)
    for i, s in enumerate(sigma):
        want = gaussian_filter(images[i, 0].astype(np.float64), s, mode="nearest", truncate=r / s)
        np.testing.assert_allclose(got[i, 0], want, atol=2e-6)


def test_blur_and_noise_touch_only_particles_with_images():
    b = batch_of(6)
    b["has_image"][[1, 4]] = False
    plain = to_model_batch(b, 32, 64)
    aug = to_model_batch(b, 32, 64, Augment(blur=1.0, noise=0.2), np.random.default_rng(3))
    changed = np.abs(aug["image"] - plain["image"]).reshape(6, -1).max(axis=1) > 0
    assert changed.tolist() == [True, False, True, True, False, True]
    np.testing.assert_array_equal(aug["profile"], plain["profile"])
    assert aug["image"].min() >= -1 and aug["image"].max() <= 1
    # blur alone is a low-pass filter: inside the crop the mean stays and the spread shrinks
    blurred = to_model_batch(b, 32, 64, Augment(blur=1.0), np.random.default_rng(3))
    inner = (slice(None), 0, slice(8, 24), slice(8, 24))
    assert (
        np.abs(blurred["image"][inner].mean(axis=(1, 2)) - plain["image"][inner].mean(axis=(1, 2))).max()
        < 0.05
    )
    assert (blurred["image"][inner].std(axis=(1, 2)) <= plain["image"][inner].std(axis=(1, 2)) + 1e-6).all()


def test_no_augmentation_is_deterministic():
    b = batch_of(4)
    a1, a2 = to_model_batch(b, 16, 32), to_model_batch(b, 16, 32)
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
