"""The progress line (xmodal/train/metrics.py): only the fields the run's loss has."""

from __future__ import annotations

from xmodal.train.metrics import progress_line

COMMON = {"train_loss": 2.5, "samples_per_s": 100.0, "data_wait_frac": 0.05}


def test_a_contrastive_run_shows_its_logit_scale():
    line = progress_line(0, 4, {**COMMON, "logit_scale": 14.3}, 10.0, 1)
    assert line.startswith("epoch 1/4 | loss 2.5000 | scale 14.30 | 100 samples/s | data-wait 5% |")


def test_dino_has_no_logit_scale_and_shows_none():
    line = progress_line(0, 4, {**COMMON, "train_teacher_temp": 0.04}, 10.0, 1)
    assert "scale" not in line and "nan" not in line
