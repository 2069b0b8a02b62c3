"""V4 cascade against V2 (model A + largest component) on held-out phantom cases, over training seeds.

For each training seed: train the classifier and models A and B with the project's config.yaml (only
``train.seed`` changes) by running the workflow's own `train` rule in a scratch folder; then segment N phantom
test cases drawn from phantom seeds that no training or validation case used (dataset seed 7: case seeds
7000..), post-process (largest component) and score on each case's own grid.

Prints per seed and pooled over seeds: liver and tumour Dice (global = pooled over every test voxel, and per
tumour-bearing case), LiTS lesion recall (pooled), and the paired V4 - V2 difference of tumour Dice per
tumour-bearing case with a bootstrap 95% interval (cases resampled, 2000 draws).  Ablations on the same models:
gate route/suppress and TTA on/off; with --shift-ablation also B retrained with oracle boxes (box_shift 0).

Usage: python bench/cascade_vs_v2.py [--seeds 0 1] [--cases 40] [--out /tmp/cascade_bench] [--shift-ablation]
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from liverseg.io import load_nifti, read_labels  # noqa: E402
from liverseg.metrics import lesion_detection  # noqa: E402
from liverseg.phantom import PhantomSpec, write_case  # noqa: E402
from liverseg.postprocess import postprocess_case  # noqa: E402
from liverseg.predict import models_in, predict_case  # noqa: E402
from liverseg.preprocess import preprocess_case  # noqa: E402

TEST_DATASET_SEED = 7  # the demo's phantom uses dataset seed 0 (case seeds 0..n-1)


def train_models(wd: Path, cfg: dict, seed: int, extra: dict | None = None) -> Path:
    wd.mkdir(parents=True, exist_ok=True)
    c = json.loads(json.dumps(cfg))
    c["train"]["seed"] = seed
    for k, v in (extra or {}).items():
        c["train"]["model_b"][k] = v
    c["results"] = str(wd / "results")
    (wd / "config.yaml").write_text(yaml.safe_dump(c))
    targets = [f"{wd}/results/train/{r}/model.pt" for r in ("classifier", "model_a", "model_b")]
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "snakemake", *targets, "-s", str(ROOT / "Snakefile"), "--directory",
                        str(wd), "--configfile", str(wd / "config.yaml"), "--cores", "2"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"training failed in {wd}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    print(f"# trained seed {seed} {extra or ''} in {time.time() - t:.0f} s", flush=True)
    return wd / "results" / "train"


def make_test_cases(out: Path, n: int, cfg: dict, models: Path | None = None) -> list[tuple[str, Path, Path, Path]]:
    """The unseen phantom cases; with ``models``, preprocessed on the grid those models were trained on (their
    plan's size and mm per pixel, from model_a/model.json), as `liverseg predict` does for a new scan."""
    out.mkdir(parents=True, exist_ok=True)
    ph = cfg["dataset"]["phantom"]
    spec = PhantomSpec.from_config(ph)
    grid = json.loads((models / "model_a" / "model.json").read_text()) if models else None
    sub = out / (f"{grid['slice_size']}px_{grid['spacing_mm']}mm" if grid else "nifti")
    sub.mkdir(exist_ok=True)
    cases = []
    for i in range(n):
        seed = TEST_DATASET_SEED * 1000 + i
        img, lab, h5 = out / f"volume-{seed}.nii.gz", out / f"segmentation-{seed}.nii.gz", sub / f"{seed}.h5"
        if not img.exists():
            write_case(seed, img, lab, spec)
        if grid and not h5.exists():
            w = cfg["window"]
            preprocess_case(str(seed), img, h5, label_path=lab, lower=w["lower"], upper=w["upper"], mode=w["mode"],
                            size=int(grid["slice_size"]), spacing_mm=grid["spacing_mm"])
        cases.append((str(seed), img, lab, h5))
    return cases


def score(pred_path, lab_path):
    pred, ref = read_labels(load_nifti(pred_path, "p")), read_labels(load_nifti(lab_path, "r"))
    row = {}
    for cls, p, r in (("liver", pred >= 1, ref >= 1), ("tumour", pred == 2, ref == 2)):
        inter, np_, nr = int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))
        row[cls] = (inter, np_, nr)
    row["lesions"] = lesion_detection(pred == 2, ref == 2)
    return row


def run_variant(models: Path, cases, out: Path, mode: str, gate="auto", tta="auto") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for case, _, lab, h5 in cases:
        raw, post = out / f"{case}_raw.nii.gz", out / f"{case}.nii.gz"
        predict_case(case, h5, models_in(models, mode), raw, mode=mode, device="cpu", tta=tta, gate=gate)
        postprocess_case(case, raw, post)
        rows[case] = score(post, lab)
    return rows


def dice(counts):
    inter, p, r = counts
    return float("nan") if p + r == 0 else 2 * inter / (p + r)


