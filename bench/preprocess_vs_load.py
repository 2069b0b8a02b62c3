"""Windowing + slice extraction of a LiTS-sized scan versus a plain nibabel load of the same file.

Each measurement runs in a fresh subprocess so peak RSS (ru_maxrss) belongs to that step alone.
Usage: python bench/preprocess_vs_load.py [--shape 512 512 400] [--size 512] [--repeats 3]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Peak RSS is read from VmHWM: ru_maxrss of a child keeps the parent's high-water mark across fork+exec.
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"

LOAD = """
import json, resource, sys, time
import nibabel as nib, numpy as np
t = time.perf_counter()
arr = np.asanyarray(nib.load(sys.argv[1]).dataobj)
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "rss_mb": HWM, "dtype": str(arr.dtype)}))
""".replace("HWM", HWM)

STAGE = """
import json, resource, sys, time
from liverseg.preprocess import preprocess_case
base = HWM
t = time.perf_counter()
preprocess_case("bench", sys.argv[1], sys.argv[3], label_path=sys.argv[2], size=int(sys.argv[4]),
                compression=sys.argv[5])
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "rss_mb": HWM, "import_rss_mb": base}))
""".replace("HWM", HWM)

BASELINE_RSS = """
import json
import nibabel, numpy
print(json.dumps({"rss_mb": HWM}))
""".replace("HWM", HWM)


def run(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        img, lab = Path(d) / "volume-0.nii.gz", Path(d) / "segmentation-0.nii.gz"
        t = time.perf_counter()
        # in a child process, so the phantom's working memory does not count towards the measured steps
        subprocess.run([sys.executable, "-c", "import sys; from liverseg.phantom import PhantomSpec, write_case; "
                        "write_case(0, sys.argv[1], sys.argv[2], PhantomSpec(size=int(sys.argv[3]), slices=int(sys.argv[4])))",
                        str(img), str(lab), str(a.shape[0]), str(a.shape[2])], check=True)
        print(f"phantom {a.shape} written in {time.perf_counter() - t:.1f} s ({img.stat().st_size / 1e6:.0f} MB gz)")
        vol_mb = a.shape[0] * a.shape[1] * a.shape[2] * 2 / 2**20
        loads, stages = [], []
        for _ in range(a.repeats):  # interleaved so machine load hits both alike
            loads.append(run(LOAD, img))
            stages.append(run(STAGE, img, lab, Path(d) / "out.h5", a.size, a.compression))
        imp = run(BASELINE_RSS)["rss_mb"]
        load_s = min(r["s"] for r in loads)
        stage_s = min(r["s"] for r in stages)
        load_rss = max(r["rss_mb"] for r in loads)
        stage_rss = max(r["rss_mb"] for r in stages)
        stage_imports = max(r["import_rss_mb"] for r in stages)
        print(f"int16 volume: {vol_mb:.0f} MiB; slices resized to {a.size}; image compression {a.compression}")
        print(f"nibabel load:        {load_s:6.2f} s  peak RSS {load_rss:7.0f} MiB (interpreter+nibabel {imp:.0f} MiB)")
        print(f"window + HDF5 stage: {stage_s:6.2f} s  peak RSS {stage_rss:7.0f} MiB (after imports {stage_imports:.0f} MiB)")
        print(f"time ratio stage / load: {stage_s / load_s:.2f}x (goal <= 2x)")
        print(f"peak memory of the stage above its imports / int16 volume: {(stage_rss - stage_imports) / vol_mb:.2f}x"
              f" (goal <= 4x); whole process / volume: {stage_rss / vol_mb:.2f}x")


if __name__ == "__main__":
    main()
