"""Overlap metrics shared by validation and evaluation.

Empty-mask convention (applied everywhere): reference and prediction both empty -> Dice 1, Jaccard 1 (nothing
to find, nothing found); exactly one empty -> Dice 0, Jaccard 0.
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    p, r = np.count_nonzero(pred), np.count_nonzero(ref)
    if p == 0 and r == 0:
        return 1.0
    inter = np.count_nonzero(np.logical_and(pred, ref))
    return 2.0 * inter / (p + r)


def liver_tumour_dice(pred_labels: np.ndarray, ref_labels: np.ndarray) -> tuple[float, float]:
    """LiTS classes: liver = label >= 1 (tumour included), tumour = label == 2."""
    return dice(pred_labels >= 1, ref_labels >= 1), dice(pred_labels == 2, ref_labels == 2)


# ---------------------------------------------------------------------------------------------- full metric set
# Surface-distance conventions follow medpy (tested against it): the surface of a mask is the mask minus its
# erosion with a 6-connected (face) structuring element; ASSD is the mean over both directed distance sets
# pooled (as medpy >= 0.5 and the LiTS evaluation compute it); MSSD (Hausdorff) the larger of the two directed maxima; HD95 the 95th percentile of both directed
# distance sets together.  Distances are in mm from the voxel spacing.
# Empty masks: both empty -> distances 0, RVD 0; exactly one empty -> distances and RVD undefined (NaN), and the
# summary counts such cases instead of averaging over them silently.

import math  # noqa: E402

from scipy import ndimage  # noqa: E402

import cc3d  # noqa: E402

NAN = float("nan")


def _bbox_union(a: np.ndarray, b: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    both = np.logical_or(a, b)
    out = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        idx = np.flatnonzero(both.any(axis=other))
        out.append(slice(max(0, int(idx[0]) - pad), min(both.shape[ax], int(idx[-1]) + 1 + pad)))
    return tuple(out)


def _surface(mask: np.ndarray) -> np.ndarray:
    struct = ndimage.generate_binary_structure(3, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, iterations=1)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances (mm) pred-surface -> ref-surface and ref-surface -> pred-surface.

    Both distance transforms are computed once, inside the bounding box of the two masks (plus one voxel),
    which gives the same values as on the whole grid because every surface voxel lies inside that box.
    """
    box = _bbox_union(pred, ref)
    p, r = pred[box], ref[box]
    sp, sr = _surface(p), _surface(r)
    dt_r = ndimage.distance_transform_edt(~sr, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return dt_r[sp], dt_p[sr]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing) -> dict:
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_p, n_r = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    inter = int(np.count_nonzero(pred & ref)) if n_p and n_r else 0
    union = n_p + n_r - inter
    d = 1.0 if n_p + n_r == 0 else 2.0 * inter / (n_p + n_r)
    j = 1.0 if union == 0 else inter / union
    out = {"dice": d, "jaccard": j, "voe": 1.0 - j,
           "rvd": (0.0 if n_p == 0 else NAN) if n_r == 0 else (n_p - n_r) / n_r,
           "pred_ml": n_p * voxel_ml, "ref_ml": n_r * voxel_ml}
    if n_p == 0 and n_r == 0:
        out.update(assd=0.0, mssd=0.0, hd95=0.0)
    elif n_p == 0 or n_r == 0:
        out.update(assd=NAN, mssd=NAN, hd95=NAN)
    else:
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        both = np.hstack((d_pr, d_rp))
        out["assd"] = float(both.mean())
        out["mssd"] = float(max(d_pr.max(), d_rp.max()))
        out["hd95"] = float(np.percentile(both, 95))
    return out


def lesion_detection(pred: np.ndarray, ref: np.ndarray, iou_threshold: float = 0.5, connectivity: int = 26) -> dict:
    """LiTS-style lesion detection on 3D connected components of the tumour masks.

    A reference lesion is detected when the predicted lesions overlapping it, taken together, reach IoU >
    ``iou_threshold`` with it; a predicted lesion is a true positive by the same rule in the other direction.
    """
    lr, nr = cc3d.connected_components(ref.astype(np.uint8), connectivity=connectivity, return_N=True)
    lp, np_ = cc3d.connected_components(pred.astype(np.uint8), connectivity=connectivity, return_N=True)

    def matched(la, na, lb) -> int:
        hits = 0
        if na == 0:
            return 0
        for i, sl in enumerate(ndimage.find_objects(la), start=1):
            if sl is None:
                continue
            a = la[sl] == i
            other_ids = np.unique(lb[sl][a])
            other_ids = other_ids[other_ids > 0]
            if other_ids.size == 0:
                continue
            # Union of the overlapping components, possibly extending beyond this lesion's box.
            b_full = np.isin(lb, other_ids)
            box = _bbox_union(la == i, b_full, pad=0)
            a2, b2 = la[box] == i, b_full[box]
            inter = np.count_nonzero(a2 & b2)
            if inter / np.count_nonzero(a2 | b2) > iou_threshold:
                hits += 1
        return hits

    tp_ref = matched(lr, nr, lp)
    tp_pred = matched(lp, np_, lr)
    recall = tp_ref / nr if nr else (1.0 if np_ == 0 else 0.0)
    precision = tp_pred / np_ if np_ else (1.0 if nr == 0 else 0.0)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"ref_lesions": int(nr), "pred_lesions": int(np_), "detected": int(tp_ref),
            "lesion_precision": precision, "lesion_recall": recall, "lesion_f1": f1}


def case_metrics(pred_labels: np.ndarray, ref_labels: np.ndarray, spacing) -> list[dict]:
    """One row per class (liver = label >= 1, tumour = label == 2) with every metric."""
    rows = []
    for cls, pm, rm in (("liver", pred_labels >= 1, ref_labels >= 1), ("tumour", pred_labels == 2, ref_labels == 2)):
        row = {"class": cls, **binary_metrics(pm, rm, spacing)}
        if cls == "tumour":
            row.update(lesion_detection(pm, rm))
            liver_p, liver_r = np.count_nonzero(pred_labels >= 1), np.count_nonzero(ref_labels >= 1)
            burden_p = np.count_nonzero(pm) / liver_p if liver_p else 0.0
            burden_r = np.count_nonzero(rm) / liver_r if liver_r else 0.0
            row["tumour_burden_error"] = abs(burden_p - burden_r)
        rows.append(row)
    return rows


def is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