def summary(rows: dict) -> dict:
    tot = {c: np.sum([r[c] for r in rows.values()], axis=0) for c in ("liver", "tumour")}
    tum_cases = [k for k, r in rows.items() if r["tumour"][2] > 0]
    det = sum(r["lesions"]["detected"] for r in rows.values())
    ref = sum(r["lesions"]["ref_lesions"] for r in rows.values())
    return {
        "liver_dice_global": dice(tot["liver"]),
        "liver_dice_per_case": float(np.mean([dice(r["liver"]) for r in rows.values()])),
        "tumour_dice_global": dice(tot["tumour"]),
        "tumour_dice_per_tumour_case": float(np.mean([dice(rows[k]["tumour"]) for k in tum_cases])),
        "lesion_recall": det / ref if ref else float("nan"),
        "n_cases": len(rows), "n_tumour_cases": len(tum_cases), "ref_lesions": ref,
    }


def paired(a: dict, b: dict, cls="tumour", rng=np.random.default_rng(0)):
    """Mean per-case difference a - b over cases with reference tumour (liver: all cases), bootstrap 95% CI."""
    keys = [k for k in a if (cls == "liver" or a[k]["tumour"][2] > 0)]
    d = np.array([dice(a[k][cls]) - dice(b[k][cls]) for k in keys])
    boots = [rng.choice(d, len(d)).mean() for _ in range(2000)]
    return float(d.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def fmt(s):
    return (f"liver Dice global {s['liver_dice_global']:.4f}, per case {s['liver_dice_per_case']:.4f} | "
            f"tumour Dice global {s['tumour_dice_global']:.4f}, per tumour case {s['tumour_dice_per_tumour_case']:.4f}"
            f" | lesion recall {s['lesion_recall']:.3f} ({s['ref_lesions']} lesions, {s['n_tumour_cases']}/"
            f"{s['n_cases']} cases with tumour)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--out", default="/tmp/cascade_bench")
    ap.add_argument("--config", default=str(ROOT / "config.yaml"))
    ap.add_argument("--shift-ablation", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    from liverseg import config as cfgmod

    cfg = cfgmod.load(a.config)
    t0 = time.time()
    cases = make_test_cases(out / "test_cases", a.cases, cfg)
    print(f"# {len(cases)} test cases (phantom seeds {TEST_DATASET_SEED * 1000}..{TEST_DATASET_SEED * 1000 + len(cases) - 1},"
          " none used in training or validation)", flush=True)
    variants = {"V2 (model A + CCA)": ("model_a", "auto", "auto"), "V4 cascade (auto: chosen on validation)":
                ("cascade", "auto", "auto"), "V4 gate=route tta=off": ("cascade", "route", "false"),
                "V4 gate=suppress tta=off": ("cascade", "suppress", "false"),
                "V4 gate=route tta=on": ("cascade", "route", "true"), "V2 tta=on": ("model_a", "auto", "true")}
    pooled = {v: {} for v in variants}
    for seed in a.seeds:
        models = train_models(out / f"seed{seed}", cfg, seed)
        cases = make_test_cases(out / "test_cases", a.cases, cfg, models)
        sel = {r: json.loads((models / r / "model.json").read_text()).get("selection", {}) for r in ("model_a", "model_b")}
        print(f"## training seed {seed}: chosen on validation: A tta={sel['model_a'].get('tta')}, "
              f"B gate={sel['model_b'].get('gate')} tta={sel['model_b'].get('tta')}", flush=True)
        per = {}
        for name, (mode, gate, tta) in variants.items():
            per[name] = run_variant(models, cases, out / f"seed{seed}" / "pred" / name.split()[0] / f"{gate}_{tta}",
                                    mode, gate, tta)
            pooled[name].update({f"{seed}:{k}": v for k, v in per[name].items()})
            print(f"seed {seed} {name}: {fmt(summary(per[name]))}", flush=True)
        v4, v2 = per["V4 cascade (auto: chosen on validation)"], per["V2 (model A + CCA)"]
        for cls in ("tumour", "liver"):
            m, lo, hi = paired(v4, v2, cls)
            print(f"seed {seed} V4 - V2 {cls} Dice per {'tumour ' if cls == 'tumour' else ''}case: {m:+.4f} "
                  f"[95% CI {lo:+.4f}, {hi:+.4f}]", flush=True)
        if a.shift_ablation:
            m0 = train_models(out / f"seed{seed}_oracle", cfg, seed, {"box_shift": 0})
            rows = run_variant(m0, make_test_cases(out / "test_cases", a.cases, cfg, m0), out / f"seed{seed}_oracle" / "pred", "cascade")
            print(f"seed {seed} V4 with B trained on oracle boxes (box_shift 0): {fmt(summary(rows))}", flush=True)
            m, lo, hi = paired(v4, rows, "tumour")
            print(f"seed {seed} shifted - oracle boxes, tumour Dice per tumour case: {m:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    print(f"## pooled over training seeds {a.seeds} ({a.cases} test cases each)")
    for name in variants:
        print(f"{name}: {fmt(summary(pooled[name]))}")
    v4, v2 = pooled["V4 cascade (auto: chosen on validation)"], pooled["V2 (model A + CCA)"]
    for cls in ("tumour", "liver"):
        m, lo, hi = paired(v4, v2, cls)
        print(f"V4 - V2 {cls} Dice per {'tumour ' if cls == 'tumour' else ''}case (seed x case pairs): {m:+.4f} "
              f"[95% CI {lo:+.4f}, {hi:+.4f}]")
    print(f"# total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
