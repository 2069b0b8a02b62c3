import json
import time

import numpy as np
import pytest

from liverseg.ingest import discover, discover_directory, read_samplesheet, write_case_table, read_case_table
from liverseg.errors import ConfigError

from conftest import write_nifti

A = np.zeros((4, 4, 4), np.int16)


def _touch(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(p, A)


def test_lits_flat_padded_and_unpadded(tmp_path):
    for name in ["volume-0.nii", "segmentation-0.nii", "volume-070.nii.gz", "segmentation-070.nii.gz",
                 "volume-5.nii.gz", "notes.txt", "._volume-9.nii"]:
        _touch(tmp_path / name) if name.endswith((".nii", ".gz")) else (tmp_path / name).write_text("x")
    d = discover_directory(tmp_path)
    assert [c.case_id for c in d.cases] == ["0", "5", "70"]
    by = {c.case_id: c for c in d.cases}
    assert by["70"].label.endswith("segmentation-070.nii.gz")
    assert by["5"].label is None and not by["5"].labelled  # a volume without a label is predict-only
    assert d.rejected == []


def test_lits_subfolders(tmp_path):
    _touch(tmp_path / "volume" / "volume-3.nii")
    _touch(tmp_path / "segmentation" / "segmentation-3.nii")
    d = discover_directory(tmp_path)
    assert len(d.cases) == 1 and d.cases[0].labelled


def test_duplicate_ids_are_rejected(tmp_path):
    _touch(tmp_path / "volume-7.nii")
    _touch(tmp_path / "volume-007.nii.gz")
    d = discover_directory(tmp_path)
    assert d.cases == []
    assert d.rejected[0][0] == "7" and "duplicate" in d.rejected[0][1]


def test_decathlon_layout(tmp_path):
    _touch(tmp_path / "imagesTr" / "liver_0.nii.gz")
    _touch(tmp_path / "labelsTr" / "liver_0.nii.gz")
    _touch(tmp_path / "imagesTs" / "liver_132.nii.gz")
    _touch(tmp_path / "imagesTr" / "._liver_0.nii.gz")
    d = discover_directory(tmp_path)
    assert [(c.case_id, c.labelled) for c in d.cases] == [("liver_0", True), ("liver_132", False)]


def test_samplesheet_relative_paths_and_bad_ids(tmp_path):
    (tmp_path / "s.tsv").write_text(
        "case_id\timage\tlabel\n"
        "good_1\timgs/a.nii.gz\tlabs/a.nii.gz\n"
        "pred-2\timgs/b.nii.gz\t\n"
        "bad id\timgs/c.nii.gz\t\n"
        "quo'te\timgs/d.nii.gz\t\n"
        "good_1\timgs/e.nii.gz\t\n"
    )
    d = read_samplesheet(tmp_path / "s.tsv")
    assert [c.case_id for c in d.cases] == ["pred-2"]
    assert d.cases[0].image == str(tmp_path / "imgs" / "b.nii.gz")
    reasons = dict(d.rejected)
    assert "letters, digits" in reasons["bad id"] and "letters, digits" in reasons["quo'te"]
    assert "duplicate" in reasons["good_1"]
    write_case_table(d, tmp_path / "cases.tsv")
    rows = read_case_table(tmp_path / "cases.tsv")
    assert {r["status"] for r in rows} == {"predict-only", "rejected"}


def test_samplesheet_missing_column(tmp_path):
    (tmp_path / "s.tsv").write_text("id\timage\n1\ta.nii\n")
    with pytest.raises(ConfigError, match="case_id"):
        read_samplesheet(tmp_path / "s.tsv")


def test_discover_from_config(tmp_path):
    cfg = {"results": "res", "dataset": {"source": "phantom", "phantom": {"n_cases": 3}}}
    d = discover(cfg)
    assert [c.image for c in d.cases][0] == "res/ingest/phantom/volume-0.nii.gz"
    with pytest.raises(ConfigError, match="dataset.directory is empty"):
        discover({"results": "r", "dataset": {"source": "directory", "directory": ""}})


def test_samplesheet_columns_follow_the_schema(tmp_path):
    """A misspelt column is an error (it would silently make labelled cases predict-only), per the sheet schema."""
    (tmp_path / "s.tsv").write_text("case_id\timage\tlable\n1\ta.nii\tb.nii\n")
    with pytest.raises(ConfigError, match="'lable' was unexpected"):
        read_samplesheet(tmp_path / "s.tsv")
    (tmp_path / "ok.tsv").write_text("case_id\timage\tlabel\n1\ta.nii\t\n2\tb.nii\tc.nii\n")
    found = read_samplesheet(tmp_path / "ok.tsv")
    assert [c.labelled for c in found.cases] == [False, True]


def test_competition_root_as_downloaded(tmp_path):
    """aio2025liverseg: train/volume + train/segmentation labelled, test/ predict-only (any LiTS naming)."""
    for i in (0, 7):
        for kind, sub in (("volume", "train/volume"), ("segmentation", "train/segmentation")):
            (tmp_path / sub).mkdir(parents=True, exist_ok=True)
            (tmp_path / sub / f"{kind}-{i}.nii").write_bytes(b"")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "volume-80.nii").write_bytes(b"")
    (tmp_path / "test" / "test-volume-081.nii").write_bytes(b"")
    (tmp_path / "sample_submission.csv").write_text("id,rle\n")
    found = discover_directory(tmp_path)
    assert [(c.case_id, c.labelled) for c in found.cases] == [("0", True), ("7", True), ("80", False), ("81", False)]
    assert found.rejected == []
    (tmp_path / "test" / "volume-7.nii").write_bytes(b"")  # a test volume reusing a training number
    (tmp_path / "test" / "segmentation-80.nii").write_bytes(b"")  # a label inside test/ is not training data
    found = discover_directory(tmp_path)
    assert [(c.case_id, c.labelled) for c in found.cases] == [("0", True), ("7", True), ("80", False), ("81", False)]
    assert [r[0] for r in found.rejected] == ["test-7"]


