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
    # keep medpy's run time small: the liver's bounding box plus a margin is enough for every metric.  The
    # perturbations move the surface by at most 2 voxels, so a 4-voxel margin keeps both masks and their borders
    # inside the crop (np.roll wraps only background, unless the liver reaches the volume's edge, as in case 117).
    box = tuple(slice(max(0, int(i.min()) - 4), int(i.max()) + 5) for i in np.nonzero(ref))
    ref = ref[box]
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


# --------------------------------------------------------------- LiTS lesion detection: hand-made cases


def _line(*runs, n=24):
    """A (n, 3, 3) mask with voxels [a, b) set along x in the middle row, one run per (a, b)."""
    m = np.zeros((n, 3, 3), bool)
    for a, b in runs:
        m[a:b, 1, 1] = True
    return m


def test_lesion_one_prediction_spanning_two_reference_lesions_is_merged():
    ref = _line((0, 2), (3, 5))  # two lesions of 2 voxels
    pred = _line((0, 5))  # one prediction over both: IoU 2/5 with each alone, 4/5 with the merged pair
    d = lesion_detection(pred, ref)
    assert (d["ref_lesions"], d["pred_lesions"], d["detected"]) == (2, 1, 1)
    assert d["lesion_recall"] == 0.5 and d["lesion_precision"] == 1.0
    assert d == _literal_lits(pred, ref)


def test_lesion_split_into_two_predictions_is_merged():
    ref = _line((0, 5))  # one lesion of 5 voxels
    pred = _line((0, 2), (3, 5))  # two pieces: IoU 2/5 each, 4/5 together
    d = lesion_detection(pred, ref)
    assert (d["ref_lesions"], d["pred_lesions"], d["detected"]) == (1, 2, 1)
    assert d["lesion_recall"] == 1.0 and d["lesion_precision"] == 0.5
    assert d == _literal_lits(pred, ref)


def test_lesion_iou_threshold_is_strict():
    n = 80
    ref = _line((0, 20), (30, 50), (60, 80), n=n)  # three lesions of 20 voxels
    pred = _line((0, 11), (30, 40), (60, 69), n=n)  # IoU 11/20 = 0.55, 10/20 = 0.5, 9/20 = 0.45
    d = lesion_detection(pred, ref)
    assert (d["ref_lesions"], d["pred_lesions"], d["detected"]) == (3, 3, 1)
    assert lesion_detection(pred, ref, iou_threshold=0.45)["detected"] == 2
    assert lesion_detection(pred, ref, iou_threshold=0.4)["detected"] == 3
    assert d == _literal_lits(pred, ref)


def _plane(nx, ny, ref_voxels, pred_voxels):
    """(nx, ny, 1) masks from (x, y) lists; scipy numbers components by their first voxel in C order (x, then y)."""
    ref, pred = np.zeros((nx, ny, 1), bool), np.zeros((nx, ny, 1), bool)
    for m, voxels in ((ref, ref_voxels), (pred, pred_voxels)):
        for x, y in voxels:
            m[x, y, 0] = True
    return pred, ref


def test_lesion_reference_tie_goes_to_the_lowest_predicted_label():
    # Reference lesions g1 = (0..1, 0) and g2 = (3, 0..2); predictions p1 = (0..3, 0) and p2 = (3..4, 2).
    # p1 and p2 overlap g2 by one voxel each: g2 goes to p1 (lower label), so g1 and g2 merge and are paired with
    # p1 + p2: IoU 4/7, detected.  Giving g2 to p2 instead would pair p1-g1 (IoU 2/4) and p2-g2 (1/4): none.
    pred, ref = _plane(6, 3, [(0, 0), (1, 0), (3, 0), (3, 1), (3, 2)], [(0, 0), (1, 0), (2, 0), (3, 0), (3, 2), (4, 2)])
    d = lesion_detection(pred, ref)
    assert (d["ref_lesions"], d["pred_lesions"], d["detected"]) == (2, 2, 1)
    assert d == _literal_lits(pred, ref)


