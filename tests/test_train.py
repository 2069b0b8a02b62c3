import json
import os
import shutil
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from liverseg import models as M
from liverseg.errors import ConfigError, ModelFileError
from liverseg.preprocess import preprocess_case
from liverseg.train import resume_key, soft_dice_loss

from conftest import ROOT, fit, tiny_config


def _weights(path):
    return torch.load(path, weights_only=True)


def test_soft_dice_loss_is_zero_for_perfect_logits():
    y = torch.randint(0, 3, (2, 8, 8))
    logits = torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float() * 50
    assert float(soft_dice_loss(logits, y)) < 1e-3
    assert float(soft_dice_loss(-logits, y)) > 0.9


@pytest.mark.parametrize("role", ["classifier", "model_a", "model_b", "v3_convlstm", "v1_3dcnn"])
def test_training_outputs_and_reload(tiny_dataset, tmp_path, role):
    _, paths, split = tiny_dataset
    cfg = tiny_config()
    needs = {}
    if role == "model_b":  # validated through the cascade: needs the classifier and model A
        for r in ("classifier", "model_a"):
            fit(r, paths, split, cfg, tmp_path / r, tmp_path / f"ck_{r}")
            needs[r] = str(tmp_path / r / "model.pt")
    spec = fit(role, paths, split, cfg, tmp_path / "out", tmp_path / "ckpt", needs=needs)
    out = tmp_path / "out"
    for f in ("model.pt", "model.json", "log.csv", "curves.png"):
        assert (out / f).stat().st_size > 0
    saved = json.loads((out / "model.json").read_text())
    assert saved["config_hash"] == spec["config_hash"] and saved["in_channels"] == (1 if role == "v1_3dcnn" else 3)
    assert saved["window"]["lower"] == -150 and saved["input_size"] == (16 if role == "model_b" else 32)
    if role == "classifier":
        assert 0 <= saved["threshold"] <= 1
    header = (out / "log.csv").read_text().splitlines()[0]
    for col in ("epoch", "train_loss", "lr", "seconds", "slices_per_s"):
        assert col in header
    if role != "classifier":
        assert "val_liver_dice" in header and "val_tumour_dice" in header
    model, spec2 = M.load(out / "model.pt")
    assert spec2["role"] == role
    if role == "model_b":
        assert spec2["input_size"] == spec2["patch_size"] == 16  # a patch of the stored grid, not a resized crop
        assert {r["gate"] for r in spec2["selection"]["table"]} == {"route", "suppress"}
        assert spec2["selection"]["gate"] in ("route", "suppress")
    if role == "model_a":
        assert "tta" in spec2["selection"]


