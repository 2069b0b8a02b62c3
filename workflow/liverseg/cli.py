"""`liverseg <stage> ...`: one subcommand per pipeline stage.  Parsing only; the work lives in the stage modules.

Every Snakemake rule calls one of these, so each stage can be rerun by hand with the same arguments.
Expected bad input (CaseError) prints one line naming the case and exits 1; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from liverseg.errors import CaseError, ConfigError, ModelFileError
from liverseg.roles import GATES, MODES, ROLES

log = logging.getLogger("liverseg")


def _cmd_phantom(a):
    from liverseg.phantom import PhantomSpec, write_case

    spec = PhantomSpec(size=a.size, slices=a.slices, max_tumours=a.max_tumours)
    write_case(a.seed, a.image, a.label, spec)
    log.info("phantom seed %d -> %s, %s", a.seed, a.image, a.label)


def _cmd_cases(a):
    from liverseg import config as cfgmod
    from liverseg.ingest import discover, write_case_table

    cfg = cfgmod.load(a.config)
    write_case_table(discover(cfg), a.out)


def _cmd_preprocess(a):
    from liverseg.preprocess import preprocess_case

    s = preprocess_case(
        a.case, a.image, a.out, label_path=a.label, lower=a.lower, upper=a.upper, mode=a.mode, size=a.size,
        affine_tolerance=a.affine_tolerance, compression=a.compression,
    )
    print(json.dumps(s))


def _cmd_check(a):
    from liverseg.preprocess import check_case

    status = check_case(a.case, a.image, a.out, label_path=a.label, affine_tolerance=a.affine_tolerance)
    if not status["ok"]:
        # The verdict is recorded; the job itself succeeds so that the other cases go on.
        print(f"liverseg check: error: {status['error']}", file=sys.stderr)


def _cmd_split(a):
    from liverseg.ingest import read_case_table
    from liverseg.split import make_split, write_split

    rows = read_case_table(a.cases)
    labelled = [r["case_id"] for r in rows if r["status"] == "labelled"]
    unlabelled = [r["case_id"] for r in rows if r["status"] == "predict-only"]
    failed = {}
    if a.checks:
        from pathlib import Path

        for cid in labelled + unlabelled:
            status = json.loads((Path(a.checks) / f"{cid}.json").read_text())
            if not status["ok"]:
                failed[cid] = status["error"]
    split = make_split(labelled, unlabelled, a.seed, a.test_fraction, a.val_fraction, a.folds, a.fold, failed=failed)
    for cid, err in failed.items():
        log.warning("left out: %s", err)
    write_split(split, a.out)
    log.info("split: %d train, %d val, %d test, %d predict-only", *(len(split[k]) for k in ("train", "val", "test", "predict")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="liverseg", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("phantom", help="write one synthetic CT case (volume + segmentation NIfTI)")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--slices", type=int, default=48)
    s.add_argument("--max-tumours", type=int, default=5)
    s.add_argument("image")
    s.add_argument("label")
    s.set_defaults(func=_cmd_phantom)

    s = sub.add_parser("cases", help="list the dataset's cases (and rejected ones) as a TSV")
    s.add_argument("--config", required=True)
    s.add_argument("out")
    s.set_defaults(func=_cmd_cases)

    s = sub.add_parser("preprocess", help="validate one case, window HU, resize, write slices to HDF5")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--label")
    s.add_argument("--lower", type=float, default=-150.0)
    s.add_argument("--upper", type=float, default=250.0)
    s.add_argument("--mode", choices=["fixed", "study_v2"], default="fixed")
    s.add_argument("--size", type=int, default=128)
    s.add_argument("--affine-tolerance", type=float, default=1e-3)
    s.add_argument("--compression", choices=["none", "lzf", "gzip"], default="none")
    s.add_argument("out")
    s.set_defaults(func=_cmd_preprocess)

    s = sub.add_parser("check", help="validate one case and write its verdict as JSON (the workflow's first look)")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--label")
    s.add_argument("--affine-tolerance", type=float, default=1e-3)
    s.add_argument("out")
    s.set_defaults(func=_cmd_check)

    s = sub.add_parser("split", help="case-level train/val/test split (k-fold aware) from a case table")
    s.add_argument("--cases", required=True, help="TSV written by `liverseg cases`")
    s.add_argument("--checks", help="folder of <case>.json verdicts from `liverseg check`; failed cases are left out")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-fraction", type=float, default=0.25)
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument("--folds", type=int, default=1)
    s.add_argument("--fold", type=int, default=0)
    s.add_argument("out")
    s.set_defaults(func=_cmd_split)

    s = sub.add_parser("train", help="train the slice classifier, model A or model B")
    s.add_argument("--role", required=True, choices=list(ROLES))
    s.add_argument("--needs", action="append", default=[], metavar="ROLE=MODEL_PT",
                   help="a trained model this role depends on, repeated (model_b: classifier and model_a)")
    s.add_argument("--split", help="split.json written by `liverseg split`")
    s.add_argument("--split-json", help="the train/val case lists as JSON (what the Snakemake rule passes)")
    s.add_argument("--h5-dir", required=True, help="folder with <case>.h5 files")
    s.add_argument("--config", help="config YAML (defaults from the schema)")
    s.add_argument("--config-json", help="resolved config as JSON (what the Snakemake rule passes)")
    s.add_argument("--checkpoint-dir", required=True, help="per-epoch checkpoints; a rerun resumes from here")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("out_dir")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("predict-case", help="gated inference for one preprocessed case (HDF5) -> label NIfTI")
    s.add_argument("--case", required=True)
    s.add_argument("--h5", required=True)
    s.add_argument("--models", required=True, help="folder with classifier/, model_a/, model_b/")
    s.add_argument("--mode", choices=list(MODES), default="cascade")
    s.add_argument("--scores", help="TSV of per-slice classifier scores and gating")
    s.add_argument("--device", default="auto")
    s.add_argument("--tta", choices=["auto", "true", "false"], default="auto",
                   help="test-time augmentation (auto: as chosen on the validation cases)")
    s.add_argument("--gate", choices=["auto", *GATES], default="auto", help="V4 gate (auto: as chosen on validation)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("out")
    s.set_defaults(func=_cmd_predict_case)

    s = sub.add_parser("postprocess", help="largest 3D liver component, tumour inside liver only")
    s.add_argument("--case", required=True)
    s.add_argument("--connectivity", type=int, choices=[6, 18, 26], default=26)
    s.add_argument("--min-lesion-mm3", type=float, default=0.0)
    s.add_argument("--fill-holes", action="store_true")
    s.add_argument("input")
    s.add_argument("out")
    s.set_defaults(func=_cmd_postprocess)

    s = sub.add_parser("evaluate-case", help="LiTS metrics of one prediction against its reference label")
    s.add_argument("--case", required=True)
    s.add_argument("--pred", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("out")
    s.set_defaults(func=_cmd_evaluate_case)

    s = sub.add_parser("aggregate", help="per-case TSVs -> per_case.tsv + summary.json")
    s.add_argument("--out-tsv", required=True)
    s.add_argument("--out-json", required=True)
    s.add_argument("--extra-json", help="JSON merged into the summary (e.g. skipped cases)")
    s.add_argument("tsvs", nargs="*")
    s.set_defaults(func=_cmd_aggregate)

    s = sub.add_parser("predict", help="segment new scans (NIfTI file, DICOM series folder, or a folder of them)")
    s.add_argument("--models", required=True, help="folder with classifier/, model_a/, model_b/ (e.g. results/train)")
    s.add_argument("--mode", choices=["cascade", "model_a"], default="cascade")
    s.add_argument("--device", default="auto")
    s.add_argument("--tta", choices=["auto", "true", "false"], default="auto",
                   help="test-time augmentation (auto: as chosen on the validation cases)")
    s.add_argument("--gate", choices=["auto", *GATES], default="auto", help="V4 gate (auto: as chosen on validation)")
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--no-postprocess", action="store_true", help="skip the largest-component step")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    s.add_argument("input", help="NIfTI file, DICOM series folder, or folder of NIfTI files / DICOM folders")
    s.add_argument("output", help="output .nii.gz (one scan) or folder (several)")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("kaggle", help="Kaggle aio2025liverseg submission.csv (id,rle) from label NIfTI files")
    s.add_argument("--out", required=True)
    s.add_argument("predictions", nargs="+", help="CASE=PATH pairs")
    s.set_defaults(func=_cmd_kaggle)

    s = sub.add_parser("overlay", help="PNG: CT | reference | prediction contours at three slices")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--pred", required=True)
    s.add_argument("--title", default="")
    s.add_argument("out")
    s.set_defaults(func=_cmd_overlay)

    s = sub.add_parser("summarize", help="experiment comparison table (markdown) and per-case Dice plot")
    s.add_argument("--experiments", nargs="+", required=True, help="experiments that were run")
    s.add_argument("--metrics-dir", required=True, help="folder with <experiment>/post/summary.json")
    s.add_argument("--benchmarks-dir", required=True, help="folder with <experiment>/<case>.tsv timing files")
    s.add_argument("--out-md", required=True)
    s.add_argument("--out-plot", required=True)
    s.set_defaults(func=_cmd_summarize)
    return p


def _cmd_predict(a):
    from pathlib import Path

    from liverseg.dicom import is_dicom_folder
    from liverseg.predict import predict_many, predict_scan

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    kw = {"mode": a.mode, "device": a.device, "tta": a.tta, "batch": a.batch, "postprocess": not a.no_postprocess,
          "gate": a.gate}
    src = Path(a.input)
    if src.is_dir() and not is_dicom_folder(src):
        for s in predict_many(src, a.output, a.models, **kw):
            print(json.dumps(s))
    else:
        print(json.dumps(predict_scan(src, a.output, a.models, **kw)))


def _cmd_kaggle(a):
    from liverseg.kaggle import write_submission

    pairs = dict(p.split("=", 1) for p in a.predictions)
    n = write_submission(pairs, a.out)
    log.info("%d rows written to %s", n, a.out)


def _cmd_overlay(a):
    from liverseg.report import overlay_case

    overlay_case(a.case, a.image, a.ref, a.pred, a.out, title=a.title)


def _cmd_summarize(a):
    from pathlib import Path

    from liverseg.report import dice_plot, inference_seconds, load_summaries, summary_table

    mdir, bdir = Path(a.metrics_dir), Path(a.benchmarks_dir)
    summaries = load_summaries({e: mdir / e / "post" / "summary.json" for e in a.experiments})
    cases = {e: summaries[e]["cases"] for e in a.experiments}
    seconds = {e: inference_seconds([str(bdir / e / f"{c}.tsv") for c in cases[e] if (bdir / e / f"{c}.tsv").exists()])
               for e in a.experiments}
    skipped = sorted({c for e in a.experiments for c in summaries[e].get("predict_only_skipped", [])})
    raw = load_summaries({e: mdir / e / "raw" / "summary.json" for e in a.experiments})
    failed = {}
    for e in a.experiments:
        failed.update(summaries[e].get("failed_cases", {}))
        failed.update({c: f"rejected: {r}" for c, r in summaries[e].get("rejected_cases", {}).items()})
    print(summary_table(summaries, seconds, a.experiments, skipped, a.out_md, raw=raw, failed=failed))
    dice_plot({e: str(mdir / e / "post" / "per_case.tsv") for e in a.experiments}, a.out_plot)


def _cmd_predict_case(a):
    import torch

    from liverseg.predict import predict_case

    torch.set_num_threads(max(1, a.threads))
    s = predict_case(a.case, a.h5, a.models, a.out, a.scores, a.mode, a.device, a.tta, a.batch, gate=a.gate)
    print(json.dumps(s))


def _cmd_postprocess(a):
    from liverseg.postprocess import postprocess_case

    print(json.dumps(postprocess_case(a.case, a.input, a.out, a.connectivity, a.min_lesion_mm3, a.fill_holes)))


def _cmd_evaluate_case(a):
    from liverseg.evaluate import evaluate_case

    evaluate_case(a.case, a.pred, a.ref, a.out)


def _cmd_aggregate(a):
    from liverseg.evaluate import aggregate_files

    extra = json.loads(a.extra_json) if a.extra_json else None
    aggregate_files(a.tsvs, a.out_tsv, a.out_json, extra)


def _load_config(a):
    from liverseg import config as cfgmod

    if getattr(a, "config_json", None):
        return cfgmod.validate(json.loads(a.config_json))
    return cfgmod.load(a.config)


def _cmd_train(a):
    from pathlib import Path

    from liverseg.split import read_split
    from liverseg.train import train

    cfg = _load_config(a)
    if not (a.split or a.split_json):
        raise ConfigError("give --split FILE or --split-json JSON")
    split = json.loads(a.split_json) if a.split_json else read_split(a.split)
    paths = {c: str(Path(a.h5_dir) / f"{c}.h5") for c in split["train"] + split["val"]}
    missing = [p for p in paths.values() if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"missing preprocessed case file(s): {', '.join(missing[:5])}")
    needs = dict(n.split("=", 1) for n in a.needs)
    train(a.role, paths, split, cfg, a.out_dir, a.checkpoint_dir, threads=a.threads, needs=needs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except CaseError as exc:
        print(f"liverseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError, ModelFileError, ValueError) as exc:
        print(f"liverseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
