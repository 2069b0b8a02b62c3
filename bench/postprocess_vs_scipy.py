"""Largest-3D-component post-processing versus the original study's way, on a LiTS-sized prediction.

Baseline: scipy.ndimage.label on the whole volume (26-connectivity), keep the biggest label.
Ours: liverseg.postprocess.postprocess_labels (foreground bounding box, then cc3d), which also drops tumour outside
the kept liver. The liver masks must be identical.
Usage: python bench/postprocess_vs_scipy.py [--shape 512 512 500] [--repeats 3]
"""

import argparse
import time

import numpy as np
from scipy import ndimage

from liverseg.phantom import PhantomSpec, generate
from liverseg.postprocess import postprocess_labels


def scipy_largest(labels):
    lab, n = ndimage.label(labels >= 1, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def make_prediction(shape, seed=0):
    """A phantom label volume made to look like a raw prediction: liver, tumours and false-positive specks."""
    _, lab, _ = generate(seed, PhantomSpec(size=shape[0], slices=shape[2]))
    rng = np.random.default_rng(seed)
    pred = lab.copy()
    for _ in range(30):  # scattered false positives near the liver and elsewhere in the body
        c = rng.integers([shape[0] // 4, shape[1] // 4, 0], [3 * shape[0] // 4, 3 * shape[1] // 4, shape[2]])
        r = rng.integers(2, 6)
        sl = tuple(slice(max(0, ci - r), ci + r) for ci in c)
        pred[sl] = rng.integers(1, 3)
    return pred


def timed(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 500])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    pred = make_prediction(a.shape)
    fg = pred >= 1
    print(f"prediction {pred.shape}, foreground {fg.mean() * 100:.2f}% of voxels")
    t_scipy, ref = timed(lambda: scipy_largest(pred), a.repeats)
    t_ours, ours = timed(lambda: postprocess_labels(pred, connectivity=26), a.repeats)
    assert np.array_equal(ours >= 1, ref), "liver masks differ"
    print(f"scipy.ndimage.label, whole volume: {t_scipy:.3f} s")
    print(f"liverseg postprocess (bbox + cc3d): {t_ours:.3f} s")
    print(f"speed-up: {t_scipy / t_ours:.2f}x (goal >= 2x); liver masks identical")


if __name__ == "__main__":
    main()