def test_same_seed_same_weights_and_other_seed_differs(tiny_dataset, tmp_path):
    _, paths, split = tiny_dataset
    cfg = tiny_config()
    fit("model_a", paths, split, cfg, tmp_path / "a", tmp_path / "ca")
    fit("model_a", paths, split, cfg, tmp_path / "b", tmp_path / "cb")
    wa, wb = _weights(tmp_path / "a" / "model.pt"), _weights(tmp_path / "b" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    fit("model_a", paths, split, tiny_config(train={"seed": 1}), tmp_path / "c", tmp_path / "cc")
    wc = _weights(tmp_path / "c" / "model.pt")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_interrupted_training_resumes_to_the_same_weights(tiny_dataset, tmp_path):
    """SIGKILL a training process after its first epoch checkpoint; the rerun resumes and matches a clean run."""
    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"model_a": {"epochs": 4}})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "liverseg", "train", "--role", "model_a", "--train", *[paths[c] for c in split["train"]],
           "--val", *[paths[c] for c in split["val"]], "--config-json", json.dumps(cfg),
           "--checkpoint-dir", str(tmp_path / "ck"), "--threads", "1", "--out-model", str(out / "model.pt"),
           "--out-spec", str(out / "model.json"), "--out-log", str(out / "log.csv"), "--out-curves", str(out / "c.png")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    ck = tmp_path / "ck" / "last.pt"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists() and not (tmp_path / "out" / "model.pt").exists()
    done = torch.load(ck, weights_only=True)["epoch"]
    assert 1 <= done < 4
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from checkpoint after epoch {done}" in r.stderr
    fit("model_a", paths, split, cfg, tmp_path / "clean", tmp_path / "ck_clean")
    wa, wb = _weights(tmp_path / "out" / "model.pt"), _weights(tmp_path / "clean" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_model_files_give_clear_errors(tiny_dataset, tmp_path):
    _, paths, split = tiny_dataset
    fit("classifier", paths, split, tiny_config(), tmp_path / "m", tmp_path / "c")
    good = tmp_path / "m" / "model.pt"
    with pytest.raises(ModelFileError, match="model file missing"):
        M.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad" / "model.pt"
    bad.parent.mkdir()
    (bad.parent / "model.json").write_text((tmp_path / "m" / "model.json").read_text())
    bad.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="cannot load model weights"):
        M.load(bad)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    with open(bad, "wb") as fh:
        pickle.dump({"x": Evil()}, fh)
    with pytest.raises(ModelFileError, match="weights_only"):
        M.load(bad)
    assert not (tmp_path / "pwned").exists()
    spec = json.loads((bad.parent / "model.json").read_text())
    spec["encoder"] = "resnet34"
    (bad.parent / "model.json").write_text(json.dumps(spec))
    bad.write_bytes(good.read_bytes())
    with pytest.raises(ModelFileError, match="do not match the architecture"):
        M.load(bad)
    r = subprocess.run([sys.executable, "-m", "liverseg", "predict-case", "--case", "3", "--h5", paths["3"],
                        "--model", f"model_a={tmp_path / 'none' / 'model.pt'}", "--mode", "model_a",
                        str(tmp_path / "p.nii.gz")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("liverseg predict-case: error: model file missing")


def test_finished_training_is_never_resumed(tiny_dataset, tmp_path, caplog):
    """A forced rerun (same config, same data) trains every configured epoch again."""
    import logging

    caplog.set_level(logging.INFO, logger="liverseg.train")
    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"model_a": {"epochs": 3}})
    fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    assert not (tmp_path / "ck" / "last.pt").exists()
    caplog.clear()
    fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    assert "resuming" not in caplog.text
    assert len([r for r in caplog.records if '"train_loss"' in r.getMessage()]) == 3


def _copy_case(paths, out_dir, label_edit=None):
    """Preprocess tiny case 0 again into ``out_dir`` (optionally with an edited label under the same id)."""
    import shutil

    import nibabel as nib

    from liverseg.preprocess import preprocess_case

    out_dir.mkdir()
    root = os.path.dirname(paths["0"])
    src_img, src_lab = os.path.join(root, "volume-0.nii.gz"), os.path.join(root, "segmentation-0.nii.gz")
    lab = out_dir / "segmentation-0.nii.gz"
    shutil.copy(src_lab, lab)
    if label_edit is not None:
        im = nib.load(src_lab)
        arr = np.asarray(im.dataobj).copy()
        label_edit(arr)
        nib.save(nib.Nifti1Image(arr, im.affine, im.header), str(lab))
    out = dict(paths)
    out["0"] = str(out_dir / "0.h5")
    import h5py

    with h5py.File(paths["0"]) as f:  # the tiny dataset's shared grid
        mm = float(f.attrs["spacing_mm"])
    preprocess_case("0", src_img, out["0"], label_path=lab, size=32, spacing_mm=mm)
    return out


