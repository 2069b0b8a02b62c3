"""Model B alone on the stored grid: its liver Dice (liver or tumour against the rest) on the slices the cascade
sends to B, for several probability thresholds, and the predicted / reference liver volume there.  Run it on a
seed's training cases and on unseen cases to tell under-fitting (training cases low too) from over-fitting, and
an outward or inward bias (volume ratio away from 1) from noise.

The cascade runs as in prediction (model A, the classifier's gate with its stored threshold, A's liver region,
gate ``route``, no TTA); B's probabilities are compared with each case's stored label (``label`` of the HDF5 file).

    python bench/b_stored_grid.py --models /tmp/cascade_bench_s21/seed0/results/train \
        --h5 /tmp/cascade_bench_s21/seed0/results/preprocess --cases 0 1 2
"""

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from liverseg import models as M  # noqa: E402
from liverseg.cascade import prepare_val_case  # noqa: E402
from liverseg.inference import case_stride, tile_probs  # noqa: E402
from liverseg.predict import open_case  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", required=True, help="a results/train folder (classifier, model_a, model_b)")
    ap.add_argument("--h5", required=True, help="folder of preprocessed <case>.h5 files on the models' grid")
    ap.add_argument("--cases", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device("cpu")
    d = Path(a.models)
    mods = {r: M.load(d / r / "model.pt", d / r / "model.json") for r in ("classifier", "model_a", "model_b")}
    model_b, spec_b = mods["model_b"]
    threshold = json.loads((d / "classifier" / "model.json").read_text())["threshold"]
    counts = {t: np.zeros(3, np.int64) for t in THRESHOLDS}  # intersection, predicted, reference
    soft = 0.0
    for case in a.cases:
        path = Path(a.h5) / f"{case}.h5"
        vc = prepare_val_case(path, mods, threshold, spec_b["crop_margin"], spec_b["z_margin_mm"],
                              spec_b["patch_size"], ["route"], dev, amp=False)
        if not vc.b_slices:
            continue
        with h5py.File(path) as f:
            label = dict(zip(vc.b_slices, f["label"][vc.b_slices]))  # B's slices only
        r0, r1, c0, c1 = vc.region
        # the image slice by slice, as prediction reads it (predict.open_case), not a second whole-volume read
        with open_case(path, str(case)) as (image, _, _):
            for zs, p in tile_probs(model_b, spec_b, image, vc.b_slices, vc.region, dev, amp=False,
                                    stride=case_stride(spec_b, vc.z_mm)):
                ref = np.stack([label[z] for z in zs]) >= 1
                liver = np.zeros(ref.shape, np.float32)  # background outside B's region, as the cascade pastes it
                liver[:, r0:r1, c0:c1] = (p[:, 1] + p[:, 2]).numpy()
                soft += float(liver.sum())
                for t in THRESHOLDS:
                    q = liver > t
                    counts[t] += (np.count_nonzero(q & ref), np.count_nonzero(q), np.count_nonzero(ref))
    print(f"{len(a.cases)} cases, model B of {d}")
    print("| threshold on P(liver or tumour) | liver Dice on B's slices | predicted / reference volume |")
    print("|---|---|---|")
    for t in THRESHOLDS:
        inter, pred, ref = counts[t]
        print(f"| {t} | {2 * inter / max(pred + ref, 1):.4f} | {pred / max(ref, 1):.3f} |")
    print(f"sum of B's liver probabilities / reference volume: {soft / max(counts[0.5][2], 1):.3f}")


if __name__ == "__main__":
    main()
