"""Synthetic pulses against the real Cefas CytoSense export (817 particles of a pond sample).

The synthetic field domain (UTO) is compared with the real field sample by per-particle statistics.
Bands are deliberately loose where the species mix, not the instrument, sets the number (the Cefas
pond is not our catalogue), and tight where the instrument does (saturation levels, Curvature
centring, trigger tails). Measured at the time of writing (real / synthetic UTO, seed 0, 1500 drawn,
~1160 pass the smart trigger):

    pulse length L (samples)   median 67 / 52,  5-95 % 19-141 / 23-118,  range 12-516 / 19-259
    per-particle max, median   FWS 2664 / 2053   SWS 3328 / 2103   FL Red 316 / 315
                               FL Yellow 4.3 / 4.0   FL Orange 8.5 / 30
    particles saturated        FWS at 14720: 1.8 % / 0.8 %;  SWS at 7488: 0.1 % / 0 %
    Curvature                  range per particle, median 0.66 / 0.84; per-particle mean 0 / ~0
    first FWS sample / max     median 0.0037 / 0.0035
"""

from __future__ import annotations

import numpy as np
import pytest

from xmodal.data.schema import SATURATION_MV
from xmodal.data.synth import generate_chunks
from xmodal.data.synth_profile import FWS_HALF_SATURATION_MV
from xmodal.data.synth_species import catalogue

CEFAS_PULSES = (
    "cytosense_cefas_pond_ecotaxa_pipeline/original/Pond_NA 2023-05-24 09h23_All Imaged Particles_Pulses.csv"
)
FWS_CAP = 2 * FWS_HALF_SATURATION_MV  # FWS = left + right detector halves
# The Cefas set was recorded with the smart trigger "Fl Red Maximum > 10" (its _Info.txt): the same
# selection is applied to the synthetic particles, which drops the non-fluorescent detritus.
SMART_TRIGGER_FL_RED_MV = 10.0


def _real_pulses(realdata) -> list[np.ndarray]:
    """Independent parse of the Pulses.csv: particles separated by two all-zero rows -> (6, L) arrays."""
    path = realdata / CEFAS_PULSES
    if not path.is_file():
        pytest.skip(f"Cefas pulses not found at {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()[1:]
    rows = np.array([line.split(",") for line in lines], dtype=np.float64)
    zero = np.all(rows == 0, axis=1)
    particles, current, i = [], [], 0
    while i < len(rows):
        if zero[i] and i + 1 < len(rows) and zero[i + 1]:
            particles.append(np.array(current)[:, 1:].T)
            current, i = [], i + 2
            continue
        current.append(rows[i])
        i += 1
    if current:
        particles.append(np.array(current)[:, 1:].T)
    return particles


def _stats(pulses: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "L": np.array([p.shape[1] for p in pulses]),
        "max": np.array([p.max(axis=1) for p in pulses]),
        "min": np.array([p.min(axis=1) for p in pulses]),
        "curv_mean": np.array([p[5].mean() for p in pulses]),
        "first": np.array([p[0, 0] / max(p[0].max(), 1e-9) for p in pulses]),
    }


@pytest.fixture(scope="module")
def both(realdata) -> tuple[dict, dict]:
    real = _real_pulses(realdata)
    assert len(real) == 817
    synth = []
    # tiny 16-px crops: only the pulses are compared here
    for _, _, profiles in generate_chunks("UTO", 1500, 0, 16, catalogue(12)):
        synth += [p for p in profiles if p[4].max() > SMART_TRIGGER_FL_RED_MV]
    return _stats(real), _stats(synth)


def _within(value: float, ref: float, factor: float) -> bool:
    return ref / factor <= value <= ref * factor


def test_length_distribution(both):
    real, syn = both
    assert syn["L"].min() >= real["L"].min() == 12
    assert syn["L"].max() <= real["L"].max()
    for q, factor in [(5, 1.6), (50, 1.5), (95, 1.6)]:
        r, s = np.percentile(real["L"], q), np.percentile(syn["L"], q)
        assert _within(s, r, factor), f"L {q}th percentile: synthetic {s} vs real {r}"


@pytest.mark.parametrize(
    "channel,factor",
    [(0, 2.0), (1, 2.5), (2, 2.0), (3, 4.0), (4, 2.0)],
    ids=["FWS", "SWS", "FL Yellow", "FL Orange", "FL Red"],
)
def test_channel_maxima_ranges(both, channel, factor):
    real, syn = both
    for q in (25, 50, 75):
        r, s = np.percentile(real["max"][:, channel], q), np.percentile(syn["max"][:, channel], q)
        assert _within(s, r, factor), f"channel {channel} {q}th pct of maxima: synthetic {s} vs real {r}"
    assert syn["min"][:, channel].min() >= 0.0  # detectors read >= 0 mV


def test_saturation_behaviour(both):
    real, syn = both
    for stats in (real, syn):
        fws, rest = stats["max"][:, 0], stats["max"][:, 1:5]
        assert fws.max() <= FWS_CAP and rest.max() <= SATURATION_MV
        assert np.mean(fws > SATURATION_MV) > 0.02  # FWS (left + right) exceeds one detector's ceiling
        assert np.mean(fws >= FWS_CAP) < 0.08  # ...but few particles hit the cap
        assert np.mean(stats["max"][:, 1] >= SATURATION_MV) < 0.01  # SWS almost never clips
    assert np.mean(syn["max"][:, 0] >= FWS_CAP) > 0.0  # the brightest synthetic particles do clip


def test_curvature_is_signed_and_centred(both):
    real, syn = both
    for stats in (real, syn):
        assert stats["min"][:, 5].min() < -0.5 and stats["max"][:, 5].max() > 0.5
        assert np.percentile(np.abs(stats["curv_mean"]), 95) < 0.02
        assert stats["min"][:, 5].min() >= -1.0
    r = np.median(real["max"][:, 5] - real["min"][:, 5])
    s = np.median(syn["max"][:, 5] - syn["min"][:, 5])
    assert _within(s, r, 1.6), f"median Curvature range: synthetic {s} vs real {r}"


def test_trigger_tails(both):
    """The window opens where FWS crosses the trigger level: first sample a few per mille of the peak."""
    real, syn = both
    r, s = np.median(real["first"]), np.median(syn["first"])
    assert _within(s, r, 2.0), f"median first/peak FWS: synthetic {s} vs real {r}"
    assert _within(np.median(syn["min"][:, 0]), np.median(real["min"][:, 0]), 2.0)