def test_changed_label_under_the_same_id_retrains(tiny_dataset, tmp_path, monkeypatch, caplog):
    """Interrupt a training after one epoch; the rerun resumes on the same data but starts afresh when a label
    of a training case was corrected under the same case id."""
    import logging

    import liverseg.train as T
    from liverseg.data import index_cases

    caplog.set_level(logging.INFO, logger="liverseg.train")
    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"model_a": {"epochs": 2}})
    same = _copy_case(paths, tmp_path / "a")

    def edit(arr):
        arr[tuple(np.argwhere(arr >= 1)[0])] = 0  # one voxel of the reference corrected

    fixed = _copy_case(paths, tmp_path / "b", edit)
    keys = [resume_key(cfg, "model_a", index_cases([p[c] for c in split["train"]]),
                       index_cases([p[c] for c in split["val"]])) for p in (paths, same, fixed)]
    assert keys[0] == keys[1] != keys[2]

    real_validate = T.validate
    calls = {"n": 0}

    def interrupt_after_first_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_validate(*a, **k)

    for data, expect in ((same, "resuming from checkpoint after epoch 1"), (fixed, "another resume key")):
        calls["n"] = 0
        ck = tmp_path / f"ck_{expect[:3]}"
        monkeypatch.setattr(T, "validate", interrupt_after_first_epoch)
        with pytest.raises(KeyboardInterrupt):
            fit("model_a", same, split, cfg, tmp_path / "out", ck)
        assert (ck / "last.pt").exists()
        monkeypatch.setattr(T, "validate", real_validate)
        caplog.clear()
        fit("model_a", data, split, cfg, tmp_path / "out", ck)
        assert expect in caplog.text
        epochs_now = len([r for r in caplog.records if '"train_loss"' in r.getMessage()])
        assert epochs_now == (1 if data is same else 2)  # resumed: the last epoch only; afresh: every epoch


def test_context_in_mm_reaches_training_validation_and_prediction(tiny_dataset, tmp_path, monkeypatch):
    """slices.context_mm is recorded in model.json and turned into the same slice stride, per case, by the
    training data, validation and prediction (the tiny phantoms have thick slices: 45 mm is a stride > 1)."""
    import h5py

    import liverseg.data as D
    import liverseg.inference as I
    from liverseg import predict as P
    from liverseg.geometry import z_stride
    from liverseg.plan import context_distance

    _, paths, split = tiny_dataset
    z_mm = {c: float(h5py.File(paths[c]).attrs["slice_spacing"]) for c in paths}
    want = {c: z_stride(45.0, z_mm[c]) for c in paths}
    assert min(want.values()) > 1
    seen = {"data": set(), "infer": set()}
    real_ci = D.context_indices
    monkeypatch.setattr(D, "context_indices", lambda z, n, c, stride=1: seen["data"].add(stride) or real_ci(z, n, c, stride))
    real_stack = I._stack
    monkeypatch.setattr(I, "_stack", lambda image, zs, c, stride=1: seen["infer"].add(stride) or real_stack(image, zs, c, stride))
    cfg = tiny_config(slices={"context_mm": 45.0}, train={"model_a": {"epochs": 1}})
    fit("model_a", paths, split, cfg, tmp_path / "a", tmp_path / "ck")
    spec = json.loads((tmp_path / "a" / "model.json").read_text())
    assert spec["context_mm"] == 45.0
    assert spec["spacing_mm"] == pytest.approx(float(h5py.File(paths["0"]).attrs["spacing_mm"]), abs=1e-5)
    assert seen["data"] == {want[c] for c in split["train"]}  # training samples
    assert seen["infer"] == {want[c] for c in split["val"]}  # validation
    seen["infer"].clear()
    fit("classifier", paths, split, tiny_config(slices={"context_mm": 45.0}, train={"classifier": {"epochs": 1}}),
        tmp_path / "c", tmp_path / "ckc")
    assert seen["infer"] == {want[c] for c in split["val"]}  # the classifier's validation scores
    seen["infer"].clear()
    (tmp_path / "m" / "model_a").mkdir(parents=True)
    for f in ("model.pt", "model.json"):
        shutil.copy(tmp_path / "a" / f, tmp_path / "m" / "model_a" / f)
    P.predict_case("3", paths["3"], P.models_in(tmp_path / "m", "model_a"), tmp_path / "p.nii.gz", mode="model_a",
                   device="cpu", tta="false")
    assert seen["infer"] == {want["3"]}
    # auto: the figure the plan reports for the same cases
    fit("model_a", paths, split, tiny_config(train={"model_a": {"epochs": 1}}), tmp_path / "b", tmp_path / "ck2")
    auto = json.loads((tmp_path / "b" / "model.json").read_text())["context_mm"]
    assert auto == context_distance([z_mm[c] for c in split["train"] + split["val"]])


