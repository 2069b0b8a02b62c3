"""The README's pixel-scale table: what the plan's `auto` rules give, and each model's mm per pixel.

For the demo it plans, as the workflow does, from the headers of the training and validation cases of the phantom
`config.yaml` draws (its split; anatomy and scan geometry only, no voxels are drawn); for LiTS-like geometry from the `lits` preset's headers (0.55-1.0 mm pixels, FOV
300-500 mm: LiTS's published ranges, not LiTS itself, which is not available here).  Model input sizes come from
`config.yaml` for the demo and from the schema defaults (``input_size: null`` = the stored size) for LiTS.

    python bench/plan_table.py [--cases 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from liverseg import config as C  # noqa: E402
from liverseg.phantom import PhantomSpec, anatomy, scan_geometry  # noqa: E402
from liverseg.plan import make_plan  # noqa: E402
from liverseg.split import make_split  # noqa: E402


def headers(spec: PhantomSpec, seeds) -> list[dict]:
    out = []
    for s in seeds:
        rng_anat, rng_scan, _ = np.random.default_rng(s).spawn(3)
        a = anatomy(rng_anat, spec.max_tumours, spec.phase_weights, spec.arms_probability)
        g = scan_geometry(rng_scan, a, spec)
        out.append({"case": str(s), "ok": True, "canonical_spacing": [g.sp, g.sp, g.spz],
                    "canonical_shape": [g.n, g.n, g.nz]})
    return out


def row(name: str, plan: dict, cfg: dict) -> str:
    mm, n = plan["spacing_mm"], plan["size"]
    t = cfg["train"]

    def at(role):
        s = t[role]["input_size"] or n
        return f"{s} px: {mm * n / s:.2f} mm"

    b = min(t["model_b"]["patch_size"], n)
    return (f"| {name} | {plan['inplane_spacing_mm']['min']:.2f}-{plan['inplane_spacing_mm']['max']:.2f} mm |"
            f" {mm:.3g} mm, {n} px, {plan['fov_mm']:.0f} mm | {plan['context_mm_auto']:.3g} mm |"
            f" {at('classifier')} | {at('model_a')} | {b} px patches at {mm:.3g} mm ({b * mm:.0f} mm) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    a = ap.parse_args()
    demo_cfg = C.load(ROOT / "config.yaml")
    ph = demo_cfg["dataset"]["phantom"]
    demo = PhantomSpec.from_config(ph)
    n_demo = ph["n_cases"]
    lits_cfg = C.validate({})
    lits = PhantomSpec(preset="lits", size=None, slices=None)
    print("| data | scans' in-plane spacing | stored grid (plan) | context_mm | classifier | model A | model B |")
    print("|---|---|---|---|---|---|---|")
    sp = demo_cfg["split"]
    split = make_split([str(i) for i in range(n_demo)], seed=sp["seed"], test_fraction=sp["test_fraction"],
                       val_fraction=sp["val_fraction"], folds=sp["folds"], fold=sp["fold"])
    planned = split["train"] + split["val"]
    demo_headers = [{**h, "case": str(i)} for i, h in enumerate(headers(demo, [ph["seed"] * 1000 + i for i in range(n_demo)]))]
    print(row(f"demo (`config.yaml`: {len(planned)} training + validation phantom cases)",
              make_plan(demo_headers, planned), demo_cfg))
    seeds = list(range(a.cases))
    print(row(f"LiTS-like (`phantom.preset: lits`, {a.cases} headers; schema defaults)",
              make_plan(headers(lits, seeds), [str(s) for s in seeds]), lits_cfg))


if __name__ == "__main__":
    main()
