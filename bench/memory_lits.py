"""Peak memory of every stage on a LiTS-sized case (issue 13): check, preprocess, predict (V1, V2, V3, V4) and
evaluate on a synthetic 512 x 512 x 900 scan (int16 image, int16 label with a liver and tumour blobs,
0.78 x 0.78 x 1 mm), each stage in a fresh child process running the real stage function.

Printed per stage, as a Markdown table: the child's peak RSS (VmHWM) above a bare-imports baseline (a child that
imports the same modules and exits) divided by the int16 volume (goal <= 4x), and the whole process's VmHWM.
Slices are stored on a SIZE x SIZE grid at MM mm per pixel (``--grid``; default 512 at the scan's 0.78 mm; the
plan's auto rules give 640 at 0.804 mm for LiTS-like headers, bench/plan_table.py).  Models are untrained, built
with liverseg.models from the schema's default specs (train.make_spec: resnet18 UNet++ at the stored size,
B's 256 patches, V1's 32 x 128 patches); ``--light`` keeps every grid, input and patch size but uses a small
encoder and decoder (what takes CPU time; the volume-sized buffers, which are what memory is about, stay).
Evaluate compares the reference with itself shifted by two voxels (a realistic prediction; untrained models'
output is noise everywhere, the worst case for surface distances).

    python bench/memory_lits.py [--slices 900] [--light] [--grid 512:native] [--stages check preprocess ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPACING = (0.78, 0.78, 1.0)
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"
MODES = {"v1_3dcnn": "V1 3D", "model_a": "V2 2D (model A)", "v3_convlstm": "V3 ConvLSTM", "cascade": "V4 cascade"}
IMPORTS = {"check": "import liverseg.ingest", "preprocess": "import liverseg.preprocess",
           "predict": "import liverseg.predict", "evaluate": "import liverseg.evaluate"}

MAKE_CASE = """
import sys, numpy as np, nibabel as nib
n, z = 512, int(sys.argv[3])
aff = np.diag([-0.78, -0.78, 1.0, 1.0])
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:n, :n]
body = ((yy - 256) / 200.0) ** 2 + ((xx - 256) / 240.0) ** 2 <= 1
img = np.empty((n, n, z), np.int16)
lab = np.zeros((n, n, z), np.int16)
zz = np.arange(z)
for k in range(z):  # slice by slice: the generator's own memory stays small
    s = np.where(body, 40, -1000).astype(np.int16)
    s += rng.integers(-20, 20, size=(n, n), dtype=np.int16)
    img[:, :, k] = s
    t = (k - 0.55 * z) / (0.2 * z)  # liver: an ellipsoid over 40 % of the slices
    if abs(t) < 1:
        r = np.sqrt(1 - t * t)
        liver = ((yy - 300) / (90 * r)) ** 2 + ((xx - 180) / (110 * r)) ** 2 <= 1
        lab[:, :, k][liver] = 1
        img[:, :, k][liver] = 60
        for cy, cx, cz in ((290, 170, 0.5), (320, 210, 0.6)):
            tum = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 15 ** 2) & (abs(k - cz * z) < 0.02 * z + 3)
            lab[:, :, k][tum & liver] = 2
nib.save(nib.Nifti1Image(img, aff), sys.argv[1])
nib.save(nib.Nifti1Image(lab, aff), sys.argv[2])
shift = np.roll(lab, 2, axis=0).astype(np.uint8)  # "prediction" for evaluate: the reference moved by 2 voxels
nib.save(nib.Nifti1Image(shift, aff), sys.argv[4])
"""

MAKE_MODELS = """
import json, sys
from pathlib import Path
from liverseg import config as C, models as M
from liverseg.train import make_spec
size, mm, light, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4])
cfg = C.validate({})
grid = {"slice_size": size, "spacing_mm": mm, "context_mm_auto": 1.0}
for role in ("classifier", "model_a", "model_b", "v3_convlstm", "v1_3dcnn"):
    spec = make_spec(cfg, role, grid)
    if light:
        if spec["kind"] == "unet3d":
            spec["channels_3d"] = [4, 8]
        else:
            spec.update(encoder="timm-mobilenetv3_small_minimal_100", encoder_depth=3)
            if "decoder_channels" in spec:
                spec["decoder_channels"] = [8, 8, 8]
    if role == "classifier":
        spec["threshold"] = 0.5
    (out / role).mkdir(parents=True, exist_ok=True)
    M.save(M.build(spec).eval(), spec, out / role / "model.pt", out / role / "model.json")
    print(role, {k: spec.get(k) for k in ("encoder", "encoder_depth", "decoder_channels", "channels_3d", "input_size",
                                          "patch_size", "patch")}, flush=True)