def test_cases_on_different_grids_cannot_train_one_model(tiny_dataset, tmp_path):
    _, paths, split = tiny_dataset
    root = os.path.dirname(paths["0"])
    other = str(tmp_path / "0.h5")
    preprocess_case("0", os.path.join(root, "volume-0.nii.gz"), other, label_path=os.path.join(root, "segmentation-0.nii.gz"),
                    size=32, spacing_mm=19.0)
    with pytest.raises(ConfigError, match="different grids"):
        fit("model_a", {**paths, "0": other}, split, tiny_config(), tmp_path / "a", tmp_path / "ck")


def test_epoch_selector_keeps_the_best_moving_average_not_a_noisy_epoch():
    from liverseg.train import EpochSelector

    def kept(scores, smoothing):
        sel, best = EpochSelector(smoothing, len(scores)), None
        for epoch, s in enumerate(scores, 1):
            if sel.update(s):
                best = epoch
        return best

    blip = [0.40, 0.50, 0.44, 0.46, 0.48, 0.49]  # epoch 2: a few lucky tumour voxels on the validation cases
    assert kept(blip, 0.0) == 2
    assert kept(blip, 0.5) == 6
    assert kept([0.4, 0.6, 0.6, 0.6, 0.3, 0.3, 0.3], 0.5) == 4  # a lasting fall still keeps the earlier weights
    # Model B's validation scores in issue 12 (fr16's log.csv): a first epoch over-calling tumour scored 0.474,
    # and an average started there stayed above every later one.  Eligible from epoch 10 (the 0.9 window), the
    # choice is among the trained epochs; with 4 epochs only the last one is eligible.
    b_log = [0.474317, 0.450997, 0.442233, 0.465291, 0.463124, 0.468523, 0.453788, 0.464883, 0.469277, 0.46657,
             0.46847, 0.467487, 0.474898, 0.470776, 0.471077, 0.46848]
    assert kept(b_log, 0.9) == 16
    assert kept(b_log[:4], 0.9) == 4
    # A luckier first epoch: an average started at it (not bias-corrected) would still weigh it 0.9^9 at epoch 10
    # and keep epoch 10, the first eligible one; corrected, it weighs by its age and a late epoch is kept.
    assert kept([0.55] + b_log[1:], 0.9) == 15
    assert EpochSelector(0.9, 16).warmup == 10 and EpochSelector(0.5, 16).warmup == 2
    assert EpochSelector(0.0, 16).warmup == 1 and EpochSelector(0.99, 16).warmup == 16


def _scripted_validate(scores, calls, stop_at=None):
    def validate(*a, **k):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        s = scores[calls["n"] - 1 - calls.get("offset", 0)]
        return {"val_liver_dice": s, "val_tumour_dice": 0.0, "score": s}
    return validate


