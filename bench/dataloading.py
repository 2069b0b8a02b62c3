"""Random batches of 2.5D slices for training: the per-case HDF5 files versus the same slices held in RAM, through
the same DataLoader path on both sides, in one run.

Both sides use liverseg's SliceDataset (2.5D context, resize to the model input when it differs), the same
sampler order, batch size, default collate and number of DataLoader workers; the only difference is where
``__getitem__`` reads from: an h5py handle per worker (as training does) or numpy arrays loaded into RAM before
the loader starts (inherited by forked workers). Worker start-up counts on both sides. The two sides alternate
``--repeats`` times and the best run of each is kept.
Usage: python bench/dataloading.py [--size 256] [--cases 6] [--slices 64] [--batch 32] [--batches 40]
       [--workers 2] [--repeats 3]
"""

import argparse
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from liverseg.data import SliceDataset, index_cases
from liverseg.phantom import PhantomSpec, write_case
from liverseg.plan import spacing_to_fit
from liverseg.preprocess import preprocess_case


class RamSliceDataset(SliceDataset):
    """SliceDataset whose 'files' are dicts of arrays already in RAM: the same indexing and conversion code."""

    def __init__(self, cases, items, context, input_size, arrays):
        super().__init__(cases, items, context, input_size)
        self.arrays = arrays

    def _file(self, k):
        return self.arrays[k]


def rate(ds, sampler, batch, workers):
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers)
    t = time.perf_counter()
    n = 0
    for x, _, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(2)
    context = 1
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(a.cases):
            write_case(i, Path(d) / f"v{i}.nii.gz", Path(d) / f"s{i}.nii.gz", PhantomSpec(size=a.size, slices=a.slices))
        mm = spacing_to_fit([Path(d) / f"v{i}.nii.gz" for i in range(a.cases)], a.size)  # one grid, as a plan gives
        for i in range(a.cases):
            paths.append(str(Path(d) / f"{i}.h5"))
            preprocess_case(str(i), Path(d) / f"v{i}.nii.gz", paths[-1], label_path=Path(d) / f"s{i}.nii.gz",
                            size=a.size, spacing_mm=mm)
        cases = index_cases(paths)
        items = [(k, z) for k, c in enumerate(cases) for z in range(c.n_slices)]
        rng = np.random.default_rng(0)
        order = rng.integers(0, len(items), size=a.batch * a.batches).tolist()
        sampler = [(i, 0, (0, 0, j)) for j, i in enumerate(order)]
        arrays = []
        for p in paths:
            with h5py.File(p) as f:
                arrays.append({"image": f["image"][:], "label": f["label"][:]})
        h5_ds = SliceDataset(cases, items, context, a.size)
        ram_ds = RamSliceDataset(cases, items, context, a.size, arrays)
        r_h5, r_ram = [], []
        for _ in range(a.repeats):
            r_h5.append(rate(h5_ds, sampler, a.batch, a.workers))
            r_ram.append(rate(ram_ds, sampler, a.batch, a.workers))
    h5_best, ram_best = max(r_h5), max(r_ram)
    who = f"{a.workers} DataLoader worker{'s' if a.workers > 1 else ''}" if a.workers else "main process (0 workers)"
    print(f"{a.batches} batches of {a.batch} slices, {a.size}x{a.size}, context {context}, {who} on both sides, "
          f"best of {a.repeats}")
    print(f"HDF5 files:     {h5_best:8.1f} slices/s  (runs: {', '.join(f'{r:.1f}' for r in r_h5)})")
    print(f"arrays in RAM:  {ram_best:8.1f} slices/s  (runs: {', '.join(f'{r:.1f}' for r in r_ram)})")
    print(f"ratio HDF5 / RAM: {h5_best / ram_best:.2f}x (goal >= 0.5x)")


if __name__ == "__main__":
    main()
