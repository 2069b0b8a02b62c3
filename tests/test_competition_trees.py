"""The Kaggle competition folder as downloaded, and a Decathlon folder, straight through `snakemake`.

Miniature trees from phantom cases; tiny models (V2 only) so the whole run takes about a minute."""

import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import ROOT, TINY_TRAIN

TINY = {
    "slices": {"size": 32, "spacing_mm": 15.0, "context": 1},  # 480 mm: every phantom body fits
    "split": {"seed": 0, "test_fraction": 0.25, "val_fraction": 0.2},
    "train": {**TINY_TRAIN, "model_a": {**TINY_TRAIN["model_a"], "epochs": 2, "samples_per_epoch": 16}},
    "experiments": ["v2_unetpp_cca"],
}


def decode(rle: str, rows: int, cols: int) -> np.ndarray:
    """The competition's format, written here from its definition, not from liverseg.kaggle: pairs of a 1-indexed
    start and a run length over the slice flattened column-major (down the first column, then the next)."""
    nums = [int(v) for v in rle.split()]
    assert len(nums) % 2 == 0
    flat = [0] * (rows * cols)
    for start, length in zip(nums[0::2], nums[1::2]):
        for i in range(start - 1, start - 1 + length):
            flat[i] = 1
    out = np.zeros((rows, cols), np.uint8)
    for i, v in enumerate(flat):
        out[i % rows, i // rows] = v
    return out


def test_decoder_follows_the_worked_example():
    want = np.zeros((3, 2), np.uint8)
    want[1, 0] = want[2, 0] = want[0, 1] = 1  # flattened column-major: [0, 1, 1, 1, 0, 0]
    assert np.array_equal(decode("2 3", 3, 2), want)
    assert not decode("1 0", 3, 2).any()


def _snakemake(wd, *args):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(wd), "--cores", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _phantom(path_img, path_lab, seed):
    from liverseg.phantom import PhantomSpec, write_case

    path_img.parent.mkdir(parents=True, exist_ok=True)
    lab = path_lab or path_img.parent / f"_drop_{seed}.nii.gz"
    lab.parent.mkdir(parents=True, exist_ok=True)
    write_case(seed, path_img, lab, PhantomSpec(size=40, slices=12))
    if path_lab is None:
        lab.unlink()


@pytest.fixture(scope="module")
def competition(tmp_path_factory):
    root = tmp_path_factory.mktemp("aio2025liverseg")
    for i in range(6):
        _phantom(root / "train/volume" / f"volume-{i}.nii", root / "train/segmentation" / f"segmentation-{i}.nii", 300 + i)
    _phantom(root / "test" / "volume-80.nii", None, 380)
    _phantom(root / "test" / "test-volume-81.nii", None, 381)
    # The sample's order is not the default one (81 before 80): the export must follow it exactly.
    ids = [f"cell_81_{z}" for z in range(12)] + [f"cell_80_{z}" for z in range(12)]
    (root / "sample_submission.csv").write_text("id,rle\n" + "".join(f"{i},1 0\n" for i in ids))
    wd = tmp_path_factory.mktemp("run")
    cfg = {**TINY, "dataset": {"source": "directory", "directory": str(root)},
           "kaggle": {"train_on_all": True, "experiment": "v2_unetpp_cca"}}
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = _snakemake(wd, "kaggle")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root, wd, ids


def test_competition_root_gives_a_submission_in_the_sample_order(competition):
    root, wd, ids = competition
    res = wd / "results"
    split = json.loads((res / "split/split.json").read_text())
    assert split["predict"] == ["80", "81"] and split["test"] == []  # train_on_all: no held-out labelled case
    assert sorted(split["train"] + split["val"], key=int) == [str(i) for i in range(6)]
    rows = list(csv.DictReader(open(res / "kaggle/submission.csv")))
    assert [r["id"] for r in rows] == ids  # every sample id once, in the sample's order; no training case
    for r in rows:
        vol, z = r["id"].split("_")[1], int(r["id"].split("_")[2])
        pred = np.asanyarray(nib.load(res / "postprocess/v2_unetpp_cca" / f"{vol}.nii.gz").dataobj)
        assert np.array_equal(decode(r["rle"], *pred.shape[:2]), (pred[:, :, z] > 0).astype(np.uint8)), r["id"]
    assert any(r["rle"] != "1 0" for r in rows)  # the tiny model found something to encode


def test_a_sample_id_without_prediction_is_one_line(competition):
    root, wd, ids = competition
    sample = root / "sample_submission.csv"
    kept = sample.read_text()
    sample.write_text(kept + "cell_82_0,1 0\n")
    try:
        r = _snakemake(wd, "kaggle")
    finally:
        sample.write_text(kept)
    assert r.returncode != 0
    log = (wd / "results/logs/kaggle/submission.log").read_text().strip().splitlines()
    assert log[-1].startswith("liverseg kaggle: error: sample submission id cell_82_0 has no prediction: volume 82"), log
    assert not (wd / "results/kaggle/submission.csv").exists()  # a failed export leaves nothing that looks finished
    r = _snakemake(wd, "kaggle")  # the sample restored: only the export reruns, and the others tests' file is back
    assert r.returncode == 0 and (wd / "results/kaggle/submission.csv").exists(), r.stderr[-2000:]


def test_without_a_sample_ids_follow_the_volume_number(competition, tmp_path):
    from liverseg.kaggle import write_submission

    _, wd, _ = competition
    post = wd / "results/postprocess/v2_unetpp_cca"
    n = write_submission({"81": str(post / "81.nii.gz"), "80": str(post / "80.nii.gz")}, tmp_path / "s.csv")
    got = [r["id"] for r in csv.DictReader(open(tmp_path / "s.csv"))]
    assert n == 24 and got == [f"cell_80_{z}" for z in range(12)] + [f"cell_81_{z}" for z in range(12)]


def test_decathlon_tree_segments_its_images_ts(tmp_path):
    root = tmp_path / "Task03_Liver"
    for i in range(5):
        _phantom(root / "imagesTr" / f"liver_{i}.nii.gz", root / "labelsTr" / f"liver_{i}.nii.gz", 400 + i)
    _phantom(root / "imagesTs" / "liver_90.nii.gz", None, 490)
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "config.yaml").write_text(yaml.safe_dump({**TINY, "dataset": {"source": "directory", "directory": str(root)}}))
    r = _snakemake(wd)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = wd / "results"
    split = json.loads((res / "split/split.json").read_text())
    assert split["predict"] == ["liver_90"] and split["test"]
    out = nib.load(res / "postprocess/v2_unetpp_cca/liver_90.nii.gz")
    src = nib.load(root / "imagesTs/liver_90.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert (res / "report/summary.md").exists()
