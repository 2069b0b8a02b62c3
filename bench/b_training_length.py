"""Model B's training length against V4's liver and tumour Dice, everything else held fixed.

Takes one trained seed of bench/cascade_vs_v2.py (``--base``: its seed folder, whose results/ hold the preprocessed
cases, split, classifier, A and B), trains model B again for each variant (every variant, the first one included,
through the same code path here), on the same training and validation cases with the same classifier and A, and
scores V4 on the same unseen phantom cases (dataset seed 7, as cascade_vs_v2.py).  Each later variant is paired
against the first (the control): mean difference per case with a bootstrap 95% interval over cases.  One
training run per variant: the interval covers the test cases, not the spread between training runs.

    python bench/b_training_length.py --base /tmp/cascade_bench/seed0 --cases 20 \
        --variants '{"b_512": {"samples_per_epoch": 512}, "b_1536": {"samples_per_epoch": 1536}}'
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
sys.path.insert(0, str(ROOT / "bench"))

import cascade_vs_v2 as cv  # noqa: E402
from liverseg import config as cfgmod  # noqa: E402
from liverseg.train import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="a seed folder of bench/cascade_vs_v2.py (holds results/)")
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--variants", required=True,
                    help='JSON: {"name": {model_b setting, "train.<key>[.<key>]" or "slices.<key>": value}}')
    a = ap.parse_args()
    base = Path(a.base)
    res = base / "results"
    cfg = cfgmod.load(str(base / "config.yaml"))
    split = json.loads((res / "split" / "split.json").read_text())
    h5 = lambda c: str(res / "preprocess" / f"{c}.h5")  # noqa: E731
    cases = cv.make_test_cases(base.parent / "test_cases", a.cases, cfg, res / "train")
    ref = None
    for name, over in json.loads(a.variants).items():
        t = time.time()
        c = json.loads(json.dumps(cfg))
        for k, v in over.items():
            # "train.<key>[.<key>]" / "slices.<key>": keys shared by every role (here only B retrains); slices.size,
            # spacing_mm and fov_mm change nothing here, since the grid is that of the base's preprocessed cases
            path = k.split(".") if k.split(".")[0] in ("train", "slices") else ["train", "model_b", k]
            node = c
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = v
        c = cfgmod.validate(c)
        out = base / "b_length" / name / "train"
        for r in ("classifier", "model_a"):  # the base's own classifier and A
            (out / r).mkdir(parents=True, exist_ok=True)
            for f in ("model.pt", "model.json"):
                if not (out / r / f).exists():
                    (out / r / f).symlink_to((res / "train" / r / f).resolve())
        (out / "model_b").mkdir(parents=True, exist_ok=True)
        outputs = {"model": out / "model_b" / "model.pt", "spec": out / "model_b" / "model.json",
                   "log": out / "model_b" / "log.csv", "curves": out / "model_b" / "curves.png"}
        needs = {r: str(res / "train" / r / "model.pt") for r in ("classifier", "model_a")}
        train("model_b", [h5(x) for x in split["train"]], [h5(x) for x in split["val"]], c, outputs,
              base / "b_length" / name / "ck", needs=needs, threads=2, device="cpu", workers=0)
        rows = cv.run_variant(out, cases, base / "b_length" / name / "pred", "cascade")
        print(f"{name} {over}: {cv.fmt(cv.summary(rows))} ({time.time() - t:.0f} s)", flush=True)
        if ref is None:
            ref, control = rows, name
            continue
        for cls in ("liver", "tumour"):
            m, lo, hi = cv.paired(rows, ref, cls)
            print(f"  {name} - {control}, {cls} Dice per {'tumour ' if cls == 'tumour' else ''}case: {m:+.4f} "
                  f"[95% CI {lo:+.4f}, {hi:+.4f}]", flush=True)


if __name__ == "__main__":
    main()
