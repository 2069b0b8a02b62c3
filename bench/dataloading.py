"""Random batches of 2.5D slices from the per-case HDF5 files (DataLoader, 2 workers) versus the same slices indexed
from arrays held in RAM, in one run.
Usage: python bench/dataloading.py [--size 256] [--cases 6] [--slices 64] [--batches 40]
"""

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from liverseg.data import SliceDataset, context_indices, index_cases
from liverseg.phantom import PhantomSpec, write_case
from liverseg.preprocess import preprocess_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    context = 1
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(a.cases):
            img, lab = Path(d) / f"v{i}.nii.gz", Path(d) / f"s{i}.nii.gz"
            write_case(i, img, lab, PhantomSpec(size=a.size, slices=a.slices))
            paths.append(str(Path(d) / f"{i}.h5"))
            preprocess_case(str(i), img, paths[-1], label_path=lab, size=a.size)
        cases = index_cases(paths)
        items = [(k, z) for k, c in enumerate(cases) for z in range(c.n_slices)]
        rng = np.random.default_rng(0)
        order = rng.integers(0, len(items), size=a.batch * a.batches).tolist()

        ds = SliceDataset(cases, items, context, a.size)
        loader = torch.utils.data.DataLoader(ds, batch_size=a.batch, sampler=[(i, 0, (0, 0, j)) for j, i in enumerate(order)], num_workers=a.workers)
        t = time.perf_counter()
        n = 0
        for x, y, _ in loader:
            n += x.shape[0]
        t_h5 = time.perf_counter() - t

        ram = []
        for p in paths:
            with h5py.File(p) as f:
                ram.append((f["image"][:], f["label"][:]))
        t = time.perf_counter()
        m = 0
        for b in range(a.batches):
            xs, ys = [], []
            for i in order[b * a.batch : (b + 1) * a.batch]:
                k, z = items[i]
                img, lab = ram[k]
                xs.append(img[context_indices(z, img.shape[0], context)].astype(np.float32))
                ys.append(lab[z].astype(np.int64))
            x, _ = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
            m += x.shape[0]
        t_ram = time.perf_counter() - t
    r_h5, r_ram = n / t_h5, m / t_ram
    print(f"{a.batches} batches of {a.batch} slices, {a.size}x{a.size}, context {context}")
    print(f"HDF5 + DataLoader ({a.workers} workers, incl. worker start-up): {r_h5:8.1f} slices/s")
    print(f"in-RAM indexing (main process):                 {r_ram:8.1f} slices/s")
    print(f"ratio HDF5 / RAM: {r_h5 / r_ram:.2f}x (goal >= 0.5x)")


if __name__ == "__main__":
    main()