"""

STAGES = {
    "check": """
from liverseg.ingest import check_case
s = check_case("b", sys.argv[1], sys.argv[3] + "/check.json", label_path=sys.argv[2])
assert s["ok"], s
""",
    "preprocess": """
from liverseg.preprocess import preprocess_case
preprocess_case("b", sys.argv[1], sys.argv[3] + "/case.h5", label_path=sys.argv[2], size=int(sys.argv[4]),
                spacing_mm=None if sys.argv[5] == "native" else float(sys.argv[5]))
""",
    "predict": """
import torch
from liverseg.predict import models_in, predict_case
torch.set_num_threads(2)
predict_case("b", sys.argv[3] + "/case.h5", models_in(sys.argv[3] + "/models", sys.argv[6]),
             sys.argv[3] + "/pred-" + sys.argv[6] + ".nii.gz", mode=sys.argv[6], device="cpu", tta="false",
             batch=int(sys.argv[8]))
""",
    "evaluate": """
from liverseg.evaluate import evaluate_case
evaluate_case("b", sys.argv[7], sys.argv[2], sys.argv[3] + "/eval.tsv")
""",
}


def child(code: str, *args) -> dict:
    wrapped = f"import sys, json, time\nsys.path.insert(0, {str(ROOT / 'workflow')!r})\nt = time.perf_counter()\n" + code + \
        f"\nprint(json.dumps({{'hwm_mb': {HWM}, 's': time.perf_counter() - t}}))\n"
    out = subprocess.run([sys.executable, "-c", wrapped, *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=900)
    ap.add_argument("--light", action="store_true", help="small encoders and decoders, every grid size kept")
    ap.add_argument("--grid", default="512:native", help="stored grid SIZE:MM (MM native = the scan's 0.78 mm)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary folder)")
    ap.add_argument("--batch", type=int, default=None, help="prediction batch (default: predict.batch_size)")
    a = ap.parse_args()
    if a.batch is None:
        sys.path.insert(0, str(ROOT / "workflow"))
        from liverseg.config import default

        a.batch = int(default("predict.batch_size"))
    size, mm = int(a.grid.split(":")[0]), a.grid.split(":")[1]
    vol_mb = 512 * 512 * a.slices * 2 / 2**20
    with tempfile.TemporaryDirectory(dir=a.workdir) as d:
        img, lab, pred = Path(d) / "volume-0.nii.gz", Path(d) / "segmentation-0.nii.gz", Path(d) / "shifted.nii.gz"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", MAKE_CASE, img, lab, str(a.slices), pred], check=True)
        print(f"case 512x512x{a.slices} written in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        model_mm = SPACING[0] if mm == "native" else float(mm)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT / 'workflow')!r})\n" + MAKE_MODELS,
                        str(size), str(model_mm), "1" if a.light else "0", str(Path(d) / "models")], check=True)
        base = {k: child(code)["hwm_mb"] for k, code in IMPORTS.items()}
        rows = []
        steps = [("check", "check", ""), ("preprocess", "preprocess", "")] + \
                [("predict", f"predict {MODES[m]}", m) for m in a.modes] + [("evaluate", "evaluate", "")]
        for stage, name, mode in steps:
            r = child(IMPORTS[stage] + "\n" + STAGES[stage], img, lab, d, size, mm, mode, pred, a.batch)
            rows.append((name, r["hwm_mb"] - base[stage], r["hwm_mb"], r["s"], base[stage]))
            print(f"{name}: {r['hwm_mb']:.0f} MiB ({r['s']:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n512 x 512 x {a.slices} int16 case ({vol_mb:.0f} MiB), stored grid {size} px at "
          f"{'0.78' if mm == 'native' else mm} mm, {'--light models (small encoder/decoder, LiTS grid sizes)' if a.light else 'default LiTS-sized models'}, "
          f"prediction batch {a.batch}; "
          f"python {sys.version.split()[0]}\n")
    print("| stage | peak RSS above imports | / int16 volume (goal <= 4x) | whole process VmHWM | / int16 volume | "
          "imports alone | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, above, whole, s, b in rows:
        print(f"| {name} | {above:.0f} MiB | **{above / vol_mb:.2f}x** | {whole:.0f} MiB | {whole / vol_mb:.2f}x | "
              f"{b:.0f} MiB | {s:.0f} |")


if __name__ == "__main__":
    main()
