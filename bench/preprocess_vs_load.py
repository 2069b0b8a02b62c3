"""Windowing + slice extraction of a LiTS-sized scan versus a plain nibabel load of the same file (and, for
transparency, versus the same load decompressed by isal, the way the stage itself reads .nii.gz files).

The stage runs the way a config runs it: window and image compression come from ``--config`` (default: the
project's config.yaml); the scan is a LiTS-like phantom (``preset: lits``, 512 x 512 at 0.55-1.0 mm). By default
two stored grids are measured side by side on the same file:
  - ``640:0.804``: the grid the plan's auto rules give for LiTS-like headers (bench/plan_table.py): every slice is
    resampled to 0.804 mm (Pillow) and placed body-centred on 640 x 640;
  - ``512:native``: the scan's own matrix at its own spacing, no resampling (only the body-centring shift).
``--grids SIZE:MM ...`` picks the grids explicitly (MM ``native`` = the scan's own spacing);
``--compression`` takes one or more image compressions (default: the config's ``slices.compression``), each
measured at every size, and the size of the HDF5 file written is printed.
Each measurement runs in a fresh subprocess, so peak RSS (VmHWM) belongs to that step alone; repeats are
interleaved (load, stage at each size, load, ...) so machine load hits every step alike; the best time is kept.
Usage: python bench/preprocess_vs_load.py [--config config.yaml] [--shape 512 512 400] [--grids 640:0.804 512:native]
       [--repeats 3] [--compression none lzf gzip]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from liverseg import config as C

ROOT = Path(__file__).resolve().parent.parent

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

# The same load with the file decompressed by ISA-L (isal), as the stage reads .nii.gz files (liverseg.io.load_nifti):
# printed beside the plain load, so the stage's ratio against a load as fast as its own reading is visible too.
LOAD_ISAL = """
import json, resource, sys, time
import nibabel as nib, numpy as np
from isal import igzip
t = time.perf_counter()
arr = np.asanyarray(nib.Nifti1Image.from_stream(igzip.open(sys.argv[1], "rb")).dataobj)
dt = time.perf_counter() - t
print(json.dumps({"s": dt, "rss_mb": HWM, "dtype": str(arr.dtype)}))
""".replace("HWM", HWM)

STAGE = """
import json, resource, sys, time
from liverseg.preprocess import preprocess_case
base = HWM
t = time.perf_counter()
preprocess_case("bench", sys.argv[1], sys.argv[3], label_path=sys.argv[2], size=int(sys.argv[4]),
                compression=sys.argv[5], lower=float(sys.argv[6]), upper=float(sys.argv[7]), mode=sys.argv[8],
                spacing_mm=None if sys.argv[9] == "native" else float(sys.argv[9]))
dt = time.perf_counter() - t
import os
print(json.dumps({"s": dt, "rss_mb": HWM, "import_rss_mb": base, "torch": "torch" in sys.modules,
                  "h5_mb": os.path.getsize(sys.argv[3]) / 2**20}))
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
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400])
    ap.add_argument("--grids", nargs="+", default=["640:0.804", "512:native"],
                    help="stored grids SIZE:MM to measure (MM native: the scan's own spacing)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compression", choices=["none", "lzf", "gzip"], nargs="+", default=None,
                    help="image compressions to measure (default: the config's slices.compression)")
    a = ap.parse_args()
    cfg = C.load(a.config)
    w = cfg["window"]
    compressions = a.compression or [cfg["slices"]["compression"]]
    grids = [(int(g.split(":")[0]), g.split(":")[1]) for g in a.grids]
    steps = [(g, c) for g in grids for c in compressions]

    with tempfile.TemporaryDirectory() as d:
        img, lab = Path(d) / "volume-0.nii.gz", Path(d) / "segmentation-0.nii.gz"
        t = time.perf_counter()
        # in a child process, so the phantom's working memory does not count towards the measured steps
        subprocess.run([sys.executable, "-c", "import sys; from liverseg.phantom import PhantomSpec, write_case; "
                        "write_case(0, sys.argv[1], sys.argv[2], "
                        "PhantomSpec(preset='lits', size=int(sys.argv[3]), slices=int(sys.argv[4])))",
                        str(img), str(lab), str(a.shape[0]), str(a.shape[2])], check=True)
        print(f"phantom {a.shape} written in {time.perf_counter() - t:.1f} s ({img.stat().st_size / 1e6:.0f} MB gz)")
        vol_mb = a.shape[0] * a.shape[1] * a.shape[2] * 2 / 2**20
        loads, isal_loads, stages = [], [], {k: [] for k in steps}
        for _ in range(a.repeats):  # interleaved so machine load hits every step alike
            loads.append(run(LOAD, img))
            isal_loads.append(run(LOAD_ISAL, img))
            for (s, mm), c in steps:
                stages[(s, mm), c].append(run(STAGE, img, lab, Path(d) / "out.h5", s, c, w["lower"], w["upper"],
                                              w["mode"], mm))
        import nibabel as nib

        native = float(nib.load(str(img)).header.get_zooms()[0])
        imp = run(BASELINE_RSS)["rss_mb"]
    load_s = min(r["s"] for r in loads)
    load_rss = max(r["rss_mb"] for r in loads)
    print(f"config {a.config}: window {w['mode']} [{w['lower']}, {w['upper']}]; int16 volume {vol_mb:.0f} MiB; "
          f"best of {a.repeats}")
    print(f"nibabel load (image only):           {load_s:6.2f} s  peak RSS {load_rss:6.0f} MiB"
          f" (interpreter+nibabel {imp:.0f} MiB)")
    isal_s = min(r["s"] for r in isal_loads)
    print(f"the same load decompressed by isal: {isal_s:6.2f} s  (the stage reads .nii.gz this way)")
    for (s, mm), c in steps:
        rs = stages[(s, mm), c]
        stage_s = min(r["s"] for r in rs)
        stage_rss = max(r["rss_mb"] for r in rs)
        stage_imports = max(r["import_rss_mb"] for r in rs)
        path = (f"resampled {a.shape[0]}x{a.shape[1]} at {native:.3f} mm -> {mm} mm on {s}x{s}" if mm != "native"
                else f"no resampling ({a.shape[0]}x{a.shape[1]} at {native:.3f} mm, stored on {s}x{s})")
        print(f"window + HDF5 stage, {path}, image compression {c}{' (torch imported)' if rs[0]['torch'] else ''}:")
        print(f"  {stage_s:6.2f} s  peak RSS {stage_rss:6.0f} MiB (after imports {stage_imports:.0f} MiB); "
              f"HDF5 file {rs[-1]['h5_mb']:.1f} MiB")
        print(f"  time ratio stage / load: {stage_s / load_s:.2f}x (goal <= 2x); stage / isal load: "
              f"{stage_s / isal_s:.2f}x")
        print(f"  peak memory of the stage above its imports / int16 volume: "
              f"{(stage_rss - stage_imports) / vol_mb:.2f}x (goal <= 4x); whole process / volume: "
              f"{stage_rss / vol_mb:.2f}x")


if __name__ == "__main__":
    main()
