"""One GPU check for a lent card (bench/gpu_check.sh runs it in under 5 minutes): a Markdown table of

- training slices/s and peak GPU memory of the classifier, model A and model B on the LiTS grid (schema-default
  models; A and the classifier on whole 512-pixel slices, B on its 256-pixel patches), with AMP, batches of the
  schema defaults;
- data-loader slices/s with train.workers workers, reading a preprocessed LiTS-like case as training does
  (SliceDataset, 2.5D context) — the loader must outrun the GPU, or the card waits;
- cascade inference seconds for a 512 x 512 x SLICES scan (`liverseg predict`'s predict_scan with untrained models,
  workload `all` of bench/cpu_lits.py: an upper bound of the cascade's work).

    python bench/gpu_check.py [--out gpu_check.md] [--slices 200] [--size 512] [--device cuda] [--workers N]
``--device cpu --size 64 --slices 8 --steps 2`` is the smoke test run on machines without a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from liverseg import config as C  # noqa: E402
from liverseg import models as M  # noqa: E402
from liverseg.train import make_spec  # noqa: E402


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def train_rate(spec: dict, batch: int, steps: int, dev: torch.device) -> tuple[float, float]:
    """Slices per second of forward + backward + AdamW step with AMP (bench/train_throughput.py's measurement),
    and peak GPU memory (GiB)."""
    from train_throughput import measure

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rate = measure(spec, batch, steps, dev, True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    return rate, peak


def loader_rate(h5: Path, spec: dict, batch: int, workers: int, batches: int) -> float:
    """Slices per second the training DataLoader delivers (model A's 2.5D slices, resized to its input)."""
    from liverseg.data import SliceDataset, epoch_draws, index_cases

    cases = index_cases([str(h5)])
    items = [(0, z) for z in range(cases[0].n_slices)]
    ds = SliceDataset(cases, items, spec["context"], spec["input_size"])
    draws = epoch_draws([list(range(len(items)))], [1.0], batch * (batches + 2), seed=0, epoch=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=draws, num_workers=workers, drop_last=True,
                                     pin_memory=torch.cuda.is_available())
    it = iter(dl)
    for _ in range(2):  # workers start, files open
        next(it)
    t0 = time.perf_counter()
    n = 0
    for x, *_ in it:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512, help="the stored grid (the LiTS plan is 640 at 0.80 mm; 512 "
                                                           "is the scan's matrix and the issue's figure)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=None, help="default: train.workers of config.yaml")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    cfg = C.validate({})
    workers = a.workers if a.workers is not None else C.load(ROOT / "config.yaml")["train"]["workers"]
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "CPU"
    amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if dev.type == "cuda" else "off"
    grid = {"slice_size": a.size, "spacing_mm": 0.8, "context_mm_auto": 4.0}
    lines = [f"# GPU check: {card}", "",
             f"torch {torch.__version__}, AMP {amp}, stored grid {a.size} px, {os.cpu_count()} CPU cores, "
             f"date {time.strftime('%Y-%m-%d')}", "",
             "| what | setting | slices/s | peak GPU memory |", "|---|---|---|---|"]
    rates = {}
    for role in ("classifier", "model_a", "model_b"):
        spec = make_spec(cfg, role, grid)
        batch = cfg["train"][role]["batch_size"]
        rate, peak = train_rate(spec, batch, a.steps, dev)
        rates[role] = rate
        lines.append(f"| train {role} | {spec['encoder']}, {spec['input_size']} px, batch {batch} | {rate:.0f} | "
                     f"{peak:.1f} GiB |")
        print(lines[-1], flush=True)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        from liverseg.phantom import PhantomSpec, write_case
        from liverseg.preprocess import preprocess_case

        img, lab, h5 = d / "volume-0.nii.gz", d / "segmentation-0.nii.gz", d / "case.h5"
        t0 = time.perf_counter()
        write_case(0, img, lab, PhantomSpec(preset="lits", size=512, slices=a.slices))
        preprocess_case("0", img, h5, lab, size=a.size, spacing_mm=None)
        print(f"phantom + preprocessing: {time.perf_counter() - t0:.0f} s", flush=True)
        spec_a = make_spec(cfg, "model_a", grid)
        batch = cfg["train"]["model_a"]["batch_size"]
        lr = loader_rate(h5, spec_a, batch, workers, batches=8)
        verdict = "outruns" if lr > rates["model_a"] else "does NOT outrun"
        lines.append(f"| data loader (model A's slices) | {workers} workers, batch {batch} | {lr:.0f} | — "
                     f"({verdict} A's training) |")
        print(lines[-1], flush=True)

        from cpu_lits import build_models

        from liverseg.predict import predict_scan

        plan = {"size": a.size, "spacing_mm": None, "context_mm_auto": 4.0}
        from liverseg.io import load_nifti

        zooms = load_nifti(img, "0").header.get_zooms()
        plan["spacing_mm"] = float(zooms[0])  # the scan's own spacing: the grid is the scan's matrix
        mdir = d / "models"
        build_models(mdir, plan, "all")
        predict_scan(img, d / "warm.nii.gz", mdir, mode="cascade", device=a.device, tta=False)  # cuDNN warm-up
        sync(dev)
        t0 = time.perf_counter()
        predict_scan(img, d / "pred.nii.gz", mdir, mode="cascade", device=a.device, tta=False)
        sync(dev)
        dt = time.perf_counter() - t0
        lines.append(f"| cascade inference, 512 x 512 x {a.slices} scan | upper-bound workload, no TTA | "
                     f"{a.slices / dt:.0f} ({dt:.1f} s per case) | — |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
