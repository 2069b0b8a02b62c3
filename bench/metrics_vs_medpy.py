"""The full liverseg metric set versus medpy's assd + hd95 on a LiTS-sized liver pair (same values).

Usage: python bench/metrics_vs_medpy.py [--shape 512 512 400]
"""

import argparse
import time

import numpy as np
from scipy import ndimage

from liverseg.metrics import binary_metrics, case_metrics
from liverseg.phantom import PhantomSpec, generate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    a = ap.parse_args()
    from medpy.metric import binary as mb

    _, lab, aff = generate(0, PhantomSpec(size=a.shape[0], slices=a.shape[2]))
    spacing = tuple(np.sqrt((aff[:3, :3] ** 2).sum(axis=0)))
    ref = lab >= 1
    pred = np.roll(ndimage.binary_dilation(ref, iterations=2), 3, axis=0)
    pred_labels = np.where(pred, 1, 0).astype(np.uint8)
    pred_labels[pred & (lab == 2)] = 2
    print(f"pair {ref.shape}, liver {ref.sum()} voxels, spacing {np.round(spacing, 3)}")

    t = time.perf_counter()
    m_assd = mb.assd(pred, ref, spacing)
    m_hd95 = mb.hd95(pred, ref, spacing)
    t_medpy = time.perf_counter() - t
    t = time.perf_counter()
    rows = case_metrics(pred_labels, lab, spacing)
    t_ours = time.perf_counter() - t
    ours = binary_metrics(pred, ref, spacing)
    assert abs(ours["assd"] - m_assd) <= 1e-6 * m_assd and abs(ours["hd95"] - m_hd95) <= 1e-6 * m_hd95
    assert rows[0]["assd"] == ours["assd"]
    print(f"medpy assd + hd95:                     {t_medpy:7.2f} s  (assd {m_assd:.6f}, hd95 {m_hd95:.6f})")
    print(f"liverseg full set (liver + tumour,     {t_ours:7.2f} s  (assd {ours['assd']:.6f}, hd95 {ours['hd95']:.6f})")
    print("  Dice, Jaccard, VOE, RVD, ASSD, MSSD, HD95, volumes, lesion detection)")
    print(f"speed-up: {t_medpy / t_ours:.1f}x (goal >= 20x); values agree to 1e-6")


if __name__ == "__main__":
    main()
