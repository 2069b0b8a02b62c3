"""Transfer to real CT: the main job's phantom-trained models on the real scans in ../shared/realdata.

Runs the user's command, `liverseg predict --models MODELS SCAN OUT.nii.gz` (default cascade, TTA and gate as
chosen on validation), on each real scan and prints liver Dice against its reference:

  902-nifti   totalseg_tests/volume-902.nii.gz (20 slices, 0.98 x 0.98 x 2 mm) vs segmentation-902
              (a TotalSegmentator --fast prediction, not a manual label)
  902-dicom   the same scan read from its 20 JPEG 2000 DICOM files (original/example_ct_dicom)
  dcmqi       dcmqi_ct3slice/ct (3 slices, 0.81 mm, 1 mm apart) vs the liver of its DICOM-SEG (liver_seg.dcm)
  117         LiTS case 117 (a crop resampled to 128^3, spacing unknown): prediction and overlay only, no Dice,
              since its millimetres are not known

These cases are a development set: they are looked at, never trained or tuned on.  Reviewers check the same
command on real scans this project does not have.

    python bench/real_ct.py [--models results/train] [--out results/bench/real_ct] [--tta auto]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realdata"
sys.path.insert(0, str(ROOT / "workflow"))


def seg_to_series_mask(seg_path: Path, series: nib.Nifti1Image) -> np.ndarray:
    """The DICOM-SEG's first segment as a mask on the grid of the series it references (read_series's grid):
    each frame goes to the slice at its ImagePositionPatient; frame rows/columns are the CT's rows/columns."""
    import pydicom

    ds = pydicom.dcmread(str(seg_path))
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    inv = np.linalg.inv(series.affine)
    out = np.zeros(series.shape[:3], np.uint8)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        lps = np.array(item.PlanePositionSequence[0].ImagePositionPatient, float)
        ras = np.array([-lps[0], -lps[1], lps[2], 1.0])
        i, j, k = (inv @ ras)[:3]
        assert abs(i) < 0.01 and abs(j) < 0.01, "SEG frame origin is not the slice's first pixel"
        out[:, :, int(round(k))] |= (frames[f] > 0).T.astype(np.uint8)  # read_series: voxel (column, row, slice)
    return out


def dice(pred: nib.Nifti1Image, ref: nib.Nifti1Image) -> tuple[float, float, float]:
    """Liver Dice (labels >= 1) on the reference's grid; prediction and reference must share the grid."""
    p, r = nib.as_closest_canonical(pred), nib.as_closest_canonical(ref)
    if p.shape[:3] != r.shape[:3] or not np.allclose(p.affine, r.affine, atol=1e-2):
        raise SystemExit(f"prediction grid {p.shape} differs from the reference grid {r.shape}")
    a, b = np.asanyarray(p.dataobj) >= 1, np.asanyarray(r.dataobj) >= 1
    ml = float(np.prod(p.header.get_zooms()[:3])) / 1000
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum())), a.sum() * ml, b.sum() * ml


def overlay(image: nib.Nifti1Image, pred: nib.Nifti1Image, ref: nib.Nifti1Image | None, title: str, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = np.asanyarray(nib.as_closest_canonical(image).dataobj).astype(np.float32)
    p = np.asanyarray(nib.as_closest_canonical(pred).dataobj)
    r = np.asanyarray(nib.as_closest_canonical(ref).dataobj) if ref is not None else None
    zs = np.linspace(0, img.shape[2] - 1, 3).round().astype(int) if img.shape[2] > 3 else range(img.shape[2])
    fig, axes = plt.subplots(1, len(zs), figsize=(4 * len(zs), 4.3))
    def view(a2):  # canonical RAS slice -> radiological display: anterior up, patient's right on the left
        return a2.T[:, ::-1]

    for ax, z in zip(np.atleast_1d(axes), zs):
        ax.imshow(np.clip((view(img[:, :, z]) + 150) / 400, 0, 1), cmap="gray", origin="lower")
        if r is not None:
            ax.contour(view(r[:, :, z] >= 1), levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
        ax.contour(view(p[:, :, z] >= 1), levels=[0.5], colors="red", linewidths=1.0, origin="lower")
        ax.contour(view(p[:, :, z] == 2), levels=[0.5], colors="yellow", linewidths=1.0, origin="lower")
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    fig.suptitle(title + "\n(red: prediction liver, yellow: prediction tumour, green: reference liver; "
                         "patient's right on the image's left)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "results" / "train"))
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "real_ct"))
    ap.add_argument("--tta", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--mode", default="cascade", choices=["cascade", "model_a"])
    a = ap.parse_args()
    from liverseg.dicom import read_series

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ts, dq, lits = REAL / "totalseg_tests", REAL / "dcmqi_ct3slice", REAL / "lits117_pypi"
    dq_series = read_series(dq / "ct", "dcmqi")
    dq_ref = nib.Nifti1Image(seg_to_series_mask(dq / "liver_seg.dcm", dq_series), dq_series.affine)
    nib.save(dq_ref, str(out / "dcmqi-reference.nii.gz"))
    cases = [
        ("902-nifti", ts / "volume-902.nii.gz", nib.load(str(ts / "segmentation-902.nii.gz"))),
        ("902-dicom", ts / "original" / "example_ct_dicom", nib.load(str(ts / "segmentation-902.nii.gz"))),
        ("dcmqi", dq / "ct", dq_ref),
        ("117", lits / "volume-117.nii.gz", None),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    print(f"models: {a.models}  mode: {a.mode}  tta: {a.tta}")
    print("case\tslices\tspacing_mm\tliver_dice\tpred_ml\tref_ml\tseconds")
    for name, src, ref in cases:
        if not src.exists():
            print(f"{name}\tmissing: {src}")
            continue
        pred_path = out / f"{name}.nii.gz"
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "liverseg", "predict", "--models", a.models, "--mode", a.mode,
                            "--tta", a.tta, "--threads", "2", str(src), str(pred_path)], env=env,
                           capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if r.returncode:
            print(f"{name}\tFAILED: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
            continue
        pred = nib.load(str(pred_path))
        image = read_series(src, name) if src.is_dir() else nib.load(str(src))
        sp = "x".join(f"{v:.3g}" for v in image.header.get_zooms()[:3])
        if ref is None:
            print(f"{name}\t{pred.shape[2]}\t{sp}\t-\t-\t-\t{secs:.1f}")
        else:
            # the DICOM series' grid differs from the NIfTI's only by orientation: compare in canonical order
            d, pml, rml = dice(pred, ref)
            print(f"{name}\t{pred.shape[2]}\t{sp}\t{d:.4f}\t{pml:.1f}\t{rml:.1f}\t{secs:.1f}")
        overlay(image, pred, ref, f"{name}: liverseg predict ({a.mode})", out / f"{name}.png")


if __name__ == "__main__":
    main()
