"""Inference time and peak memory per case on this machine, with the models of a finished run (results/train).

For each scan size: write a phantom scan (in a child process), then in a fresh child process run the same steps as
the workflow (preprocess with the models' window and slice size, gated cascade, largest-component
post-processing) and report seconds, slices per second and peak RSS (VmHWM) against the int16 volume.
Usage: python bench/inference.py [--models results/train] [--shapes 128x128x48 512x512x150] [--mode cascade]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
hwm = lambda: int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
import torch
torch.set_num_threads(int(sys.argv[5]))
from liverseg.predict import predict_scan
base = hwm()
t = time.perf_counter()
s = predict_scan(sys.argv[1], sys.argv[2], sys.argv[3], mode=sys.argv[4], device="cpu")
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "slices": s["slices"], "rss_mb": hwm(), "import_rss_mb": base}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="results/train")
    ap.add_argument("--shapes", nargs="+", default=["128x128x48", "512x512x150"])
    ap.add_argument("--mode", default="cascade")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    spec = json.loads((Path(a.models) / "model_a" / "model.json").read_text())
    print(f"models {a.models} (slice size {spec['slice_size']}, encoder {spec['encoder']}), mode {a.mode}, "
          f"{a.threads} threads, CPU")
    for shape in a.shapes:
        x, y, z = (int(v) for v in shape.split("x"))
        assert x == y, "phantom scans are square in-plane"
        with tempfile.TemporaryDirectory() as d:
            img = Path(d) / "volume-0.nii.gz"
            subprocess.run([sys.executable, "-c", "import sys; from liverseg.phantom import PhantomSpec, write_case; "
                            "write_case(0, sys.argv[1], sys.argv[2], PhantomSpec(size=int(sys.argv[3]), "
                            "slices=int(sys.argv[4])))", str(img), str(Path(d) / "seg.nii.gz"), str(x), str(z)],
                           check=True)
            out = subprocess.run([sys.executable, "-c", CHILD, str(img), str(Path(d) / "pred.nii.gz"), a.models,
                                  a.mode, str(a.threads)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
        vol_mb = x * y * z * 2 / 2**20
        print(f"{shape}: {r['s']:6.2f} s/case, {r['slices'] / r['s']:6.1f} slices/s; peak RSS {r['rss_mb']:6.0f} MiB"
              f" = {r['rss_mb'] / vol_mb:.2f}x the int16 volume ({vol_mb:.0f} MiB); above torch/model imports"
              f" ({r['import_rss_mb']:.0f} MiB): {(r['rss_mb'] - r['import_rss_mb']) / vol_mb:.2f}x")


if __name__ == "__main__":
    main()