def test_lesion_prediction_tie_goes_to_the_lowest_reference_group():
    # g1 = (0..5, 0), g2 = (0..7, 4); pa = (0..2, 0) owns g1, pb = (0..2, 4) owns g2, and pc = (5, 0..4) touches
    # each by one voxel.  pc joins g1 (lower label): pa + pc vs g1 has IoU 4/10, pb vs g2 3/8.  Had it joined g2:
    # pa vs g1 3/6 and pb + pc vs g2 4/12.  At threshold 0.45 that is 0 detections, not 1.
    ref = [(x, 0) for x in range(6)] + [(x, 4) for x in range(8)]
    pred = [(x, 0) for x in range(3)] + [(x, 4) for x in range(3)] + [(5, y) for y in range(5)]
    pred, ref = _plane(8, 5, ref, pred)
    d = lesion_detection(pred, ref, iou_threshold=0.45)
    assert (d["ref_lesions"], d["pred_lesions"], d["detected"]) == (2, 3, 0)
    assert lesion_detection(pred, ref, iou_threshold=0.39)["detected"] == 1  # pa + pc vs g1 (0.4) only
    assert d == _literal_lits(pred, ref, iou_threshold=0.45)


def test_lesion_diagonal_neighbours_are_separate_lesions_under_6_connectivity():
    m = np.zeros((4, 4, 4), bool)
    m[0, 0, 0] = m[1, 1, 0] = m[2, 2, 1] = True  # edge neighbours, then corner neighbours
    for connectivity, n in ((6, 3), (18, 2), (26, 1)):
        d = lesion_detection(m, m, connectivity=connectivity)
        assert (d["ref_lesions"], d["pred_lesions"], d["detected"]) == (n, n, n), connectivity
    assert lesion_detection(m, m)["ref_lesions"] == 3  # default: 6-connected, as scipy.ndimage.label in LiTS


def test_lesion_empty_masks():
    e = np.zeros((5, 5, 5), bool)
    f = e.copy()
    f[2, 2, 2] = True
    assert lesion_detection(e, e) == {"ref_lesions": 0, "pred_lesions": 0, "detected": 0, "lesion_precision": 1.0,
                                      "lesion_recall": 1.0, "lesion_f1": 1.0}
    assert lesion_detection(f, e)["lesion_precision"] == 0 and lesion_detection(e, f)["lesion_recall"] == 0
    with pytest.raises(ValueError):
        lesion_detection(f, f, connectivity=8)


# --------------------------------------------------------------- LiTS lesion detection: literal reference


