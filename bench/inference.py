"""Inference time and peak memory per case on this machine, as the workflow predicts a new scan.

For each scan size: write a phantom scan (in a child process), then in a fresh child process run the same steps as
`liverseg predict` (preprocess with the models' window and slice size, the gated cascade or model A alone,
largest-component post-processing, the label NIfTI written on the scan's grid) and report seconds, slices per
second and peak RSS (VmHWM) against the int16 volume.

Models:
  --models DIR   the models of a finished run (default results/train: the demo's, slices at 128, A at 96).
  --lits         LiTS-sized models built here, untrained: the schema defaults on the grid the LiTS-like headers
                 plan (bench/cpu_lits.py's `lits`: resnet18 encoders, full UNet++ decoders 256-128-64-32-16,
                 classifier and model A on whole stored slices, model B on 256-pixel patches of them),
                 encoder_weights None, nothing downloaded (HF_HUB_OFFLINE=1). Network cost does not depend
                 on the weights, but the cascade's routing does, so the output heads are set to a fixed answer:
                   --workload all   every slice liver-positive and liver everywhere: B tiles every whole slice
                                    (9 patches of 256 at stride 128), post-processing keeps the whole volume;
                                    an upper bound on the cascade's work
                   --workload none  no liver anywhere: B never runs; a lower bound
                 No test-time augmentation (untrained models carry no validation choice).
With two or more scans of the same in-plane size, the script also prints the measured marginal peak RSS per added
slice between consecutive depths: what scales with the number of slices (whole-case arrays such as the stored
slices, A's float16 probabilities, labels and the output volume), as opposed to fixed costs (imports, models,
per-batch activations).
Usage: python bench/inference.py [--models results/train | --lits [--workload all|none]]
       [--shapes 128x128x48 512x512x150] [--mode cascade] [--threads 2] [--batch 16]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = """
import json, sys, time
hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import torch
torch.set_num_threads(int(sys.argv[5]))
from liverseg.predict import predict_scan
base = hwm()
t = time.perf_counter()
s = predict_scan(sys.argv[1], sys.argv[2], sys.argv[3], mode=sys.argv[4], device="cpu", batch=int(sys.argv[6]))
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "summary": s, "rss_mb": hwm(), "import_rss_mb": base}, default=str))
"""

PHANTOM = ("import sys; from liverseg.phantom import PhantomSpec, write_case; "
           "write_case(0, sys.argv[1], sys.argv[2], PhantomSpec(size=int(sys.argv[3]), slices=int(sys.argv[4])))")



def build_lits_models(out: Path, workload: str) -> dict:
    """Untrained LiTS-sized models with fixed output heads on the LiTS plan's grid (bench/cpu_lits.py builds them;
    its ``lits`` configuration), saved as training saves them."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cpu_lits import build_models, lits_plan

    return build_models(out, lits_plan(), workload)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="results/train")
    ap.add_argument("--lits", action="store_true", help="untrained LiTS-sized models (see the module's docstring)")
    ap.add_argument("--workload", choices=["all", "none"], default="all", help="with --lits: the heads' fixed answer")
    ap.add_argument("--shapes", nargs="+", default=["128x128x48", "512x512x150"])
    ap.add_argument("--mode", default="cascade")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="slices per batch (predict.batch_size, default 16)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as md:
        if a.lits:
            models = md
            specs = build_lits_models(Path(md), a.workload)
            sa, sb, sc = specs["model_a"], specs["model_b"], specs["classifier"]
            print(f"LiTS-sized untrained models (schema defaults, the LiTS plan's grid), workload {a.workload}: "
                  f"classifier {sc['encoder']} at {sc['input_size']}; A UNet++ {sa['encoder']} decoder "
                  f"{'-'.join(map(str, sa['decoder_channels']))} at {sa['input_size']}; B the same on "
                  f"{sb['patch_size']}-pixel patches of the {sb['slice_size']} grid; no TTA")
        else:
            models = a.models
            spec = json.loads((Path(models) / "model_a" / "model.json").read_text())
            print(f"models {models}: slices at {spec['slice_size']}, A {spec['encoder']} at {spec['input_size']}")
        print(f"mode {a.mode}, {a.threads} threads, batch {a.batch}, CPU")
        rows = []
        for shape in a.shapes:
            x, y, z = (int(v) for v in shape.split("x"))
            assert x == y, "phantom scans are square in-plane"
            with tempfile.TemporaryDirectory() as d:
                img = Path(d) / "volume-0.nii.gz"
                subprocess.run([sys.executable, "-c", PHANTOM, str(img), str(Path(d) / "seg.nii.gz"), str(x), str(z)],
                               check=True)
                out = subprocess.run([sys.executable, "-c", CHILD, str(img), str(Path(d) / "pred.nii.gz"), models,
                                      a.mode, str(a.threads), str(a.batch)], capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{shape}: prediction failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
            vol_mb = x * y * z * 2 / 2**20
            s = r["summary"]
            route = (f"; slices to B {s.get('slices_to_b')}, B region {s.get('region')}" if a.mode == "cascade" else "")
            print(f"{shape}: {r['s']:7.2f} s/case, {z / r['s']:6.2f} slices/s; peak RSS {r['rss_mb']:6.0f} MiB"
                  f" = {r['rss_mb'] / vol_mb:.2f}x the int16 volume ({vol_mb:.0f} MiB); above torch/liverseg imports"
                  f" ({r['import_rss_mb']:.0f} MiB): {(r['rss_mb'] - r['import_rss_mb']) / vol_mb:.2f}x{route}",
                  flush=True)
            rows.append((x, y, z, r["rss_mb"]))
        for (x0, y0, z0, m0), (x1, y1, z1, m1) in zip(rows, rows[1:]):
            if (x0, y0) == (x1, y1) and z1 != z0:
                per_slice = x0 * y0 * 2 / 2**20
                print(f"{x0}x{y0}x{z0} -> {x1}x{y1}x{z1}: peak RSS grows {(m1 - m0) / (z1 - z0):.2f} MiB per added "
                      f"slice = {(m1 - m0) / (z1 - z0) / per_slice:.2f}x an int16 slice ({per_slice:.2f} MiB)")


if __name__ == "__main__":
    main()
