"""`snakemake -n` of a 131-case dataset (tiny placeholder NIfTI files in a sample sheet) with all four
experiments: how long building the DAG takes. The split is a checkpoint, so the per-case checks and the split
run first (`--until split`); the timed dry run then builds the whole DAG of every stage.
Usage: python bench/dag_131.py [--cases 131] [--repeats 3]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=131)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        img = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4))
        lab = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
        lines = ["case_id\timage\tlabel"]
        for i in range(a.cases):
            nib.save(img, str(d / f"volume-{i}.nii.gz"))
            nib.save(lab, str(d / f"segmentation-{i}.nii.gz"))
            lines.append(f"{i}\tvolume-{i}.nii.gz\tsegmentation-{i}.nii.gz")
        (d / "samples.tsv").write_text("\n".join(lines) + "\n")
        cfg = {"dataset": {"source": "samplesheet", "samplesheet": str(d / "samples.tsv")},
               "experiments": ["v1_3dcnn", "v2_unetpp_cca", "v3_convlstm", "v4_cascade"]}
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(d),
                        "--until", "split", "--cores", "2", "--quiet"], check=True, capture_output=True)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(d),
                                "-n", "--quiet", "rules"], capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            assert r.returncode == 0, r.stderr[-2000:]
        total = [ln for ln in r.stdout.splitlines() if ln.startswith("total")]
    print(f"{a.cases} cases, 4 experiments: {total[0] if total else '?'}")
    print(f"snakemake -n wall time (process start to DAG printed): best {min(times):.2f} s, "
          f"all {', '.join(f'{t:.2f}' for t in times)} (goal <= 5 s)")


if __name__ == "__main__":
    main()
