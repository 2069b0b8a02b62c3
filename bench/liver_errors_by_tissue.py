"""Which tissue the liver errors of a set of predictions on unseen phantom cases border: extra liver voxels by
their own tissue, missed ones by the nearest non-liver tissue of the reference (distances in voxels, z weighted
3x: slices are ~2x the in-plane spacing), each as a share of the reference liver's voxels.  The tissue map is
re-drawn from each case's seed (liverseg.phantom.draw with the config's phantom spec), in the phantom's canonical
RAS frame; the predictions are read back into that frame through their own headers.  Reads
``<pred>/<case>.nii.gz`` and ``<cases>/segmentation-<case>.nii.gz`` (bench/cascade_vs_v2.py's layout).

    python bench/liver_errors_by_tissue.py --pred /tmp/cascade_bench/seed0/pred/V4/auto_auto \
        --cases /tmp/cascade_bench/test_cases --config /tmp/cascade_bench/seed0/config.yaml
"""

import collections
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "bench"))

from liver_errors import parse_args, predictions  # noqa: E402

from liverseg import config as cfgmod  # noqa: E402
from liverseg import phantom as P  # noqa: E402
from liverseg.io import geometry_of  # noqa: E402

NAMES = ("air table fat muscle cavity-fat lung heart bowel colon stomach pancreas kidney spleen aorta IVC portal-vein "
         "liver liver-vessel gallbladder tumour bone arm canal disc").split()


def main():
    a = parse_args(str(ROOT / "config.yaml"))
    spec = P.PhantomSpec.from_config(cfgmod.load(a.config)["dataset"]["phantom"])
    extra, missed, total, n = collections.Counter(), collections.Counter(), 0, 0
    for case, p in predictions(a.pred):
        _, label, tissue, _, _, _ = P.draw(int(case), spec)
        img = nib.load(p)
        pred = geometry_of(img).to_canonical(np.asanyarray(img.dataobj)) >= 1
        ref = label >= 1
        if pred.shape != ref.shape:
            raise SystemExit(f"case {case}: prediction {pred.shape} against the phantom's {ref.shape}")
        total, n = total + int(ref.sum()), n + 1
        for t, c in zip(*np.unique(tissue[pred & ~ref], return_counts=True)):
            extra[NAMES[t]] += int(c)
        idx = ndi.distance_transform_edt(ref, sampling=(1, 1, 3), return_distances=False, return_indices=True)
        m = ref & ~pred
        for t, c in zip(*np.unique(tissue[tuple(i[m] for i in idx)], return_counts=True)):
            missed[NAMES[t]] += int(c)
    print(f"{n} cases, {total} reference liver voxels; shares of them:")
    for what, cnt in (("extra, by their tissue", extra), ("missed, by the nearest non-liver tissue", missed)):
        print(f"{what}: {sum(cnt.values()) / total:.4f} = "
              + ", ".join(f"{k} {v / total:.4f}" for k, v in cnt.most_common(8)))


if __name__ == "__main__":
    main()
