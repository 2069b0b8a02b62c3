"""V4's (or any prediction's) liver Dice on unseen phantom cases by the case's contrast phase: per case Dice (label
>= 1 against the reference) and predicted / reference liver volume, then the mean of both per phase.  The phase
and noise of each case are re-drawn from its seed the way the phantom drew them (liverseg.phantom.anatomy and
scan_geometry with the config's phantom spec); nothing is read from the images.  It tells a bias that depends on
contrast (an outward boundary where the liver is brighter than its neighbours, an inward one where it is not)
from noise.  Reads predictions ``<pred>/<case>.nii.gz`` and references ``<cases>/segmentation-<case>.nii.gz``
(bench/cascade_vs_v2.py's layout; case names are the phantom seeds).

    python bench/liver_by_phase.py --pred /tmp/cascade_bench/seed0/pred/V4/auto_auto --cases /tmp/cascade_bench/test_cases
"""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "bench"))

from liver_errors import liver_masks, parse_args  # noqa: E402

from liverseg import config as cfgmod  # noqa: E402
from liverseg.phantom import PhantomSpec, anatomy, scan_geometry  # noqa: E402

PHASES = ("non-contrast", "arterial", "portal-venous")


def main():
    a = parse_args(str(ROOT / "config.yaml"))
    ph = cfgmod.load(a.config)["dataset"]["phantom"]
    spec = PhantomSpec.from_config(ph)
    rows = []
    for case, ref, pred in liver_masks(a.pred, a.cases):
        dice = 2 * np.count_nonzero(ref & pred) / max(np.count_nonzero(ref) + np.count_nonzero(pred), 1)
        rng_anat, rng_scan, _ = np.random.default_rng(int(case)).spawn(3)  # as phantom.draw
        A = anatomy(rng_anat, spec.max_tumours, spec.phase_weights, spec.arms_probability)
        G = scan_geometry(rng_scan, A, spec)
        rows.append((case, A.phase, G.noise, dice, np.count_nonzero(pred) / max(np.count_nonzero(ref), 1)))
    print("| phase | cases | liver Dice per case | predicted / reference volume (mean) | range of the ratio |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(PHASES):
        sel = [r for r in rows if r[1] == k]
        if sel:
            d, v = np.array([r[3] for r in sel]), np.array([r[4] for r in sel])
            print(f"| {name} | {len(sel)} | {d.mean():.4f} | {v.mean():.3f} | {v.min():.3f}-{v.max():.3f} |")
    d, n = np.array([r[3] for r in rows]), np.array([r[2] for r in rows])
    print(f"all {len(rows)} cases: liver Dice per case {d.mean():.4f}; correlation of Dice with the noise "
          f"(HU) {np.corrcoef(n, d)[0, 1]:+.2f}")


if __name__ == "__main__":
    main()