def _literal_lits(pred, ref, iou_threshold=0.5, connectivity=6):
    """Slow step-by-step version of detect_lesions in lits-challenge-scoring (program/helpers/calc_metric.py),
    with the labelling and counting of program/evaluate.py.

    Two steps follow the scorer's stated intent instead of its code (see lesion_detection's docstring): the IoU
    union is the merged prediction's voxels OR the merged reference voxels, and an undetected pair lowers the
    number of detections by one.
    """
    structure = ndimage.generate_binary_structure(3, {6: 1, 18: 2, 26: 3}[connectivity])
    lp, num_predicted = ndimage.label(pred, structure=structure)
    lr, num_reference = ndimage.label(ref, structure=structure)
    num_detected = 0
    if num_reference > 0:
        p_ids = [int(v) for v in np.unique(lp[lr > 0]) if v != 0]  # predictions touching a reference lesion
        g_ids = list(range(1, num_reference + 1))
        members = {g: [g] for g in g_ids}  # merged reference group: representative label -> its labels
        inter = np.zeros((len(p_ids), len(g_ids)), dtype=np.int64)
        for i, p_id in enumerate(p_ids):
            for j, g_id in enumerate(g_ids):
                inter[i, j] = np.count_nonzero(np.logical_and(lp == p_id, lr == g_id))

        # Merge reference lesions connected by one prediction: row by row, the columns this row overlaps and for
        # which it is the (first) largest overlap are summed into the first of them.
        for i in range(len(p_ids)):
            merge = [j for j in range(len(g_ids)) if inter[i, j] > 0 and np.argmax(inter[:, j]) == i]
            if len(merge) > 1:
                keep = merge[0]
                for j in merge[1:]:
                    inter[:, keep] += inter[:, j]
                    members[g_ids[keep]] += members.pop(g_ids[j])
                inter = np.delete(inter, merge[1:], axis=1)
                g_ids = [g for j, g in enumerate(g_ids) if j not in merge[1:]]

        # Each prediction keeps only its largest (first on ties) overlap with a merged reference group.
        for i in range(len(p_ids)):
            j_max = int(np.argmax(inter[i]))
            v = inter[i, j_max]
            inter[i, :] = 0
            inter[i, j_max] = v

        # Merge predictions connected by one merged reference group, then test each pair.
        pairs = []
        for j, g_id in enumerate(g_ids):
            rows = [i for i in range(len(p_ids)) if inter[i, j] > 0]
            if rows:
                pairs.append(([p_ids[i] for i in rows], members[g_id]))
        num_detected = len(pairs)
        for p_labels, g_labels in pairs:
            p_mask = np.zeros(lp.shape, bool)
            for p_id in p_labels:
                p_mask |= lp == p_id
            g_mask = np.zeros(lr.shape, bool)
            for g_id in g_labels:
                g_mask |= lr == g_id
            i_count = np.count_nonzero(np.logical_and(p_mask, g_mask))
            u_count = np.count_nonzero(np.logical_or(p_mask, g_mask))
            if float(i_count) / u_count <= iou_threshold:
                num_detected -= 1

    tp, fp, fn = num_detected, num_predicted - num_detected, num_reference - num_detected
    recall = tp / (tp + fn) if tp + fn else (1.0 if num_predicted == 0 else 0.0)
    precision = tp / (tp + fp) if tp + fp else (1.0 if num_reference == 0 else 0.0)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"ref_lesions": num_reference, "pred_lesions": num_predicted, "detected": num_detected,
            "lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1}


def _blobs(rng, shape, sigma, fraction):
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1 - fraction)


@pytest.mark.parametrize("seed", range(30))
def test_lesion_detection_matches_literal_lits_algorithm(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(6, 14, size=3))
    ref = _blobs(rng, shape, sigma=rng.uniform(0.6, 1.5), fraction=rng.uniform(0.05, 0.3))
    kind = seed % 3
    if kind == 0:  # an independent blob field: merges and splits of every sort
        pred = _blobs(rng, shape, sigma=rng.uniform(0.6, 1.5), fraction=rng.uniform(0.05, 0.3))
    elif kind == 1:  # a shifted, dilated or eroded copy with speckle noise
        op = rng.integers(3)
        pred = (np.roll(ref, tuple(int(v) for v in rng.integers(-1, 2, size=3)), axis=(0, 1, 2)) if op == 0
                else ndimage.binary_dilation(ref) if op == 1 else ndimage.binary_erosion(ref))
        pred ^= rng.random(shape) < 0.05
    else:  # the reference with a random share of voxels removed and added
        pred = (ref & (rng.random(shape) > 0.4)) | (rng.random(shape) < 0.03)
    for connectivity in (6, 26):
        for thr in (0.5, 0.2):
            ours = lesion_detection(pred, ref, iou_threshold=thr, connectivity=connectivity)
            assert ours == _literal_lits(pred, ref, iou_threshold=thr, connectivity=connectivity), (connectivity, thr)
    assert lesion_detection(pred, ref) == lesion_detection(pred, ref, 0.5, 6)


def test_case_metrics_rows():
    lab = np.zeros((20, 20, 10), np.uint8)
    lab[2:15, 2:15, 2:8] = 1
    lab[5:8, 5:8, 3:6] = 2
    rows = case_metrics(lab, lab, (1, 1, 1))
    assert [r["class"] for r in rows] == ["liver", "tumour"]
    assert rows[0]["dice"] == 1 and rows[1]["lesion_recall"] == 1 and rows[1]["tumour_burden_error"] == 0
