"""The best Dice any model can reach on a stored grid: the reference label itself taken to the grid and back.

Each held-out phantom case's label goes through preprocessing (resampled to the plan's mm per pixel, placed on the
grid) and back the way predictions go (one-hot probabilities through inference.to_source_grid, argmax on the case's
own grid); the Dice of that round trip against the label is the ceiling a perfect model would hit at this pixel
size, before any learning error.  Same unseen cases as bench/cascade_vs_v2.py (phantom dataset seed 7).

    python bench/grid_ceiling.py [--models results/train] [--cases 40] [--grids 160:3.39 256:2.0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from liverseg import config as C  # noqa: E402
from liverseg.inference import to_source_grid  # noqa: E402
from liverseg.io import load_nifti, read_labels  # noqa: E402
from liverseg.phantom import PhantomSpec, write_case  # noqa: E402
from liverseg.preprocess import preprocess_case  # noqa: E402

TEST_DATASET_SEED = 7


def round_trip(lab_path, h5) -> np.ndarray:
    with h5py.File(h5) as f:
        stored, attrs = f["label"][:], dict(f.attrs)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(stored.astype(np.int64)), 3).permute(0, 3, 1, 2).float()
    back = np.transpose(to_source_grid(onehot, attrs).argmax(dim=1).numpy().astype(np.uint8), (2, 1, 0))
    from liverseg.io import Geometry

    geom = Geometry(tuple(int(v) for v in attrs["original_shape"]), np.asarray(attrs["affine"]),
                    np.asarray(attrs["ornt"]))
    return geom.from_canonical(back)


def dice(a, b) -> float:
    s = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / s if s else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(ROOT / "results" / "train"), help="the grid of these models is one row")
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--grids", nargs="*", default=[], help="more grids SIZE:MM to compare (as bench/preprocess_vs_load.py)")
    a = ap.parse_args()
    cfg = C.load(ROOT / "config.yaml")
    ph = cfg["dataset"]["phantom"]
    spec = PhantomSpec.from_config(ph)
    m = json.loads((Path(a.models) / "model_a" / "model.json").read_text())
    grids = [(float(m["spacing_mm"]), int(m["slice_size"]), "the models' grid")]
    grids += [(float(g.split(":")[1]), int(g.split(":")[0]), "") for g in a.grids]
    with tempfile.TemporaryDirectory() as d:
        rows = {g: [] for g in grids}
        for i in range(a.cases):
            seed = TEST_DATASET_SEED * 1000 + i
            img, lab = Path(d) / f"v{seed}.nii.gz", Path(d) / f"s{seed}.nii.gz"
            write_case(seed, img, lab, spec)
            ref = read_labels(load_nifti(lab, str(seed)))
            for g in grids:
                h5 = Path(d) / "c.h5"
                preprocess_case(str(seed), img, h5, label_path=lab, size=g[1], spacing_mm=g[0])
                back = round_trip(lab, h5)
                rows[g].append((dice(back >= 1, ref >= 1), dice(back == 2, ref == 2)))
    print(f"{a.cases} unseen phantom cases (seeds {TEST_DATASET_SEED * 1000}..), label -> stored grid -> back:")
    for g in grids:
        r = np.array(rows[g], float)
        print(f"  {g[0]:.3g} mm, {g[1]} px {g[2]}: liver Dice per case {np.nanmean(r[:, 0]):.4f} (min {np.nanmin(r[:, 0]):.4f}),"
              f" tumour Dice per tumour case {np.nanmean(r[:, 1]):.4f} ({int(np.isfinite(r[:, 1]).sum())} cases)")


if __name__ == "__main__":
    main()
