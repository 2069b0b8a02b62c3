"""liverseg.evaluate: per-case rows on the reference's grid and their aggregation."""

import json

import numpy as np
import pytest

from liverseg.errors import CaseError
from liverseg.evaluate import aggregate_files, evaluate_case, read_rows

from conftest import write_nifti


def _case(tmp_path, name, spacing, ref_idx, pred_idx, shape=(10, 10, 10)):
    ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    ref.flat[ref_idx] = 1
    pred.flat[pred_idx] = 1
    aff = np.diag([*spacing, 1.0])
    r = write_nifti(tmp_path / f"{name}_ref.nii.gz", ref, aff)
    p = write_nifti(tmp_path / f"{name}_pred.nii.gz", pred, aff)
    out = tmp_path / f"{name}.tsv"
    evaluate_case(name, p, r, out)
    return str(out)


def test_dice_global_pools_voxel_counts_not_millilitres(tmp_path):
    """Case a: 1 mm voxels, 100 + 100 voxels, Dice 0.5; case b: 2 mm voxels (8x the volume each), 300 + 300 voxels,
    Dice 1.  Pooled over voxels as LiTS does: 2 (50 + 300) / (200 + 600) = 0.875; the mean of the per-case Dice is
    0.75 and weighting by mL would give 2 (0.05 + 2.4) / (0.2 + 4.8) = 0.98."""
    a = _case(tmp_path, "a", (1, 1, 1), np.arange(100), np.arange(50, 150))
    b = _case(tmp_path, "b", (2, 2, 2), np.arange(300), np.arange(300))
    rows = {(r["case"], r["class"]): r for r in read_rows(a) + read_rows(b)}
    assert rows["a", "liver"]["overlap_voxels"] == 50 and rows["b", "liver"]["pred_voxels"] == 300
    assert rows["b", "liver"]["ref_ml"] == pytest.approx(2.4)
    s = aggregate_files([a, b], tmp_path / "per_case.tsv", tmp_path / "summary.json", {"experiment": "x"})
    liver = s["aggregate"]["liver"]
    assert liver["dice_global"] == pytest.approx(0.875)
    assert liver["dice"]["mean"] == pytest.approx(0.75) and liver["dice_per_case"] == {"a": 0.5, "b": 1.0}
    # tumour: both empty in both cases -> per-case Dice 1 by convention, nothing to pool
    assert s["aggregate"]["tumour"]["dice_global"] is None
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["experiment"] == "x" and on_disk["cases"] == ["a", "b"]
    assert len((tmp_path / "per_case.tsv").read_text().splitlines()) == 1 + 4


def test_metrics_use_the_reference_spacing(tmp_path):
    a = _case(tmp_path, "s", (0.5, 0.5, 4.0), np.arange(100), np.arange(100))
    (liver,) = [r for r in read_rows(a) if r["class"] == "liver"]
    assert liver["ref_ml"] == pytest.approx(100 * 0.5 * 0.5 * 4 / 1000) and liver["dice"] == 1.0
    # the scan's spacing and field of view travel with its rows and into the summary (the report's case table)
    assert liver["spacing_mm"] == "0.5x0.5x4" and liver["fov_mm"] == "5x5x40"
    s = aggregate_files([a], tmp_path / "pc.tsv", tmp_path / "s.json")
    assert s["geometry"] == {"s": {"spacing_mm": "0.5x0.5x4", "fov_mm": "5x5x40"}}


def test_a_prediction_on_another_grid_is_refused(tmp_path):
    ref = write_nifti(tmp_path / "r.nii.gz", np.zeros((4, 4, 4), np.uint8))
    pred = write_nifti(tmp_path / "p.nii.gz", np.zeros((4, 4, 4), np.uint8), np.diag([2.0, 1, 1, 1]))
    with pytest.raises(CaseError, match="case q: prediction affine differs"):
        evaluate_case("q", pred, ref, tmp_path / "o.tsv")
    assert not (tmp_path / "o.tsv").exists()