@pytest.mark.parametrize("smoothing, expect", [(0.0, 2), (0.75, 6)])
def test_training_keeps_the_epoch_the_selector_chooses(tiny_dataset, tmp_path, monkeypatch, smoothing, expect):
    """Through the training loop, with validation scores scripted: a one-epoch blip (epoch 2) is kept only without
    smoothing; at 0.75 (eligible from epoch 4) the best average is the last epoch's."""
    import csv

    import liverseg.train as T

    scores = [0.30, 0.60, 0.50, 0.55, 0.58, 0.60]
    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"selection_smoothing": smoothing, "model_a": {"epochs": 6}})
    monkeypatch.setattr(T, "validate", _scripted_validate(scores, {"n": 0}))
    spec = fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    assert spec["best_epoch"] == expect and spec["validation"]["score"] == scores[expect - 1]
    rows = list(csv.DictReader(open(tmp_path / "out" / "log.csv")))
    assert [float(r["val_score"]) for r in rows] == scores
    if smoothing:  # bias-corrected: (0.25 * 0.75 * 0.30 + 0.25 * 0.60) / (1 - 0.75^2)
        assert float(rows[1]["val_score_smoothed"]) == pytest.approx((0.25 * 0.75 * 0.30 + 0.25 * 0.60) / (1 - 0.75 ** 2),
                                                                     abs=1e-6)


@pytest.mark.parametrize("smoothing, expect", [(0.5, 2), (0.75, 4)])
def test_resumed_training_continues_the_moving_average(tiny_dataset, tmp_path, monkeypatch, smoothing, expect):
    """Stopped after two epochs and resumed, the smoothed scores and the kept epoch are those of an uninterrupted
    run: at 0.5 the best average before the stop is restored (epoch 2, eligible from epoch 2); at 0.75 epoch 4 is
    the first eligible one, counted from the run's start, not from the resume."""
    import csv

    import liverseg.train as T

    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"selection_smoothing": smoothing, "model_a": {"epochs": 4}})
    scores = [0.30, 0.90, 0.10, 0.10]  # at 0.5 smoothed (bias-corrected) 0.30, 0.70, 0.357, 0.22
    monkeypatch.setattr(T, "validate", _scripted_validate(scores, {"n": 0}))
    clean = fit("model_a", paths, split, cfg, tmp_path / "clean", tmp_path / "ck_clean")
    calls = {"n": 0}
    monkeypatch.setattr(T, "validate", _scripted_validate(scores, calls, stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    calls.update(n=0, offset=-2)  # the resumed run validates epochs 3 and 4
    resumed = fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    read = lambda d: [r["val_score_smoothed"] for r in csv.DictReader(open(tmp_path / d / "log.csv"))]  # noqa: E731
    assert read("out") == read("clean") and len(read("out")) == 4
    assert resumed["best_epoch"] == clean["best_epoch"] == expect


def test_early_stopping_counts_from_the_best_moving_average(tiny_dataset, tmp_path, monkeypatch):
    """Patience 2: the raw score's best epoch (5) is not the average's (3), and the count runs from the average's:
    the run stops after epoch 5 and keeps epoch 3 (counted from the raw best it would run to epoch 7)."""
    import liverseg.train as T

    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"selection_smoothing": 0.5, "early_stopping_patience": 2, "model_a": {"epochs": 8}})
    # smoothed (bias-corrected) 0.10, 0.633, 0.786, 0.420, 0.694, 0.392, ...: eligible from epoch 2, none beats epoch 3's
    monkeypatch.setattr(T, "validate", _scripted_validate([0.10, 0.90, 0.90, 0.10, 0.95, 0.10, 0.10, 0.10], {"n": 0}))
    spec = fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    assert spec["best_epoch"] == 3 and spec["epochs_run"] == 5


def test_early_stopping_waits_for_the_selectors_window(tiny_dataset, tmp_path, monkeypatch):
    """Falling scores from the first epoch: no epoch is kept before the window of smoothing 0.8 (5 epochs), so
    patience 1 cannot stop the run before it: it keeps epoch 5 and stops after epoch 6."""
    import liverseg.train as T

    _, paths, split = tiny_dataset
    cfg = tiny_config(train={"selection_smoothing": 0.8, "early_stopping_patience": 1, "model_a": {"epochs": 7}})
    monkeypatch.setattr(T, "validate", _scripted_validate([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3], {"n": 0}))
    spec = fit("model_a", paths, split, cfg, tmp_path / "out", tmp_path / "ck")
    assert spec["best_epoch"] == 5 and spec["epochs_run"] == 6
