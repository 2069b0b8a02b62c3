"""CPU inference at LiTS size, as a user without a GPU meets it: seconds per case for each experiment.

One LiTS-like scan (the phantom's `lits` preset at 512 x 512 x SLICES) is segmented with `liverseg predict`'s own
code (predict_scan: preprocessing onto the models' grid, the mode's networks, the way back to the scan's grid,
largest-component post-processing, the NIfTI written) in a fresh child process per mode, with THREADS torch threads.

Models: untrained, built with the schema defaults (the LiTS-sized models: resnet18 encoders, full UNet++ decoders
256-128-64-32-16, B on 256-pixel patches, V3 sequences of 5, V1 3D patches of 32 x 128), on two grids:
  lits  the plan the `lits` preset's headers give (bench/plan_table.py's LiTS row: median in-plane spacing, the
        widest field of view), i.e. what a LiTS run plans;
  3mm   slices.spacing_mm: 3 (the field of view as above), the scale TotalSegmentator `--fast` works at.
Network cost does not depend on the weights, but the cascade's routing does, so the output heads are fixed
(--workload): `all` = every slice liver-positive and liver everywhere (B tiles every whole slice: an upper bound
of the cascade's work), `none` = no liver (B never runs: a lower bound).  No test-time augmentation.

    python bench/cpu_lits.py [--slices 200] [--configs lits 3mm] [--modes cascade model_a v3_convlstm v1_3dcnn]
                             [--threads 2] [--workload all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "bench"))

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from liverseg.predict import predict_scan
hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
t = time.perf_counter()
s = predict_scan(sys.argv[1], sys.argv[2], sys.argv[3], mode=sys.argv[4], device="cpu", tta=False)
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": hwm(), "summary": s}, default=str))
"""

PHANTOM = ("import sys; from liverseg.phantom import PhantomSpec, write_case; "
           "write_case(0, sys.argv[1], sys.argv[2], PhantomSpec(preset='lits', size=512, slices=int(sys.argv[3])))")
ROLES = ("classifier", "model_a", "model_b", "v3_convlstm", "v1_3dcnn")


def lits_plan(spacing_mm="auto", cases: int = 100) -> dict:
    from plan_table import headers

    from liverseg.phantom import PhantomSpec
    from liverseg.plan import make_plan

    seeds = list(range(cases))
    return make_plan(headers(PhantomSpec(preset="lits", size=None, slices=None), seeds), [str(s) for s in seeds],
                     spacing_mm=spacing_mm)


def build_models(out: Path, plan: dict, workload: str) -> dict:
    """Untrained models on the plan's grid with fixed heads, saved as training saves them."""
    import torch

    from liverseg import config as C
    from liverseg import models as M
    from liverseg.train import _mm_per_pixel, make_spec

    cfg = C.validate({})
    grid = {"slice_size": plan["size"], "spacing_mm": plan["spacing_mm"], "context_mm_auto": plan["context_mm_auto"]}
    on = workload == "all"
    specs = {}
    torch.manual_seed(0)
    for role in ROLES:
        spec = make_spec(cfg, role, grid)
        spec["mm_per_pixel"] = _mm_per_pixel(spec)
        model = M.build(spec)
        with torch.no_grad():
            if role == "classifier":
                model.head.weight.zero_()
                model.head.bias.fill_(10.0 if on else -10.0)
                spec["threshold"] = 0.5
            else:
                head = {"convlstm": lambda m: m.net.segmentation_head[0], "segmenter": lambda m: m.segmentation_head[0],
                        "unet3d": lambda m: m.head}[spec["kind"]](model)
                head.weight.zero_()
                head.bias.copy_(torch.tensor([-10.0, 10.0, -10.0] if on else [10.0, -10.0, -10.0]))
        (out / role).mkdir(parents=True)
        M.save(model, spec, out / role / "model.pt", out / role / "model.json")
        specs[role] = spec
    return specs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--configs", nargs="+", default=["lits", "3mm"], choices=["lits", "3mm"])
    ap.add_argument("--modes", nargs="+", default=["cascade", "model_a", "v3_convlstm", "v1_3dcnn"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workload", choices=["all", "none"], default="all")
    a = ap.parse_args()
    import torch

    from liverseg.roles import EXPERIMENTS, MODES

    title = {e["mode"]: name for name, e in EXPERIMENTS.items()}
    print(f"CPU ({os.cpu_count()} cores visible), torch {torch.__version__}, {a.threads} threads; a `lits` phantom "
          f"scan 512 x 512 x {a.slices}; untrained schema-default models, workload {a.workload}, no TTA")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        img, lab = d / "volume-0.nii.gz", d / "segmentation-0.nii.gz"
        subprocess.run([sys.executable, "-c", PHANTOM, str(img), str(lab), str(a.slices)], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")})
        import nibabel as nib

        zooms = nib.load(str(img)).header.get_zooms()
        print(f"scan spacing {zooms[0]:.3f} x {zooms[1]:.3f} x {zooms[2]:.2f} mm")
        print()
        print("| grid | experiment | mm per pixel (stored; each model's input) | s per case | slices/s | peak RSS |")
        print("|---|---|---|---|---|---|")
        for name in a.configs:
            plan = lits_plan("auto" if name == "lits" else 3.0)
            mdir = d / f"models-{name}"
            specs = build_models(mdir, plan, a.workload)
            for mode in a.modes:
                mm = "; ".join(f"{r} {specs[r]['mm_per_pixel']['input']:.2f}" for r in MODES[mode])
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-c", CHILD, str(img), str(d / "pred.nii.gz"), str(mdir), mode,
                                    str(a.threads)], capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")})
                if r.returncode:
                    sys.exit(f"{name} {mode}: prediction failed after {time.perf_counter() - t0:.0f} s:\n"
                             f"{r.stderr[-3000:]}")
                out = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"| {name}: {plan['size']} px at {plan['spacing_mm']:.3g} mm | {title[mode]} | "
                      f"{plan['spacing_mm']:.3g}; {mm} | {out['s']:.0f} | {a.slices / out['s']:.2f} | "
                      f"{out['rss_mb'] / 1024:.1f} GiB |", flush=True)


if __name__ == "__main__":
    main()
