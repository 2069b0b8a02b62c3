"""Where the liver errors of a set of predictions lie: missed and extra liver voxels (label >= 1) against the
reference, the share of each within one in-plane pixel of the reference liver's boundary, and the share in the
liver's two top and two bottom slices (and beyond them).  Reads predictions ``<pred>/<case>.nii.gz`` and
references ``<cases>/segmentation-<case>.nii.gz`` (bench/cascade_vs_v2.py's layout).

    python bench/liver_errors.py --pred /tmp/cascade_bench/seed0/pred/V4/auto_auto --cases /tmp/cascade_bench/test_cases
"""

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi


def predictions(pred_dir):
    """Yield (case, path) for each post-processed prediction ``<pred_dir>/<case>.nii.gz`` (not the ``*_raw`` ones)."""
    for p in sorted(Path(pred_dir).glob("*.nii.gz")):
        if not p.name.endswith("_raw.nii.gz"):
            yield p.name[: -len(".nii.gz")], p


def liver_masks(pred_dir, cases_dir):
    """Yield (case, reference liver, predicted liver), both label >= 1, for each post-processed prediction
    (``predictions``) against ``<cases_dir>/segmentation-<case>.nii.gz``."""
    for case, p in predictions(pred_dir):
        ref = np.asanyarray(nib.load(Path(cases_dir) / f"segmentation-{case}.nii.gz").dataobj) >= 1
        yield case, ref, np.asanyarray(nib.load(p).dataobj) >= 1


def parse_args(config_default=None):
    """``--pred`` and ``--cases`` (bench/cascade_vs_v2.py's layout); with ``config_default`` also ``--config``, the
    config whose phantom spec drew the cases."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--pred", required=True)
    ap.add_argument("--cases", required=True)
    if config_default is not None:
        ap.add_argument("--config", default=config_default, help="the phantom spec the cases were drawn with")
    return ap.parse_args()


def main():
    a = parse_args()
    tot = dict(ref=0, missed=0, extra=0, missed_edge=0, extra_edge=0, missed_ends=0, extra_ends=0)
    dices = []
    for _, ref, pred in liver_masks(a.pred, a.cases):
        missed, extra = ref & ~pred, pred & ~ref
        zs = np.flatnonzero(ref.any(axis=(0, 1)))
        ends = np.zeros(ref.shape[2], bool)
        if zs.size:
            ends[: zs[0] + 2] = True
            ends[max(zs[-1] - 1, 0):] = True
        edge = ref ^ ndi.binary_erosion(ref, structure=np.ones((3, 3, 1)))
        near = ndi.binary_dilation(edge, structure=np.ones((3, 3, 1)))  # within one in-plane pixel of the boundary
        tot["ref"] += int(ref.sum())
        for k, m in (("missed", missed), ("extra", extra)):
            tot[k] += int(m.sum())
            tot[f"{k}_edge"] += int((m & near).sum())
            tot[f"{k}_ends"] += int(m[:, :, ends].sum())
        dices.append(2 * (ref & pred).sum() / max(ref.sum() + pred.sum(), 1))
    print(f"{len(dices)} cases, liver Dice per case {np.mean(dices):.4f}; reference liver voxels {tot['ref']}")
    for k in ("missed", "extra"):
        n = max(tot[k], 1)
        print(f"{k}: {tot[k]} voxels ({tot[k] / tot['ref']:.3f} of the reference), {tot[f'{k}_edge'] / n:.2f} within one "
              f"pixel of the boundary, {tot[f'{k}_ends'] / n:.2f} in the two top and bottom liver slices or beyond")


if __name__ == "__main__":
    main()