def test_lits_test_volumes_never_take_training_numbers_or_labels(tmp_path):
    """LiTS numbers its test set 0-69, like its training set: test-volume-N beside the training files is ignored,
    and a test volume never pairs with a training label of the same number."""
    for name in ("volume-0.nii", "segmentation-0.nii", "volume-1.nii", "segmentation-1.nii", "test-volume-0.nii",
                 "test-volume-1.nii"):
        (tmp_path / name).write_bytes(b"")
    found = discover_directory(tmp_path)
    assert [(c.case_id, c.labelled) for c in found.cases] == [("0", True), ("1", True)] and not found.rejected
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    for name in ("volume-0.nii", "segmentation-0.nii"):
        (tmp_path / name).rename(tmp_path / "train" / name)
    (tmp_path / "train" / "segmentation-80.nii").write_bytes(b"")  # a stray training label numbered like a test volume
    (tmp_path / "test" / "volume-80.nii").write_bytes(b"")
    found = discover_directory(tmp_path)
    cases = {c.case_id: c for c in found.cases}
    assert not cases["80"].labelled and cases["0"].labelled


def test_an_unexpected_failure_is_a_verdict_not_a_crash(tmp_path, monkeypatch):
    """A bug or an exotic file that raises something other than CaseError still records a verdict, so the split
    (which waits for every verdict) goes on without the case."""
    import json

    import liverseg.ingest as ingest

    def boom(*a, **k):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(ingest, "load_nifti", boom)
    status = ingest.check_case("c9", tmp_path / "v.nii.gz", tmp_path / "c9.json")
    assert status["ok"] is False and status["error"].startswith("case c9: unexpected error while reading it")
    assert "MemoryError: cannot allocate" in status["error"]
    assert json.loads((tmp_path / "c9.json").read_text()) == status


