"""`liverseg <stage> ...`: one subcommand per pipeline stage.  Parsing only: each command calls one function of
its stage module.

Every Snakemake rule calls one of these with exact file paths, so each stage can be rerun by hand with the same
arguments.  Option defaults come from the config schema (liverseg.config.default), the only place defaults live.
Expected bad input (a bad case, config value or model file) prints one line and exits 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from liverseg.config import default as D
from liverseg.errors import CaseError, ConfigError, ModelFileError
from liverseg.roles import GATES, MODES, ROLES

log = logging.getLogger("liverseg")


def _pairs(values: list[str], what: str) -> list[tuple[str, str]]:
    """["KEY=PATH", ...] -> [(KEY, PATH), ...]; a malformed entry is a one-line error."""
    out = []
    for v in values or []:
        key, sep, path = v.partition("=")
        if not sep or not key or not path:
            raise ConfigError(f"expected {what}=FILE, got {v!r}")
        out.append((key, path))
    return out


def _grouped(values: list[str], what: str, choices=None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, path in _pairs(values, what):
        if choices is not None and key not in choices:
            raise ConfigError(f"unknown {what} {key!r} in {key}={path}; choose from {sorted(choices)}")
        out.setdefault(key, []).append(path)
    return out


def _config_json(text: str) -> dict:
    from liverseg import config as cfgmod

    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--config-json is not valid JSON: {exc}") from None
    return cfgmod.validate(cfg)


def _cmd_phantom(a):
    from liverseg.phantom import PhantomSpec, write_case

    auto = [None if v == "auto" else int(v) for v in (a.size, a.slices)]
    write_case(a.seed, a.image, a.label, PhantomSpec(preset=a.preset, size=auto[0], slices=auto[1],
                                                     max_tumours=a.max_tumours))


def _cmd_show_config(a):
    from liverseg import config as cfgmod

    cfg = cfgmod.load(a.config)
    print(json.dumps(cfgmod.training_view(cfg, a.training_view) if a.training_view else cfg, indent=2))


def _cmd_cases(a):
    from liverseg.ingest import write_dataset_table

    write_dataset_table(_config_json(a.config_json), a.out)


def _cmd_check(a):
    from liverseg.ingest import check_case_isolated

    status = check_case_isolated(a.case, a.image, a.out, label_path=a.label, affine_tolerance=a.affine_tolerance,
                                 max_memory_mb=a.max_memory_mb)
    if not status["ok"]:
        # The verdict is recorded; the job itself succeeds so that the other cases go on.
        print(f"liverseg check: error: {status['error']}", file=sys.stderr)


def _cmd_preprocess(a):
    from liverseg.plan import read_plan
    from liverseg.preprocess import preprocess_case

    if a.plan:
        grid = read_plan(a.plan)
    elif a.size:
        grid = {"size": a.size, "spacing_mm": a.spacing_mm}
    else:
        raise ConfigError("preprocess needs --plan PLAN_JSON (`liverseg plan`) or --size N [--spacing-mm MM]")
    print(json.dumps(preprocess_case(
        a.case, a.image, a.out, label_path=a.label, lower=a.lower, upper=a.upper, mode=a.mode, size=grid["size"],
        spacing_mm=grid["spacing_mm"], affine_tolerance=a.affine_tolerance, compression=a.compression)))


def _cmd_plan(a):
    from liverseg.plan import write_plan

    print(json.dumps(write_plan(a.split, a.checks, a.out, _auto(a.spacing_mm), _auto(a.size, int),
                                _auto(a.fov_mm), cases_tsv=a.cases)))


def _auto(value, kind=float):
    return value if value == "auto" else kind(value)


def _cmd_split(a):
    from liverseg.split import split_from_checks

    split_from_checks(a.cases, a.checks, a.out, a.seed, a.test_fraction, a.val_fraction, a.folds, a.fold)


def _cmd_train(a):
    from liverseg.train import train

    needs = {r: p[-1] for r, p in _grouped(a.needs, "role", ROLES).items()}
    outputs = {"model": a.out_model, "spec": a.out_spec, "log": a.out_log, "curves": a.out_curves}
    train(a.role, a.train, a.val, _config_json(a.config_json), outputs, a.checkpoint_dir, threads=a.threads,
          needs=needs, device=a.device, workers=a.workers)


def _cmd_predict_case(a):
    from liverseg.ensemble import read_threshold
    from liverseg.predict import predict_case

    _threads(a.threads)
    thr = read_threshold(a.classifier_threshold_file) if a.classifier_threshold_file else None
    print(json.dumps(predict_case(a.case, a.h5, _grouped(a.model, "role", ROLES), a.out, a.scores, a.mode,
                                  a.device, a.tta, a.batch, gate=a.gate, classifier_threshold=thr,
                                  probabilities_path=a.probabilities, uncertainty_path=a.uncertainty)))


def _cmd_ensemble_threshold(a):
    from liverseg.ensemble import ensemble_threshold

    _threads(a.threads)
    val = _grouped(a.val, "fold")
    if sorted(val, key=int) != [str(f) for f in range(len(a.model))]:  # by number: fold 10 after fold 9
        raise ConfigError(f"--val needs FOLD=H5 for folds 0..{len(a.model) - 1} (one --model per fold), got "
                          f"{sorted(val, key=int)}")
    print(json.dumps(ensemble_threshold(a.model, [val[str(f)] for f in range(len(a.model))], a.out,
                                        a.min_sensitivity, a.device)))


def _cmd_postprocess(a):
    from liverseg.postprocess import postprocess_case

    print(json.dumps(postprocess_case(a.case, a.input, a.out, a.connectivity, a.min_lesion_mm3, a.fill_holes)))


def _cmd_evaluate_case(a):
    from liverseg.evaluate import evaluate_case

    evaluate_case(a.case, a.pred, a.ref, a.out, affine_tolerance=a.affine_tolerance)


def _cmd_aggregate(a):
    from liverseg.evaluate import aggregate_files

    aggregate_files(a.tsvs, a.out_tsv, a.out_json, json.loads(a.extra_json) if a.extra_json else None)


def _cmd_predict(a):
    from liverseg.predict import predict_path

    _threads(a.threads)
    for s in predict_path(a.input, a.output, a.models, mode=a.mode, device=a.device, tta=a.tta, batch=a.batch,
                          postprocess=not a.no_postprocess, gate=a.gate, output_format=a.output_format,
                          statistics=a.statistics, series_uid=a.series_uid, probabilities=a.probabilities,
                          uncertainty=a.uncertainty):
        s.pop("statistics", None)  # in its own file; stdout keeps one short line per scan
        print(json.dumps(s))


def _cmd_statistics(a):
    from liverseg.statistics import case_statistics, write_json

    stats = case_statistics(a.case, a.image, a.pred, _grouped(a.model, "role", ROLES))
    if a.experiment:
        stats = {"experiment": a.experiment, **stats}
    write_json(stats, a.out)


def _cmd_statistics_table(a):
    from liverseg.statistics import collect

    collect(a.jsons, a.out)


def _cmd_dicom_seg(a):
    from liverseg.dicomseg import write_seg
    from liverseg.statistics import model_versions

    print(json.dumps(write_seg(a.case, a.pred, a.series, a.out, series_uid=a.series_uid,
                               model_versions=model_versions(_grouped(a.model, "role", ROLES)))))


def _cmd_kaggle(a):
    from liverseg.kaggle import write_submission

    write_submission(dict(_pairs(a.predictions, "CASE")), a.out, sample=a.sample)


def _cmd_overlay(a):
    from liverseg.report import overlay_case

    overlay_case(a.case, a.image, a.ref, a.pred, a.h5, a.out, title=a.title)


def _cmd_summarize(a):
    from liverseg.report import summarize

    print(summarize(a.summaries, _grouped(a.benchmark, "experiment"), a.out_md, a.out_plot))


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="liverseg", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = p.add_subparsers(dest="command", required=True)
    tta_help = "test-time augmentation (auto: as chosen on the validation cases)"
    gate_help = "V4 gate (auto: as chosen on the validation cases)"

    s = sub.add_parser("phantom", help="write one synthetic CT case (volume + segmentation NIfTI)")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--preset", choices=["demo", "lits"], default=D("dataset.phantom.preset"))
    s.add_argument("--size", default=D("dataset.phantom.size"), help="in-plane matrix, or auto (from the preset)")
    s.add_argument("--slices", default=D("dataset.phantom.slices"), help="number of slices, or auto (from the preset)")
    s.add_argument("--max-tumours", type=int, default=D("dataset.phantom.max_tumours"))
    s.add_argument("image")
    s.add_argument("label")
    s.set_defaults(func=_cmd_phantom)

    s = sub.add_parser("show-config", help="print a config with the schema's defaults filled in, as JSON "
                                           "(the --config-json of `cases` and `train`)")
    s.add_argument("--training-view", choices=list(ROLES), help="only what training this role reads")
    s.add_argument("config", nargs="?", help="config YAML (none: the defaults)")
    s.set_defaults(func=_cmd_show_config)

    s = sub.add_parser("cases", help="list the configured dataset's cases (and rejected ones) as a TSV")
    s.add_argument("--config-json", default="{}", help="the config (at least its dataset and results keys) as JSON")
    s.add_argument("out")
    s.set_defaults(func=_cmd_cases)

    s = sub.add_parser("check", help="validate one case and write its verdict as JSON (the workflow's first look)")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--label")
    s.add_argument("--affine-tolerance", type=float, default=D("ingest.affine_tolerance"))
    s.add_argument("--max-memory-mb", type=int, default=0, metavar="MB",
                   help="memory the check may use (the workflow passes the job's mem_mb); above it the case fails "
                        "with a verdict instead of swapping or being killed (0 = no limit)")
    s.add_argument("out")
    s.set_defaults(func=_cmd_check)

    s = sub.add_parser("preprocess", help="validate one case, window HU, resize, write slices to HDF5")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--label")
    s.add_argument("--lower", type=float, default=D("window.lower"))
    s.add_argument("--upper", type=float, default=D("window.upper"))
    s.add_argument("--mode", choices=["fixed", "study_v2"], default=D("window.mode"))
    s.add_argument("--plan", help="plan.json (`liverseg plan`): the stored grid's mm per pixel and size")
    s.add_argument("--size", type=int, help="stored grid size without a plan")
    s.add_argument("--spacing-mm", type=float, help="mm per stored pixel without a plan (default: fit the scan)")
    s.add_argument("--affine-tolerance", type=float, default=D("ingest.affine_tolerance"))
    s.add_argument("--compression", choices=["none", "lzf", "gzip"], default=D("slices.compression"))
    s.add_argument("out")
    s.set_defaults(func=_cmd_preprocess)

    s = sub.add_parser("plan", help="the stored grid in mm (plan.json) from the training and validation cases' headers")
    s.add_argument("--split", required=True, help="split.json (`liverseg split`)")
    s.add_argument("--checks", nargs="+", required=True, metavar="JSON", help="check verdicts (`liverseg check`)")
    s.add_argument("--spacing-mm", default=D("slices.spacing_mm"), help="auto or mm per pixel")
    s.add_argument("--size", default=D("slices.size"), help="auto or pixels")
    s.add_argument("--fov-mm", default=D("slices.fov_mm"), help="auto or mm")
    s.add_argument("--cases", help="the case table (`liverseg cases`): headers for verdicts that lack them")
    s.add_argument("out")
    s.set_defaults(func=_cmd_plan)

    s = sub.add_parser("split", help="case-level train/val/test split (k-fold aware) from the case table and checks")
    s.add_argument("--cases", required=True, help="TSV written by `liverseg cases`")
    s.add_argument("--checks", nargs="+", required=True, metavar="JSON",
                   help="verdicts written by `liverseg check`, one per case; failed cases are left out")
    s.add_argument("--seed", type=int, default=D("split.seed"))
    s.add_argument("--test-fraction", type=float, default=D("split.test_fraction"))
    s.add_argument("--val-fraction", type=float, default=D("split.val_fraction"))
    s.add_argument("--folds", type=int, default=D("split.folds"))
    s.add_argument("--fold", type=int, default=D("split.fold"))
    s.add_argument("out")
    s.set_defaults(func=_cmd_split)

    s = sub.add_parser("train", help="train one model role (liverseg.roles) on preprocessed cases")
    s.add_argument("--role", required=True, choices=list(ROLES))
    s.add_argument("--config-json", default="{}",
                   help="the config as JSON, e.g. from `liverseg show-config --training-view ROLE config.yaml`")
    s.add_argument("--train", nargs="+", required=True, metavar="H5", help="training cases (`liverseg preprocess`)")
    s.add_argument("--val", nargs="*", default=[], metavar="H5", help="validation cases: choose the epoch")
    s.add_argument("--needs", action="append", default=[], metavar="ROLE=MODEL_PT",
                   help="a trained model this role depends on, repeated (model_b: classifier and model_a)")
    s.add_argument("--checkpoint-dir", required=True, help="per-epoch checkpoint; a rerun resumes from here")
    s.add_argument("--threads", type=int, default=D("train.threads"))
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=D("train.device"))
    s.add_argument("--workers", type=int, default=D("train.workers"), help="DataLoader worker processes")
    s.add_argument("--out-model", required=True, help="model.pt (its spec must be the .json beside it to load)")
    s.add_argument("--out-spec", required=True, help="model.json")
    s.add_argument("--out-log", required=True, help="per-epoch CSV")
    s.add_argument("--out-curves", required=True, help="learning curves PNG")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("predict-case", help="inference for one preprocessed case (HDF5) -> label NIfTI")
    s.add_argument("--case", required=True)
    s.add_argument("--h5", required=True)
    s.add_argument("--model", action="append", required=True, metavar="ROLE=MODEL_PT",
                   help="model file of a role the mode needs, repeated; several for one role are averaged")
    s.add_argument("--mode", choices=list(MODES), default="cascade")
    s.add_argument("--scores", help="TSV of per-slice classifier scores and gating")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=D("predict.device"))
    s.add_argument("--tta", choices=["auto", "true", "false"], default=str(D("predict.tta")).lower(), help=tta_help)
    s.add_argument("--gate", choices=["auto", *GATES], default=D("predict.gate"), help=gate_help)
    s.add_argument("--batch", type=int, default=D("predict.batch_size"))
    s.add_argument("--threads", type=int, default=D("predict.threads"))
    s.add_argument("--classifier-threshold-file", metavar="JSON",
                   help="a fold ensemble's classifier threshold (`liverseg ensemble-threshold`), replacing the "
                        "mean of its members' thresholds")
    s.add_argument("--probabilities", metavar="NIFTI", help="also write the class probabilities (4D, uint8 / 255)")
    s.add_argument("--uncertainty", metavar="NIFTI",
                   help="also write the entropy of the class probabilities over log(3) (uint8 / 255)")
    s.add_argument("out")
    s.set_defaults(func=_cmd_predict_case)

    s = sub.add_parser("ensemble-threshold", help="a fold ensemble's classifier threshold from the pooled "
                                                  "out-of-fold validation slices (JSON)")
    s.add_argument("--model", action="append", required=True, metavar="MODEL_PT",
                   help="fold f's classifier, repeated in fold order (0, 1, ...)")
    s.add_argument("--val", action="append", required=True, metavar="FOLD=H5",
                   help="a validation case of fold FOLD, repeated")
    s.add_argument("--min-sensitivity", type=float, default=D("train.min_sensitivity"))
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=D("predict.device"))
    s.add_argument("--threads", type=int, default=D("predict.threads"), help="CPU threads (0 = torch default)")
    s.add_argument("out")
    s.set_defaults(func=_cmd_ensemble_threshold)

    s = sub.add_parser("postprocess", help="largest 3D liver component, tumour inside liver only")
    s.add_argument("--case", required=True)
    s.add_argument("--connectivity", type=int, choices=[6, 18, 26], default=D("postprocess.connectivity"))
    s.add_argument("--min-lesion-mm3", type=float, default=D("postprocess.min_lesion_mm3"))
    s.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=D("postprocess.fill_holes"))
    s.add_argument("input")
    s.add_argument("out")
    s.set_defaults(func=_cmd_postprocess)

    s = sub.add_parser("evaluate-case", help="LiTS metrics of one prediction against its reference label")
    s.add_argument("--case", required=True)
    s.add_argument("--pred", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--affine-tolerance", type=float, default=D("ingest.affine_tolerance"),
                   help="largest allowed difference between prediction and reference affines (as at ingest)")
    s.add_argument("out")
    s.set_defaults(func=_cmd_evaluate_case)

    s = sub.add_parser("aggregate", help="per-case TSVs -> per_case.tsv + summary.json")
    s.add_argument("--out-tsv", required=True)
    s.add_argument("--out-json", required=True)
    s.add_argument("--extra-json", help="JSON merged into the summary (experiment, stage, skipped cases)")
    s.add_argument("tsvs", nargs="*")
    s.set_defaults(func=_cmd_aggregate)

    s = sub.add_parser("predict", help="segment new scans (NIfTI file, DICOM series folder, or a folder of them)")
    s.add_argument("--models", required=True, help="folder with classifier/, model_a/, model_b/ (e.g. results/train); "
                                                  "a role with fold_<f>/ sub-folders instead of model.pt is a fold "
                                                  "ensemble, averaged")
    s.add_argument("--mode", choices=["cascade", "model_a"], default="cascade")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=D("predict.device"))
    s.add_argument("--tta", choices=["auto", "true", "false"], default=str(D("predict.tta")).lower(), help=tta_help)
    s.add_argument("--gate", choices=["auto", *GATES], default=D("predict.gate"), help=gate_help)
    s.add_argument("--batch", type=int, default=D("predict.batch_size"))
    s.add_argument("--no-postprocess", action="store_true", help="skip the largest-component step")
    s.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    s.add_argument("--output-format", choices=["nifti", "dicom-seg", "both"], default=D("predict.output_format"),
                   help="label NIfTI, DICOM Segmentation of the source series (DICOM input only), or both")
    s.add_argument("--statistics", action="store_true",
                   help="liver and tumour volumes, tumour count and burden, HU: <output>.stats.json per scan "
                        "(and statistics.tsv in the output folder for a folder of scans)")
    s.add_argument("--series-uid", help="SeriesInstanceUID to segment when the DICOM folder holds several series "
                                        "(default: the largest axial series that is not a localizer)")
    s.add_argument("--probabilities", action=argparse.BooleanOptionalAction, default=D("predict.save_probabilities"),
                   help="also write <output>_probabilities.nii.gz: class probabilities (4th axis background, liver, "
                        "tumour), uint8 with scl_slope 1/255")
    s.add_argument("--uncertainty", action=argparse.BooleanOptionalAction, default=D("predict.save_uncertainty"),
                   help="also write <output>_uncertainty.nii.gz: entropy of the probabilities over log(3), uint8 / 255")
    s.add_argument("input", help="NIfTI file, DICOM series folder, or folder of NIfTI files / DICOM folders")
    s.add_argument("output", help="output .nii.gz or .dcm (one scan), or a folder (one scan, or several)")
    s.set_defaults(func=_cmd_predict)

    s = sub.add_parser("statistics", help="liver/tumour volumes, tumour count and burden, HU of one prediction (JSON)")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True, help="the source image (NIfTI or DICOM series folder), in HU")
    s.add_argument("--pred", required=True, help="the prediction, a label NIfTI on the image's grid")
    s.add_argument("--model", action="append", default=[], metavar="ROLE=MODEL_PT",
                   help="a model file that made the prediction, repeated: recorded with its hashes")
    s.add_argument("--experiment", default="", help="recorded in the JSON (the first column of the table)")
    s.add_argument("out")
    s.set_defaults(func=_cmd_statistics)

    s = sub.add_parser("statistics-table", help="per-case statistics JSON files -> one TSV")
    s.add_argument("--out", required=True)
    s.add_argument("jsons", nargs="*")
    s.set_defaults(func=_cmd_statistics_table)

    s = sub.add_parser("dicom-seg", help="a prediction NIfTI -> DICOM Segmentation referencing its source series")
    s.add_argument("--case", required=True)
    s.add_argument("--series", required=True, help="the source DICOM series folder")
    s.add_argument("--series-uid", help="the series, when the folder holds several")
    s.add_argument("--pred", required=True, help="label NIfTI on the series' grid (`liverseg predict` output)")
    s.add_argument("--model", action="append", default=[], metavar="ROLE=MODEL_PT",
                   help="a model file that made the prediction, repeated: named in the algorithm identification")
    s.add_argument("out")
    s.set_defaults(func=_cmd_dicom_seg)

    s = sub.add_parser("kaggle", help="Kaggle aio2025liverseg submission.csv (id,rle) from label NIfTI files")
    s.add_argument("--out", required=True)
    s.add_argument("--sample", help="the competition's sample_submission.csv: follow its ids and row order")
    s.add_argument("predictions", nargs="*", metavar="CASE=NIFTI")
    s.set_defaults(func=_cmd_kaggle)

    s = sub.add_parser("overlay", help="PNG: CT | reference | prediction contours at three slices")
    s.add_argument("--case", required=True)
    s.add_argument("--image", required=True)
    s.add_argument("--ref", required=True)
    s.add_argument("--pred", required=True)
    s.add_argument("--h5", required=True, help="the case's preprocessed file: the HU window to display")
    s.add_argument("--title", default="")
    s.add_argument("out")
    s.set_defaults(func=_cmd_overlay)

    s = sub.add_parser("summarize", help="experiment comparison table (markdown) and per-case Dice plot")
    s.add_argument("--summaries", nargs="+", required=True, metavar="JSON",
                   help="summary.json files written by `liverseg aggregate` (raw and post stages)")
    s.add_argument("--benchmark", action="append", default=[], metavar="EXPERIMENT=TSV",
                   help="Snakemake benchmark file of one prediction job, repeated")
    s.add_argument("--out-md", required=True)
    s.add_argument("--out-plot", required=True)
    s.set_defaults(func=_cmd_summarize)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:  # highdicom logs every attribute module it copies at INFO
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (CaseError, ConfigError, FileNotFoundError, ModelFileError, ValueError) as exc:
        print(f"liverseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
