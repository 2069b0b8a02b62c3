"""`liverseg <stage> ...`: one subcommand per pipeline stage.  Parsing only; the work lives in the stage modules.

Every Snakemake rule calls one of these, so each stage can be rerun by hand with the same arguments.
Expected bad input (CaseError) prints one line naming the case and exits 1; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from liverseg.errors import CaseError, ConfigError

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
        affine_tolerance=a.affine_tolerance,
    )
    print(json.dumps(s))


def _cmd_split(a):
    from liverseg.ingest import read_case_table
    from liverseg.split import make_split, write_split

    rows = read_case_table(a.cases)
    labelled = [r["case_id"] for r in rows if r["status"] == "labelled"]
    unlabelled = [r["case_id"] for r in rows if r["status"] == "predict-only"]
    split = make_split(labelled, unlabelled, a.seed, a.test_fraction, a.val_fraction, a.folds, a.fold)
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
    s.add_argument("out")
    s.set_defaults(func=_cmd_preprocess)

    s = sub.add_parser("split", help="case-level train/val/test split (k-fold aware) from a case table")
    s.add_argument("--cases", required=True, help="TSV written by `liverseg cases`")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--test-fraction", type=float, default=0.25)
    s.add_argument("--val-fraction", type=float, default=0.2)
    s.add_argument("--folds", type=int, default=1)
    s.add_argument("--fold", type=int, default=0)
    s.add_argument("out")
    s.set_defaults(func=_cmd_split)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


# Later stages register their subcommands here (keeps this module free of torch imports at parse time).
_EXTRA_COMMANDS: list = []


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except CaseError as exc:
        print(f"liverseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, FileNotFoundError) as exc:
        print(f"liverseg {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0
