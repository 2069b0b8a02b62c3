import numpy as np
import pytest
from scipy import ndimage

from liverseg.metrics import binary_metrics, case_metrics, dice, lesion_detection

from conftest import realdata


def _sphere(shape, c, r, spacing=(1, 1, 1)):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    d = sum(((g - ci) * sp) ** 2 for g, ci, sp in zip(grids, c, spacing))
    return d <= r * r


def test_empty_mask_conventions():
    e = np.zeros((5, 5, 5), bool)
    f = e.copy()
    f[2, 2, 2] = True
    m = binary_metrics(e, e, (1, 1, 1))
    assert m["dice"] == 1 and m["jaccard"] == 1 and m["assd"] == 0 and m["rvd"] == 0
    m = binary_metrics(f, e, (1, 1, 1))
    assert m["dice"] == 0 and np.isnan(m["assd"]) and np.isnan(m["rvd"])
    assert dice(e, e) == 1.0


def test_shifted_sphere_known_answers_with_anisotropic_spacing():
    spacing = (0.8, 0.8, 2.5)
    a = np.zeros((60, 60, 30), bool)
    a[10:40, 10:40, 5:15] = True  # a box: the shift along x by k voxels moves every x-face by k*0.8 mm
    b = np.roll(a, 3, axis=0)
    m = binary_metrics(b, a, spacing)
    assert m["dice"] == pytest.approx(2 * 27 / 60)
    assert m["mssd"] == pytest.approx(3 * 0.8)
    assert m["rvd"] == 0
    assert m["pred_ml"] == pytest.approx(a.sum() * 0.8 * 0.8 * 2.5 / 1000)
    s = _sphere((40, 40, 40), (20, 20, 20), 8)
    assert binary_metrics(s, s, spacing)["hd95"] == 0


def _medpy_all(pred, ref, spacing):
    from medpy.metric import binary as mb

    return {"dice": mb.dc(pred, ref), "jaccard": mb.jc(pred, ref), "rvd": mb.ravd(pred, ref),
            "assd": mb.assd(pred, ref, spacing), "mssd": mb.hd(pred, ref, spacing), "hd95": mb.hd95(pred, ref, spacing)}


def _perturbations(ref):
    yield "eroded", ndimage.binary_erosion(ref, iterations=2)
    yield "dilated", ndimage.binary_dilation(ref, iterations=1)
    yield "shifted", np.roll(ref, (2, -1, 1), axis=(0, 1, 2))
    rng = np.random.default_rng(0)
    noisy = ref ^ (ndimage.binary_dilation(ref) & (rng.random(ref.shape) < 0.3))
    yield "noisy", noisy


def test_agreement_with_medpy_on_synthetic_shapes():
    pytest.importorskip("medpy")
    spacing = (0.7, 0.9, 2.0)
    ref = _sphere((40, 44, 30), (20, 22, 14), 9, spacing=(0.7, 0.9, 2.0)) | _sphere((40, 44, 30), (10, 10, 6), 4)
    for name, pred in _perturbations(ref):
        ours = binary_metrics(pred, ref, spacing)
        theirs = _medpy_all(pred, ref, spacing)
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (name, k)


@pytest.mark.parametrize("case, spacing_from_file", [("117", False), ("902", True)])
def test_agreement_with_medpy_on_real_masks(case, spacing_from_file):
    pytest.importorskip("medpy")
    import nibabel as nib

    sub = "lits117_pypi" if case == "117" else "totalseg_tests"
    img = nib.load(realdata(sub, f"segmentation-{case}.nii.gz"))
    lab = np.asanyarray(img.dataobj).astype(np.uint8)
    spacing = tuple(float(v) for v in img.header.get_zooms()[:3])
    ref = lab >= 1
    # keep medpy's run time small: the liver's bounding box plus a margin is enough for every metric
    for name, pred in _perturbations(ref):
        ours = binary_metrics(pred, ref, spacing)
        theirs = _medpy_all(pred, ref, spacing)
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v, rel=1e-6, abs=1e-9), (case, name, k)


def test_lesion_detection():
    ref = np.zeros((40, 40, 10), bool)
    ref[2:8, 2:8, 2:6] = True  # lesion 1: found exactly
    ref[20:26, 20:26, 2:6] = True  # lesion 2: found only partly (IoU < 0.5)
    ref[30:34, 2:6, 2:6] = True  # lesion 3: missed
    pred = np.zeros_like(ref)
    pred[2:8, 2:8, 2:6] = True
    pred[20:22, 20:26, 2:6] = True
    pred[30:34, 30:34, 2:6] = True  # false positive
    d = lesion_detection(pred, ref)
    assert d["ref_lesions"] == 3 and d["pred_lesions"] == 3 and d["detected"] == 1
    assert d["lesion_recall"] == pytest.approx(1 / 3) and d["lesion_precision"] == pytest.approx(1 / 3)


def test_case_metrics_rows():
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[2:15, 2:15, 2:8] = 1
    lab[5:8, 5:8, 3:6] = 2
    rows = case_metrics(lab, lab, (1, 1, 1))
    assert [r["class"] for r in rows] == ["liver", "tumour"]
    assert rows[0]["dice"] == 1 and rows[1]["lesion_recall"] == 1 and rows[1]["tumour_burden_error"] == 0
