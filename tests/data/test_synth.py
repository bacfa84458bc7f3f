"""The synthetic CytoSense generator: layouts, determinism, encoders, and the latent world's structure."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmodal.config import ConfigError
from xmodal.data.readers.header import MAX_ROWS
from xmodal.data.readers.validate import ReaderOptions, check_image, check_profile
from xmodal.data.schema import CHANNELS, SCHEMA, make_record, records_to_table
from xmodal.data.synth import encode_png, generate_chunks, particle_table, synthesize
from xmodal.data.synth_image import HEADER_PX, MIN_IMAGE_SIZE, scale_bar_header, um_per_px
from xmodal.data.synth_latents import DETRITUS_MIN_UM, sample_latents
from xmodal.data.synth_profile import round_sig
from xmodal.data.synth_species import DETRITUS, DOMAINS, catalogue, class_weights

SIZES = {"LAB": 60, "SEA": 40, "UTO": 80}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def syke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syke")
    return out, synthesize(out, SIZES["LAB"], SIZES["SEA"], SIZES["UTO"], seed=3, fmt="syke", image_size=64)


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pq")
    return out, synthesize(
        out, SIZES["LAB"], SIZES["SEA"], SIZES["UTO"], seed=3, fmt="parquet", image_size=64
    )


def _annotations(root: Path) -> list[dict[str, str]]:
    with open(root / "annotations.csv", newline="") as f:
        return list(csv.DictReader(f))


def _profile_file(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(CHANNELS)
    return np.array([[float(v) for v in line.split(",")] for line in lines[1:]]).T.astype(np.float32)


def test_syke_layout(syke):
    out, summary = syke
    names = set(catalogue(12)[i].name for i in range(13))
    for domain, n in SIZES.items():
        root = out / domain
        with open(root / "annotations.csv", newline="") as f:
            assert f.readline().strip() == "image,profile,class,particle_id"
        rows = _annotations(root)
        assert len(rows) == n == summary["domains"][domain]["particles"]
        assert len({r["particle_id"] for r in rows}) == n
        for r in rows:
            if domain == "UTO":
                assert r["class"] == ""
            else:
                assert r["class"] in names
            im = Image.open(root / r["image"])
            assert im.format == "PNG" and im.mode == "L" and im.size[1] == im.size[0] + HEADER_PX
            prof = _profile_file(root / r["profile"])
            assert prof.shape[0] == 6 and prof.shape[1] >= 12
            assert np.isfinite(prof).all()
        assert len(list((root / "images").iterdir())) == n
        assert len(list((root / "profiles").iterdir())) == n
    assert json.loads((out / "synth.json").read_text()) == summary


def test_parquet_layout(parquet):
    out, summary = parquet
    for domain, n in SIZES.items():
        files = sorted((out / domain).glob("part-*.parquet"))
        assert files, f"no shards in {out / domain}"
        table = pq.read_table(files)
        assert table.schema.equals(SCHEMA, check_metadata=False)
        assert table.num_rows == n
        rows = table.to_pylist()
        assert len({r["particle_id"] for r in rows}) == n
        for r in rows:
            assert (r["label"] is None) == (domain == "UTO")
            assert r["domain"] == domain and r["has_image"] and r["has_profile"]
            im = Image.open(io.BytesIO(r["image"]))
            assert im.mode == "L" and im.size == (r["image_width"], r["image_height"])
            assert len(r["profile"]) == 6 * r["profile_length"]
            assert r["channel_mask"] == [True] * 6
        counts = summary["domains"][domain]["classes"]
        assert sum(counts.values()) == n
        if domain != "UTO":
            labels = [r["label"] for r in rows]
            assert {k: labels.count(k) for k in set(labels)} == counts


def _split_header(path: Path) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(Image.open(path))
    return a[:HEADER_PX], a[HEADER_PX:]


def test_both_formats_hold_the_same_particles(syke, parquet):
    """Same arguments -> the SYKE files and the Parquet rows carry identical images and pulses; the
    SYKE crops have the scale-bar band on top, the Parquet rows do not."""
    (s_out, s_sum), (p_out, p_sum) = syke, parquet
    assert s_sum["domains"] == p_sum["domains"]
    assert (s_sum["header_px"], p_sum["header_px"]) == (HEADER_PX, 0)
    for domain in SIZES:
        rows = pq.read_table(sorted((p_out / domain).glob("*.parquet"))).to_pylist()
        ann = _annotations(s_out / domain)
        for r, a in zip(rows, ann):
            assert r["particle_id"] == f"{domain}:{a['particle_id']}" and r["source"] == domain
            band, crop = _split_header(s_out / domain / a["image"])
            assert r["image"] == encode_png(crop)
            np.testing.assert_array_equal(band, scale_bar_header(crop.shape[1], HEADER_PX, um_per_px(64)))
            prof = np.asarray(r["profile"], dtype=np.float32).reshape(6, r["profile_length"])
            np.testing.assert_array_equal(prof, _profile_file(s_out / domain / a["profile"]))


def test_syke_layout_through_the_real_reader_equals_direct_parquet(tmp_path, syke, parquet):
    """`xmodal ingest` of the SYKE files finds the scale-bar band on its own, cuts it, and gives the
    rows written straight to Parquet: every column equal, the images pixel for pixel (ingest encodes
    the cut crops again, with its own PNG encoder)."""
    ingest = pytest.importorskip("xmodal.data.ingest").ingest
    (s_out, _), (p_out, _) = syke, parquet
    report = ingest(s_out, tmp_path, fmt="syke", quiet=True)
    for domain, n in SIZES.items():
        assert (report.domains[domain].seen, report.domains[domain].ingested) == (n, n)
        assert report.domains[domain].crop_header_px == {domain: HEADER_PX}
        ingested = pq.read_table(sorted((tmp_path / domain).glob("*.parquet"))).sort_by("particle_id")
        direct = pq.read_table(sorted((p_out / domain).glob("*.parquet"))).sort_by("particle_id")
        assert ingested.drop_columns(["image"]).equals(direct.drop_columns(["image"]))
        for a, b in zip(ingested["image"].to_pylist(), direct["image"].to_pylist()):
            np.testing.assert_array_equal(
                np.asarray(Image.open(io.BytesIO(a))), np.asarray(Image.open(io.BytesIO(b)))
            )


def test_without_a_header_the_syke_images_are_the_parquet_bytes(tmp_path):
    synthesize(tmp_path / "s", 12, 0, 0, seed=5, fmt="syke", image_size=32, header_px=0)
    synthesize(tmp_path / "p", 12, 0, 0, seed=5, fmt="parquet", image_size=32)
    rows = pq.read_table(sorted((tmp_path / "p" / "LAB").glob("*.parquet"))).to_pylist()
    for r, a in zip(rows, _annotations(tmp_path / "s" / "LAB")):
        assert r["image"] == (tmp_path / "s" / "LAB" / a["image"]).read_bytes()


def test_the_scale_bar_is_drawn_to_scale_and_cut_at_narrow_crops():
    band = scale_bar_header(60, HEADER_PX, 0.5)
    assert band.shape == (HEADER_PX, 60) and not band.flags.writeable
    bar_rows = np.flatnonzero((band == 0).sum(axis=1) >= 15)  # longer than the label's rows
    assert len(bar_rows) == 3  # a 3-px bar ...
    assert (band[bar_rows[0]] == 0).sum() == 10.0 / 0.5  # ... 10 um long at 0.5 um per px
    np.testing.assert_array_equal(scale_bar_header(12, HEADER_PX, 0.5), band[:, :12])


def test_deterministic_bytes(tmp_path, syke):
    out, _ = syke
    again = tmp_path / "again"
    synthesize(again, SIZES["LAB"], SIZES["SEA"], SIZES["UTO"], seed=3, fmt="syke", image_size=64)
    assert _tree_digest(again) == _tree_digest(out)
    other = tmp_path / "other"
    synthesize(other, SIZES["LAB"], 0, 0, seed=4, fmt="syke", image_size=64)
    a, b = _tree_digest(other / "LAB"), _tree_digest(out / "LAB")
    assert sum(a[k] != b[k] for k in a) > 0.9 * len(a)


def test_parquet_deterministic(tmp_path, parquet):
    out, _ = parquet
    synthesize(tmp_path, SIZES["LAB"], SIZES["SEA"], SIZES["UTO"], seed=3, fmt="parquet", image_size=64)
    for domain in SIZES:
        a = pq.read_table(sorted((tmp_path / domain).glob("*.parquet")))
        b = pq.read_table(sorted((out / domain).glob("*.parquet")))
        assert a.equals(b)


def test_png_encoder_round_trips_through_pillow():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (16, 16), (64, 64), (17, 40)]:
        img = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        decoded = Image.open(io.BytesIO(encode_png(img)))
        assert decoded.mode == "L"
        np.testing.assert_array_equal(np.asarray(decoded), img)


def test_particle_table_equals_make_record_rows():
    species = catalogue(12)
    for domain in ("LAB", "UTO"):
        ((lat, images, profiles),) = generate_chunks(domain, 40, 1, 32, species)
        table = particle_table(domain, 7, lat, images, profiles, species)
        labelled = DOMAINS[domain].labelled
        records = [
            make_record(f"{domain}:{domain}_{7 + i:07d}", domain, domain,
                        species[s].name if labelled else None, encode_png(im), im.shape, p)
            for i, (s, im, p) in enumerate(zip(lat.species.tolist(), images, profiles))
        ]  # fmt: skip
        assert table.equals(records_to_table(records))


def test_round_sig_matches_python_formatting():
    rng = np.random.default_rng(1)
    v = rng.lognormal(0.0, 4.0, 20000) * rng.choice([-1.0, 1.0], 20000)
    v[:3] = [0.0, 14720.0, 0.03125]
    expected = np.array([float(f"{x:.4g}") for x in v])
    np.testing.assert_array_equal(round_sig(v), expected)


def test_catalogue_twins_and_seed_independence():
    """Image twins share every image latent but not pigments; profile twins the reverse."""
    sp = {s.name: s for s in catalogue(12)}
    image_fields = ("morph", "aspect", "cells", "spines", "texture", "hollow", "opacity")
    for a, b in [
        ("chlorella", "cryptomonas"),
        ("skeletonema", "pseudanabaena"),
        ("dolichospermum", "ulothrix"),
    ]:
        assert all(getattr(sp[a], f) == getattr(sp[b], f) for f in image_fields)
        assert abs(sp[a].size - sp[b].size) / sp[a].size < 0.1
        pe_share = [sp[x].pe / (sp[x].chl + sp[x].pe) for x in (a, b)]
        assert abs(pe_share[0] - pe_share[1]) > 0.3
    profile_fields = ("size", "aspect", "cells", "texture", "refr", "chl", "pe", "yel")
    for a, b in [("navicula", "chaetoceros"), ("microcystis", "pediastrum")]:
        assert all(getattr(sp[a], f) == getattr(sp[b], f) for f in profile_fields)
        assert (sp[a].spines, sp[a].morph) != (sp[b].spines, sp[b].morph)
    assert catalogue(20)[:12] == catalogue(12)[:12]
    assert len(catalogue(20)) == 21 and catalogue(20)[-1].name == DETRITUS
    assert len({s.name for s in catalogue(30)}) == 31


def test_class_frequencies_long_tail_and_field_only_species():
    species = catalogue(12)
    field_only = [i for i, s in enumerate(species) if not s.in_lab]
    assert field_only, "the catalogue must hold species absent from LAB"
    counts = {}
    for domain in ("LAB", "SEA", "UTO"):
        style = DOMAINS[domain]
        lat = sample_latents(species, class_weights(species, style), 6000, style, np.random.default_rng(0))
        counts[domain] = np.bincount(lat.species, minlength=len(species))
    assert counts["LAB"][field_only].sum() == 0
    assert all(counts[d][field_only].min() > 0 for d in ("SEA", "UTO"))
    for domain, c in counts.items():
        present = c[c > 0]
        assert present.max() / present.min() > 4, f"{domain} class counts are not long-tailed: {c}"
        assert c[-1] > 0  # detritus
    assert not np.array_equal(np.argsort(counts["LAB"]), np.argsort(counts["SEA"]))


def test_detritus_has_no_fluorescence():
    species = catalogue(12)
    ((lat, _, profiles),) = generate_chunks("UTO", 400, 5, 32, species)
    fl_max = np.array([p[2:5].max() for p in profiles])
    det = lat.species == len(species) - 1
    assert det.sum() > 20
    assert fl_max[det].max() < 10.0  # baseline and detector noise only
    assert np.mean(fl_max[~det] > 10.0) > 0.95  # living cells pass a CytoSense "FL Red > 10" smart trigger


def test_images_dark_particles_on_light_background_and_crop_follows_size():
    """As in the real Cefas crops: light-gray background, darker particle; bigger particle, bigger crop."""
    species = catalogue(12)
    ((lat, images, profiles),) = generate_chunks("LAB", 300, 2, 64, species)
    border = np.array([np.median(np.r_[im[0], im[-1], im[:, 0], im[:, -1]]) for im in images])
    assert np.all((border > 160) & (border < 210))
    darkest = np.array([np.percentile(im, 2) for im in images])
    assert np.all(darkest < border - 25)
    side = np.array([im.shape[0] for im in images])
    length = np.array([p.shape[1] for p in profiles])
    assert set(side) <= set(range(16, 65, 8))
    small, large = length < np.percentile(length, 25), length > np.percentile(length, 75)
    assert side[small].mean() < side[large].mean() - 8


def test_sea_is_shifted_against_lab():
    species = catalogue(12)
    stats = {}
    for domain in ("LAB", "SEA"):
        ((lat, images, _),) = generate_chunks(domain, 300, 0, 64, species)
        noise = [np.std(np.diff(im[0].astype(float))) for im in images]  # row-to-row jitter on the border
        size = np.median(lat.ca[lat.species == 0]) if (lat.species == 0).any() else np.nan
        stats[domain] = (np.median(noise), np.std([np.median(im[0]) for im in images]), size)
    assert stats["SEA"][0] > 1.5 * stats["LAB"][0]  # noisier
    assert stats["SEA"][1] > 2.0 * stats["LAB"][1]  # background varies more
    assert stats["SEA"][2] < stats["LAB"][2]  # smaller cells of the same species


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"fmt": "tiff"}, "unknown format 'tiff'"),
        ({"n_sea": -1}, "SEA must be >= 0"),
        ({"n_species": 1}, "n_species must be >= 2"),
        ({"image_size": 8}, "image_size must be >= 16"),
        ({"header_px": 5}, "header_px must be 0"),
        ({"header_px": MAX_ROWS}, f"header_px must be 0 .*got {MAX_ROWS}"),  # ingest would never find it
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_bad_arguments_are_config_errors_and_write_nothing(tmp_path, kwargs, message):
    args = {"n_lab": 1, "n_sea": 1, "n_uto": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        synthesize(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", [["--image-size", "8"], ["--lab", "-1"], ["--header-px", "5"],
                                    ["--species", "1"], ["--seed", "-1"], ["--header-px", "64"]])  # fmt: skip
def test_cli_prints_one_line_for_bad_arguments(tmp_path, capsys, option):
    from xmodal.cli import main

    assert main(["synth", str(tmp_path / "x"), "--lab", "1", "--sea", "0", "--uto", "0", *option]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "synth:" in err


def test_empty_domains_are_skipped(tmp_path):
    summary = synthesize(tmp_path, 5, 0, 0, fmt="parquet")
    assert list(summary["domains"]) == ["LAB"]
    assert not (tmp_path / "SEA").exists()


def test_rerun_replaces_earlier_output_and_refuses_foreign_folders(tmp_path, capsys):
    synthesize(tmp_path, 30, 20, 0, fmt="parquet", progress=True)
    assert "synth LAB: 30/30 (100%)" in capsys.readouterr().err
    synthesize(tmp_path, 10, 0, 0, fmt="parquet")  # a smaller rerun must not keep old rows or domains
    assert pq.read_table(sorted((tmp_path / "LAB").glob("*.parquet"))).num_rows == 10
    assert not (tmp_path / "SEA").exists()
    foreign = tmp_path / "other"
    (foreign / "LAB").mkdir(parents=True)
    (foreign / "LAB" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by xmodal synth"):
        synthesize(foreign, 5, 0, 0)
    assert (foreign / "LAB" / "notes.txt").read_text() == "mine"


def test_an_interrupted_run_leaves_a_folder_the_next_run_replaces(tmp_path, monkeypatch):
    import xmodal.data.synth as synth

    def fail_in_sea(out, domain, *args):
        if domain == "SEA":
            raise KeyboardInterrupt  # Ctrl-C (or a full disk) after LAB was written
        return write(out, domain, *args)

    write = synth._write_parquet
    monkeypatch.setattr(synth, "_write_parquet", fail_in_sea)
    with pytest.raises(KeyboardInterrupt):
        synthesize(tmp_path, 5, 5, 0, fmt="parquet")
    assert any((tmp_path / "LAB").iterdir())
    assert json.loads((tmp_path / "synth.json").read_text())["complete"] is False
    monkeypatch.undo()
    summary = synthesize(tmp_path, 4, 0, 0, fmt="parquet")
    assert summary["complete"] is True and json.loads((tmp_path / "synth.json").read_text()) == summary
    assert pq.read_table(sorted((tmp_path / "LAB").glob("*.parquet"))).num_rows == 4
    assert not (tmp_path / "SEA").exists()


@pytest.mark.parametrize(
    "image_size,seed,domain",  # each gave one tiny detritus particle that ingest quarantined as empty_image
    [(16, 7, "SEA"), (16, 14, "UTO"), (24, 10, "UTO"), (32, 11, "UTO")],
)
def test_every_synthetic_particle_passes_the_ingest_checks(image_size, seed, domain):
    species = catalogue(12)
    opts = ReaderOptions()
    for lat, images, profiles in generate_chunks(domain, 512, seed, image_size, species):
        detritus = lat.species == len(species) - 1
        assert (lat.ca[detritus, 0] >= DETRITUS_MIN_UM / 2).all()
        for img, prof in zip(images, profiles):
            check_image(encode_png(img), opts)  # raises Rejected("empty_image") for an invisible particle
            check_profile(prof, CHANNELS)


def test_the_detritus_floor_spans_two_pixels_at_the_coarsest_pitch():
    assert DETRITUS_MIN_UM >= 2 * um_per_px(MIN_IMAGE_SIZE)


@pytest.mark.parametrize("image_size,n_species", [(32, 12), (128, 20), (64, 3)])
def test_other_sizes_and_catalogues(tmp_path, image_size, n_species):
    summary = synthesize(tmp_path, 40, 20, 40, fmt="parquet", image_size=image_size, n_species=n_species)
    assert len(summary["species"]) == n_species + 1
    for domain in ("LAB", "SEA", "UTO"):
        table = pq.read_table(
            sorted((tmp_path / domain).glob("*.parquet")), columns=["image_height", "label"]
        )
        sides = set(table.column("image_height").to_pylist())
        assert sides <= set(range(max(8, image_size // 4), image_size + 1, 8)), sides
        labels = {v for v in table.column("label").to_pylist() if v is not None}
        assert labels <= set(summary["species"])


def test_cli_draws_the_band_unless_told_not_to(tmp_path, capsys):
    from xmodal.cli import main

    for extra, rows in (([], HEADER_PX), (["--header-px", "0"], 0)):
        out = tmp_path / str(rows)
        assert (
            main(["synth", str(out), "--lab", "3", "--sea", "0", "--uto", "0", "--image-size", "32", *extra])
            == 0
        )
        assert json.loads((out / "synth.json").read_text())["header_px"] == rows
        img = np.asarray(Image.open(next((out / "LAB" / "images").iterdir())))
        assert img.shape[0] == img.shape[1] + rows  # the crops are square below the band
        if rows:
            np.testing.assert_array_equal(img[:rows], scale_bar_header(img.shape[1], rows, um_per_px(32)))
