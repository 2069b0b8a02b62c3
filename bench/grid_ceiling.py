"""The liver Dice a perfect model on the stored grid could reach: each case's reference label as preprocessing
stores it (nearest-exact onto the plan's grid, in the HDF5 that bench/cascade_vs_v2.py writes for its test cases),
taken as one-hot class probabilities, mapped back to the scan's own grid the way predictions are
(inference.to_source_grid: bilinear on probabilities, argmax there) and scored against the reference.  What stays
below 1 is the grid's share of the error; the rest of a model's is the model's.

    python bench/grid_ceiling.py --h5 /tmp/cascade_bench/test_cases/160px_3.3918mm --cases /tmp/cascade_bench/test_cases
"""

import argparse
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from liverseg.inference import to_source_grid  # noqa: E402
from liverseg.io import geometry_of  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--h5", required=True, help="folder of preprocessed labelled cases <case>.h5")
    ap.add_argument("--cases", required=True, help="folder of segmentation-<case>.nii.gz")
    a = ap.parse_args()
    dices = []
    for h in sorted(Path(a.h5).glob("*.h5")):
        with h5py.File(h) as f:
            liver = torch.from_numpy((f["label"][:] >= 1).astype(np.float32))
            attrs = dict(f.attrs)
        img = nib.load(Path(a.cases) / f"segmentation-{h.stem}.nii.gz")
        ref = geometry_of(img).to_canonical(np.asanyarray(img.dataobj)) >= 1  # (x, y, z)
        back = to_source_grid(torch.stack([1 - liver, liver], 1), attrs).argmax(1).numpy().astype(bool)
        back = np.transpose(back, (2, 1, 0))  # (z, H=y, W=x) -> (x, y, z)
        dices.append(2 * np.count_nonzero(back & ref) / max(np.count_nonzero(back) + np.count_nonzero(ref), 1))
    d = np.array(dices)
    print(f"{d.size} cases: liver Dice of the reference through the stored grid and back, per case mean {d.mean():.4f}"
          f" (min {d.min():.4f})")


if __name__ == "__main__":
    main()
