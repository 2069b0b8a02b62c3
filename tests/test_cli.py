import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, write_nifti

COMMANDS = ["phantom", "cases", "preprocess", "plan", "split", "train", "predict-case", "postprocess", "evaluate-case",
            "aggregate", "overlay", "summarize"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "liverseg", *args], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0 and "usage: liverseg" in r.stdout


def test_preprocess_bad_input_is_one_line(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", np.zeros((4, 4), np.int16))
    r = run("preprocess", "--case", "c7", "--image", str(tmp_path / "v.nii.gz"), "--size", "16", str(tmp_path / "o.h5"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"liverseg preprocess: error: case c7: image {tmp_path / 'v.nii.gz'} has 2 dimensions (4, 4); a 3D volume is required"]
    assert not (tmp_path / "o.h5").exists()


def test_phantom_then_preprocess_by_hand(tmp_path):
    r = run("phantom", "--seed", "2", "--size", "32", "--slices", "10", str(tmp_path / "v.nii.gz"), str(tmp_path / "s.nii.gz"))
    assert r.returncode == 0, r.stderr
    r = run("preprocess", "--case", "2", "--image", str(tmp_path / "v.nii.gz"), "--label", str(tmp_path / "s.nii.gz"),
            "--size", "32", str(tmp_path / "2.h5"))
    assert r.returncode == 0, r.stderr
    assert '"slices": 10' in r.stdout


def test_evaluate_shape_mismatch_names_the_case(tmp_path):
    write_nifti(tmp_path / "p.nii.gz", np.zeros((4, 4, 4), np.uint8))
    write_nifti(tmp_path / "r.nii.gz", np.zeros((4, 4, 5), np.uint8))
    r = run("evaluate-case", "--case", "x1", "--pred", str(tmp_path / "p.nii.gz"), "--ref", str(tmp_path / "r.nii.gz"),
            str(tmp_path / "o.tsv"))
    assert r.returncode == 1 and "case x1: prediction shape (4, 4, 4) differs from reference shape (4, 4, 5)" in r.stderr


COMMANDS += ["check", "show-config", "predict", "kaggle"]


def test_cli_defaults_are_the_schema_defaults(monkeypatch):
    """The CLI holds no defaults of its own: with the schema's defaults replaced, every option that mirrors a
    config key follows them (a literal default in cli.py would not)."""
    import copy

    from liverseg import config
    from liverseg.cli import build_parser

    config.default("window.lower")  # fill the cache, then swap in other "schema" values
    fake = copy.deepcopy(config._DEFAULTS)
    fake["window"].update(lower=-77.0, upper=177.0, mode="study_v2")
    fake["slices"].update(size=99, compression="gzip", spacing_mm=1.5, fov_mm=300.0, context_mm=4.0)
    fake["ingest"]["affine_tolerance"] = 0.123
    fake["split"].update(seed=5, test_fraction=0.31, val_fraction=0.17, folds=3, fold=2)
    fake["train"].update(threads=7, device="cpu", workers=3)
    fake["predict"].update(device="cpu", tta="false", gate="suppress", batch_size=5, threads=6)
    fake["postprocess"].update(connectivity=6, min_lesion_mm3=12.5, fill_holes=True)
    fake["dataset"]["phantom"].update(size=77, slices=33, max_tumours=2, preset="lits")
    monkeypatch.setattr(config, "_DEFAULTS", fake)
    cmds = build_parser()._subparsers._group_actions[0].choices

    def defaults(cmd):
        return {a.dest: a.default for a in cmds[cmd]._actions}

    assert {k: defaults("preprocess")[k] for k in ("lower", "upper", "mode", "compression", "affine_tolerance")} == {
        "lower": -77.0, "upper": 177.0, "mode": "study_v2", "compression": "gzip", "affine_tolerance": 0.123}
    assert {k: defaults("plan")[k] for k in ("spacing_mm", "size", "fov_mm")} == {
        "spacing_mm": 1.5, "size": 99, "fov_mm": 300.0}
    assert {k: defaults("split")[k] for k in ("seed", "test_fraction", "val_fraction", "folds", "fold")} == {
        "seed": 5, "test_fraction": 0.31, "val_fraction": 0.17, "folds": 3, "fold": 2}
    assert {k: defaults("train")[k] for k in ("threads", "device", "workers")} == {"threads": 7, "device": "cpu",
                                                                                  "workers": 3}
    assert {k: defaults("predict-case")[k] for k in ("device", "tta", "gate", "batch", "threads")} == {
        "device": "cpu", "tta": "false", "gate": "suppress", "batch": 5, "threads": 6}
    assert {k: defaults("postprocess")[k] for k in ("connectivity", "min_lesion_mm3", "fill_holes")} == {
        "connectivity": 6, "min_lesion_mm3": 12.5, "fill_holes": True}
    assert defaults("check")["affine_tolerance"] == defaults("evaluate-case")["affine_tolerance"] == 0.123
    assert {k: defaults("phantom")[k] for k in ("size", "slices", "max_tumours", "preset")} == {
        "size": 77, "slices": 33, "max_tumours": 2, "preset": "lits"}


def test_a_bad_config_value_is_one_line_naming_the_key(tmp_path):
    r = run("train", "--role", "model_a", "--config-json", '{"train": {"model_a": {"lr": -1}}}',
            "--train", str(tmp_path / "a.h5"), "--checkpoint-dir", str(tmp_path / "ck"), "--out-model", "m.pt",
            "--out-spec", "m.json", "--out-log", "l.csv", "--out-curves", "c.png")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("liverseg train: error: invalid config value at 'train.model_a.lr'")
    r = run("show-config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 1 and r.stderr.strip().startswith("liverseg show-config: error: cannot read config")


def test_show_config_prints_the_training_view(tmp_path):
    import json

    (tmp_path / "c.yaml").write_text("train:\n  threads: 7\n  model_b:\n    lr: 0.5\n")
    r = run("show-config", "--training-view", "model_b", str(tmp_path / "c.yaml"))
    view = json.loads(r.stdout)
    assert view["train"]["model_b"]["lr"] == 0.5 and "model_a" not in view["train"]
    assert "threads" not in view["train"] and "compression" not in view["slices"]  # how a job runs, not what it learns


def test_malformed_pairs_and_an_empty_export_are_one_line(tmp_path):
    r = run("predict-case", "--case", "1", "--h5", "x.h5", "--model", "model_a", "out.nii.gz")
    assert r.returncode == 1 and r.stderr.strip() == "liverseg predict-case: error: expected role=FILE, got 'model_a'"
    r = run("predict-case", "--case", "1", "--h5", "x.h5", "--model", "model_z=m.pt", "out.nii.gz")
    assert r.returncode == 1 and "unknown role 'model_z'" in r.stderr
    r = run("kaggle", "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 1 and r.stderr.strip().startswith("liverseg kaggle: error: no predictions to export")
    assert not (tmp_path / "s.csv").exists()


COMMANDS += ["statistics", "statistics-table", "dicom-seg"]


def test_statistics_then_table_by_hand(tmp_path):
    lab = np.zeros((6, 6, 4), np.uint8)
    lab[1:5, 1:5, 1:3] = 1
    lab[2, 2, 1] = 2
    write_nifti(tmp_path / "v.nii.gz", np.full(lab.shape, 50, np.int16), np.diag([2.0, 2.0, 2.5, 1.0]))
    write_nifti(tmp_path / "p.nii.gz", lab, np.diag([2.0, 2.0, 2.5, 1.0]))
    r = run("statistics", "--case", "s1", "--experiment", "v2_unetpp_cca", "--image", str(tmp_path / "v.nii.gz"),
            "--pred", str(tmp_path / "p.nii.gz"), str(tmp_path / "s1.json"))
    assert r.returncode == 0, r.stderr
    r = run("statistics-table", "--out", str(tmp_path / "t.tsv"), str(tmp_path / "s1.json"))
    assert r.returncode == 0, r.stderr
    row = dict(zip(*(ln.split("\t") for ln in (tmp_path / "t.tsv").read_text().splitlines())))
    assert row["experiment"] == "v2_unetpp_cca" and row["liver_ml"] == f"{32 * 10 / 1000:.3f}"  # 32 voxels of 10 mm^3
    assert row["tumour_count"] == "1" and row["tumour_burden_pct"] == f"{100 / 32:.3f}"


def test_dicom_seg_with_an_unknown_series_is_one_line(tmp_path):
    from conftest import realdata

    ct = realdata("dcmqi_ct3slice", "ct")
    write_nifti(tmp_path / "p.nii.gz", np.zeros((512, 512, 3), np.uint8))
    r = run("dicom-seg", "--case", "dq", "--series", str(ct), "--series-uid", "1.2.3", "--pred",
            str(tmp_path / "p.nii.gz"), str(tmp_path / "o.dcm"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("liverseg dicom-seg: error: case dq: no DICOM series 1.2.3 in ")
    assert not (tmp_path / "o.dcm").exists()


COMMANDS += ["ensemble-threshold"]


def test_fold_ensemble_options_follow_the_schema(monkeypatch):
    import copy

    from liverseg import config
    from liverseg.cli import build_parser

    config.default("window.lower")
    fake = copy.deepcopy(config._DEFAULTS)
    fake["predict"].update(save_probabilities=True, save_uncertainty=True)
    fake["train"]["min_sensitivity"] = 0.77
    monkeypatch.setattr(config, "_DEFAULTS", fake)
    cmds = build_parser()._subparsers._group_actions[0].choices
    predict = {a.dest: a.default for a in cmds["predict"]._actions}
    assert (predict["probabilities"], predict["uncertainty"]) == (True, True)
    assert {a.dest: a.default for a in cmds["ensemble-threshold"]._actions}["min_sensitivity"] == 0.77


def test_ensemble_threshold_needs_validation_cases_for_every_fold(tmp_path):
    r = run("ensemble-threshold", "--model", "a.pt", "--model", "b.pt", "--val", "0=x.h5", str(tmp_path / "e.json"))
    assert r.returncode == 1 and r.stderr.strip().startswith(
        "liverseg ensemble-threshold: error: --val needs FOLD=H5 for folds 0..1"), r.stderr


def test_ensemble_threshold_accepts_eleven_folds_in_numeric_order(tmp_path):
    """Folds are matched by number (a string sort puts fold 10 before fold 2): with every fold given, the command
    gets past the check and fails only on the model files that do not exist."""
    args = []
    for f in range(11):
        args += ["--model", str(tmp_path / f"m{f}.pt"), "--val", f"{f}={tmp_path / f'v{f}.h5'}"]
    r = run("ensemble-threshold", *args, str(tmp_path / "e.json"))
    assert r.returncode != 0 and "--val needs" not in r.stderr, r.stderr
    assert "model file missing" in r.stderr.strip().splitlines()[-1], r.stderr
