"""Liver/tumour statistics against figures worked out by hand on a synthetic case of known volumes and HU."""

import json

import numpy as np
import pytest

from liverseg.errors import CaseError
from liverseg.statistics import COLUMNS, case_statistics, collect, label_statistics, model_versions

from conftest import write_nifti

SPACING = (0.5, 0.8, 2.5)  # mm: a voxel is 1 mm^3 = 0.001 mL


def known_case():
    """Liver: a 20 x 20 x 10 box (4000 voxels, 4 mL) at 60 HU holding two tumours at 10 HU and -10 HU:
    a 4 x 4 x 4 cube (64 voxels) and a 3 x 3 x 2 box (18 voxels) that touches the first only at a corner
    (26-connectivity joins them, 6 would not); one more tumour voxel far away is a third component."""
    labels = np.zeros((30, 30, 14), np.uint8)
    hu = np.full(labels.shape, -1000, np.int16)
    labels[5:25, 5:25, 2:12] = 1
    hu[5:25, 5:25, 2:12] = 60
    labels[8:12, 8:12, 4:8] = 2
    hu[8:12, 8:12, 4:8] = 10
    labels[12:15, 12:15, 8:10] = 2  # (12, 12, 8) touches (11, 11, 7) at a corner only
    hu[12:15, 12:15, 8:10] = -10
    labels[22, 22, 10] = 2
    hu[22, 22, 10] = 40
    return labels, hu


def test_known_volumes_counts_and_hu():
    labels, hu = known_case()
    s = label_statistics(labels, hu, SPACING)
    assert s["liver_ml"] == pytest.approx(4.0)  # 4000 voxels x 1 mm^3, tumour included
    assert s["tumour_count"] == 2  # the corner-touching pair is one component at 26-connectivity, plus the voxel
    assert s["tumour_volumes_ml"] == pytest.approx([0.082, 0.001])  # (64 + 18) and 1 voxels
    assert s["tumour_ml"] == pytest.approx(0.083)
    assert s["tumour_burden_pct"] == pytest.approx(100 * 83 / 4000)
    assert s["parenchyma_hu_mean"] == pytest.approx(60.0) and s["parenchyma_hu_sd"] == pytest.approx(0.0)
    # tumour: 64 at 10, 18 at -10, 1 at 40 -> mean 500 / 83, population sd from the same three values
    mean = (64 * 10 + 18 * -10 + 40) / 83
    sd = np.sqrt((64 * (10 - mean) ** 2 + 18 * (-10 - mean) ** 2 + (40 - mean) ** 2) / 83)
    assert s["tumour_hu_mean"] == pytest.approx(mean) and s["tumour_hu_sd"] == pytest.approx(sd)
    assert s["spacing_mm"] == list(SPACING) and s["connectivity"] == 26


def test_no_liver_gives_nulls_not_zero_division():
    z = np.zeros((4, 4, 4), np.uint8)
    s = label_statistics(z, np.zeros((4, 4, 4), np.int16), (1, 1, 1))
    assert s["liver_ml"] == 0 and s["tumour_count"] == 0 and s["tumour_volumes_ml"] == []
    assert s["tumour_burden_pct"] is None and s["parenchyma_hu_mean"] is None and s["tumour_hu_sd"] is None


def test_case_statistics_reads_hu_through_nifti_scaling_and_writes_the_table(tmp_path):
    import nibabel as nib

    labels, hu = known_case()
    aff = np.diag([*SPACING, 1.0])
    # stored as uint16 with slope 2, intercept -1024: HU = 2 * raw - 1024
    raw = ((hu.astype(np.int32) + 1024) // 2).astype(np.uint16)
    img = nib.Nifti1Image(raw, aff)
    img.header.set_slope_inter(2.0, -1024.0)
    nib.save(img, str(tmp_path / "ct.nii.gz"))
    write_nifti(tmp_path / "pred.nii.gz", labels, aff, np.uint8)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_bytes(b"weights")
    (tmp_path / "m" / "model.json").write_text(json.dumps({"config_hash": "abc123"}))
    s = case_statistics("7", tmp_path / "ct.nii.gz", tmp_path / "pred.nii.gz", {"model_a": [tmp_path / "m" / "model.pt"]})
    assert s["parenchyma_hu_mean"] == pytest.approx(60.0) and s["liver_ml"] == pytest.approx(4.0)
    assert s["models"] == model_versions({"model_a": [tmp_path / "m" / "model.pt"]})
    assert s["models"][0]["config_hash"] == "abc123" and len(s["models"][0]["sha256"]) == 16
    (tmp_path / "7.json").write_text(json.dumps({"experiment": "V2", **s}))
    collect([tmp_path / "7.json"], tmp_path / "stats.tsv")
    head, row = (ln.split("\t") for ln in (tmp_path / "stats.tsv").read_text().splitlines())
    assert head == ["experiment", *COLUMNS]
    cells = dict(zip(head, row))
    assert cells["experiment"] == "V2" and cells["case"] == "7" and cells["tumour_count"] == "2"
    assert cells["liver_ml"] == "4.000" and cells["tumour_volumes_ml"] == "0.082;0.001"
    assert cells["models"].startswith("model_a:") and cells["models"].endswith(":abc123")


def test_prediction_on_another_grid_is_a_case_error(tmp_path):
    labels, hu = known_case()
    write_nifti(tmp_path / "ct.nii.gz", hu, np.diag([*SPACING, 1.0]))
    write_nifti(tmp_path / "pred.nii.gz", labels[:, :, :10], np.diag([*SPACING, 1.0]), np.uint8)
    with pytest.raises(CaseError, match="case 7: prediction .* is not on the grid"):
        case_statistics("7", tmp_path / "ct.nii.gz", tmp_path / "pred.nii.gz")
