"""liverseg.report: overlays in the case's own window, the comparison table and plot from summary files."""

import json

import matplotlib.axes
import matplotlib.figure
import numpy as np
import pytest

from liverseg.evaluate import aggregate_files, evaluate_case
from liverseg.preprocess import preprocess_case
from liverseg.report import overlay_case, summarize

from conftest import write_nifti


def test_overlay_shows_the_window_the_case_was_preprocessed_with(tiny_case, tmp_path, monkeypatch):
    img, lab = tiny_case
    h5 = tmp_path / "1.h5"
    preprocess_case("1", img, h5, label_path=lab, lower=-60, upper=140, size=32)
    seen = []
    real = matplotlib.axes.Axes.imshow

    def spy(self, *a, **k):
        seen.append((k.get("vmin"), k.get("vmax")))
        return real(self, *a, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    titles = []
    real_title = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **k: titles.append(t) or real_title(self, t, **k))
    out = tmp_path / "o.png"
    overlay_case("1", img, lab, lab, h5, out, title="t")
    assert out.stat().st_size > 5000
    assert seen and set(seen) == {(-60.0, 140.0)}
    # the picture says how the scan was sampled and what the models saw
    import h5py
    import nibabel as nib

    sx, sy, sz = nib.as_closest_canonical(nib.load(img)).header.get_zooms()[:3]
    with h5py.File(h5) as f:
        mm, fov = float(f.attrs["spacing_mm"]), float(f.attrs["fov_mm"])
    assert f"voxels {sx:.3g} x {sy:.3g} x {sz:.3g} mm" in titles[0]
    assert f"models saw it at {mm:.3g} mm per pixel, {fov:.0f} mm field of view" in titles[0]


def _summary(tmp_path, exp, stage, dice_pairs):
    tsvs = []
    for case, overlap in dice_pairs:
        ref = np.zeros((6, 6, 6), np.uint8)
        ref[1:5, 1:5, 1:5] = 1
        pred = np.zeros_like(ref)
        pred.flat[np.flatnonzero(ref)[:overlap]] = 1
        r = write_nifti(tmp_path / f"{exp}{stage}{case}r.nii.gz", ref)
        p = write_nifti(tmp_path / f"{exp}{stage}{case}p.nii.gz", pred)
        tsvs.append(tmp_path / f"{exp}{stage}{case}.tsv")
        evaluate_case(case, p, r, tsvs[-1])
    out = tmp_path / f"{exp}_{stage}.json"
    aggregate_files(tsvs, tmp_path / f"{exp}_{stage}.tsv", out,
                    {"experiment": exp, "stage": stage, "failed_cases": {"9": "case 9: broken"}})
    return str(out)


def test_summarize_reads_experiment_and_stage_from_each_summary(tmp_path):
    files = [_summary(tmp_path, "v2_unetpp_cca", "post", [("1", 64), ("2", 32)]),
             _summary(tmp_path, "v2_unetpp_cca", "raw", [("1", 64), ("2", 16)])]
    bench = tmp_path / "b.tsv"
    bench.write_text("s\th:m:s\n12.5\t0:00:12\n")
    bench2 = tmp_path / "b2.tsv"
    bench2.write_text("s\th:m:s\n7.5\t0:00:07\n")
    md = summarize(files, {"v2_unetpp_cca": [str(bench), str(bench2)]}, tmp_path / "s.md", tmp_path / "d.png")
    row = next(ln for ln in md.splitlines() if ln.startswith("| V2 2D UNet++ + CCA"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # post: case 1 Dice 1, case 2 Dice 2*32/(32+64) = 0.667 -> mean 0.8333; pooled 2*96/(96+128) = 0.8571
    assert cells[1].startswith("0.8333 ± ") and cells[2] == "0.8571" and cells[6] == "10.0"
    # raw stage in the last column: case 2 Dice 2*16/(16+64) = 0.4 -> mean 0.7
    assert cells[8].startswith("0.7000 ± ")
    assert "| V4 cascade: classifier + UNet++ A/B, gated, + CCA | not run |" in md
    assert "`9`: case 9: broken" in md
    assert "| 1 | 1x1x1 | 6x6x6 |" in md and "| 2 | 1x1x1 | 6x6x6 |" in md  # each test case's spacing and FOV
    assert (tmp_path / "d.png").stat().st_size > 5000


def test_a_fold_ensemble_gets_a_row_and_each_fold_one_after_it(tmp_path):
    import json

    files = []
    for exp, overlap in (("v4_cascade", 64), ("v4_cascade-fold1", 16), ("v4_cascade-fold0", 32)):
        for stage in ("post", "raw"):
            f = _summary(tmp_path, exp, stage, [("1", overlap)])
            if exp == "v4_cascade":  # what the aggregate rule adds for a fold ensemble
                s = json.loads(open(f).read())
                s["ensemble_folds"] = 2
                open(f, "w").write(json.dumps(s))
            files.append(f)
    md = summarize(files, {}, tmp_path / "s.md", tmp_path / "d.png")
    rows = [ln for ln in md.splitlines() if ln.startswith("| V4 cascade")]
    title = "V4 cascade: classifier + UNet++ A/B, gated, + CCA"
    assert [r.split("|")[1].strip() for r in rows] == [f"{title} (ensemble of 2 folds)", f"{title} (fold 0 alone)",
                                                       f"{title} (fold 1 alone)"]
    # each row holds its own experiment's figures: Dice 1, 2*32/(32+64), 2*16/(16+64)
    assert [r.split("|")[2].strip()[:6] for r in rows] == ["1.0000", "0.6667", "0.4000"]
    assert "pooled out-of-fold validation slices" in md