# ------------------------------------------------------------------ a check that crashes still leaves a verdict
def _unknown_dtype_nifti(path):
    """A NIfTI whose header names data type code 999: nibabel raises HeaderDataError, which nothing expects."""
    import struct

    write_nifti(path, np.arange(64, dtype=np.int16).reshape(4, 4, 4))
    raw = bytearray(path.read_bytes())
    struct.pack_into("<h", raw, 70, 999)  # the datatype field of the NIfTI-1 header
    path.write_bytes(bytes(raw))
    return path


def _big_volume(path, slices=300):
    """512 x 512 x ``slices`` int16 (150 MB in memory at 300) that compresses to about a megabyte."""
    a = np.zeros((512, 512, slices), np.int16)
    a[::7, ::5, ::3] = 40
    return write_nifti(path, a)


def _check_cli(*args):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    return subprocess.run([sys.executable, "-m", "liverseg", "check", *map(str, args)], capture_output=True,
                          text=True, env=env)


def test_an_unexpected_reader_exception_is_a_verdict(tmp_path):
    from liverseg.ingest import check_case_isolated

    status = check_case_isolated("odd", _unknown_dtype_nifti(tmp_path / "odd.nii"), tmp_path / "odd.json")
    assert not status["ok"] and "HeaderDataError" in status["error"] and status["error"].startswith("case odd: ")
    assert json.loads((tmp_path / "odd.json").read_text()) == status


def test_a_check_over_its_memory_limit_fails_with_a_verdict_and_a_small_case_passes(tmp_path):
    big = _big_volume(tmp_path / "big.nii.gz")
    r = _check_cli("--case", "big", "--image", big, "--max-memory-mb", 400, tmp_path / "big.json")
    assert r.returncode == 0, r.stderr[-2000:]  # the job succeeds, so the other cases go on
    v = json.loads((tmp_path / "big.json").read_text())
    assert not v["ok"] and v["error"] == (
        "case big: out of memory while reading it (limit 400 MB, the job's mem_mb): raise "
        "resources.check_case.mem_per_mb in the config and rerun with --forcerun check_case (or delete "
        f"{tmp_path / 'big.json'})"), v
    assert r.stderr.strip().splitlines()[-1] == f"liverseg check: error: {v['error']}"
    # the same limit is plenty for a small case, and the big one passes without it: the limit made the difference
    small = write_nifti(tmp_path / "small.nii.gz", np.arange(4096, dtype=np.int16).reshape(16, 16, 16))
    assert _check_cli("--case", "s", "--image", small, "--max-memory-mb", 400, tmp_path / "s.json").returncode == 0
    assert json.loads((tmp_path / "s.json").read_text())["ok"]
    assert _check_cli("--case", "big", "--image", big, tmp_path / "big2.json").returncode == 0
    assert json.loads((tmp_path / "big2.json").read_text())["ok"]


def test_a_check_killed_by_a_signal_is_a_verdict(tmp_path):
    """What the out-of-memory killer does: SIGKILL to the process reading the case, which can write nothing."""
    import multiprocessing
    import os
    import signal
    import threading

    from liverseg.ingest import check_case_isolated

    big = _big_volume(tmp_path / "big.nii.gz")
    (tmp_path / "big.json").write_text('{"case": "big", "ok": true, "error": ""}\n')  # a stale verdict

    def oom_killer():
        while not multiprocessing.active_children():
            time.sleep(0.005)
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    t = threading.Thread(target=oom_killer)
    t.start()
    status = check_case_isolated("big", big, tmp_path / "big.json", max_memory_mb=8000)
    t.join()
    assert status == {"case": "big", "ok": False, "error": "case big: the check was killed by SIGKILL (the "
                      "out-of-memory killer sends this) while reading it; memory limit 8000 MB"}
    assert json.loads((tmp_path / "big.json").read_text()) == status
