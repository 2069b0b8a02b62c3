"""The demo DAG through a real SLURM (sbatch, sacct) with profiles/slurm.

.ci/run brings up a one-node cluster (tests/slurm/up.sh) before the tests and stops it after. Outside CI the test
skips when no SLURM controller answers; under CI=true an unreachable SLURM is a failure.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import ROOT, write_nifti
from test_workflow import TINY

pytestmark = pytest.mark.slow
TIMEOUT = 1200


def _slurm_reachable():
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        return "sbatch/sacct not installed"
    r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if r.returncode != 0 or "UP" not in r.stdout:
        return "no SLURM controller answers `scontrol ping`"
    r = subprocess.run(["sacct", "-n", "-X", "-S", "now-1minutes"], capture_output=True, text=True)
    if r.returncode != 0:
        return "sacct does not work (no slurmdbd)"
    return None


@pytest.fixture(scope="module")
def slurm():
    why = _slurm_reachable()
    if why:
        msg = f"SLURM not reachable: {why} (start one with `tests/slurm/up.sh`)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)


def run_on_slurm(workdir, *targets):
    # targets first: --set-resources takes every argument after it
    cmd = ["timeout", "-k", "10", str(TIMEOUT), sys.executable, "-m", "snakemake", *targets, "-s", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--profile", str(ROOT / "profiles" / "slurm"), "--slurm-no-account",
           "--jobs", "4", "--slurm-init-seconds-before-status-checks", "5", "--latency-wait", "5",
           "--retries", "0", "--set-resources",
           *[f"{r}:mem_mb=1500" for r in ("predict",
                                          "preprocess", "postprocess", "evaluate_case", "overlay", "make_phantom")]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def submitted(log_text):
    """{slurm job id: rule} from the plugin's 'submitted with SLURM jobid N (log: .../rule_NAME/...)' lines."""
    out = {}
    for m in re.finditer(r"SLURM jobid (\d+) \(log: ([^)]*)\)", log_text):
        rule = re.search(r"rule_([A-Za-z0-9_]+?)(?:/|_wildcards|$)", m.group(2))
        group = re.search(r"group_([A-Za-z0-9_]+)", m.group(2))
        out[m.group(1)] = rule.group(1) if rule else (f"group:{group.group(1)}" if group else m.group(2))
    return out


def sacct(ids, fields=("Partition", "State")):
    r = subprocess.run(["sacct", "-n", "-P", "-X", "-o", ",".join(("JobID",) + tuple(fields)), "-j", ",".join(ids)],
                       capture_output=True, text=True, check=True)
    return {j: tuple(rest) for j, *rest in (line.split("|") for line in r.stdout.split())}


def test_demo_dag_through_sbatch(slurm, tmp_path):
    # device auto: training and prediction ask SLURM for a GPU (the CI node's GPUs are fake; the jobs fall back to CPU)
    # threads 1 + workers 1: a training job must get its threads plus its loader workers as CPUs (2), not the
    # profile's default nor its threads alone (1 either way)
    cfg = {**TINY, "experiments": ["v2_unetpp_cca", "v4_cascade"],
           "train": {**TINY["train"], "device": "auto", "threads": 1, "workers": 1},
           "cluster": {"cpu_partition": "cpu", "gpu_partition": "gpu", "account": "", "gpu_model": "fake"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_on_slurm(tmp_path)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    jobs = submitted(text)
    rules = set(jobs.values())
    for rule in ("make_phantom", "preprocess", "train", "predict"):
        assert rule in rules, (rule, rules)
    # per-case steps after prediction go as grouped jobs (profile `groups:`), one sbatch per case and experiment
    assert "group:per_case_evaluate_case_overlay_postprocess" in rules, rules
    # local rules never go through sbatch
    assert not rules & {"list_cases", "split", "aggregate_metrics", "summarize", "all"}
    states = sacct(list(jobs))
    assert set(states) == set(jobs)
    assert all(s == "COMPLETED" for _, s in states.values()), states
    for jid, rule in jobs.items():
        expected = "gpu" if rule in ("train", "predict") else "cpu"
        assert states[jid][0] == expected, (rule, states[jid])
    alloc = sacct([j for j, rule in jobs.items() if rule == "train"], ("AllocCPUS", "ReqMem"))
    assert alloc and all(int(cpus) == 2 for cpus, _ in alloc.values()), alloc
    # train keeps its own mem_mb: its role's base plus its largest training or validation case (train_sized)
    from liverseg import resources as jobres
    from liverseg.config import validate
    from liverseg.roles import ROLES

    split = json.loads((tmp_path / "results" / "split" / "split.json").read_text())
    largest = max(jobres.h5_mb(tmp_path / "results" / "preprocess" / f"{c}.h5") for c in split["train"] + split["val"])
    tspec = validate(json.loads(json.dumps(cfg)))["resources"]["train"]
    want = {f"{jobres.mem_mb(tspec, largest, base=ROLES[r]['mem_mb'])}M" for r in ("classifier", "model_a", "model_b")}
    assert {mem for _, mem in alloc.values()} == want, (alloc, want)
    assert {int(mem.rstrip("M")) // 1000 for _, mem in alloc.values()} == {8, 12}, alloc  # roles.py: 8000 / 12000 MB
    # GPU jobs (device auto on a cluster executor) ask for the configured GPU type: --gpus=fake:1
    tres = sacct([j for j, rule in jobs.items() if rule in ("train", "predict")], ("ReqTRES",))
    assert tres and all("gres/gpu:fake=1" in t for (t,) in tres.values()), tres
    # check_case keeps its own mem_mb and runtime: computed from the case's header (liverseg.resources)

    ph = tmp_path / "results" / "ingest" / "phantom"
    mb = jobres.volume_mb([ph / "volume-0.nii.gz", ph / "segmentation-0.nii.gz"])
    spec = validate({})["resources"]["check_case"]
    checks = sacct([j for j, rule in jobs.items() if rule == "check_case"], ("ReqMem", "Timelimit"))
    assert checks and set(checks.values()) == {(f"{jobres.mem_mb(spec, mb)}M",
                                                f"00:{jobres.runtime(spec, mb):02d}:00")}, checks
    res = tmp_path / "results"
    split = yaml.safe_load((res / "split" / "split.json").read_text())
    for exp in cfg["experiments"]:
        for stage in ("raw", "post"):
            assert (res / "evaluate" / exp / stage / "per_case.tsv").exists()
        for case in split["test"]:
            assert (res / "report" / "overlays" / exp / f"{case}.png").exists()
    assert "V4 cascade" in (res / "report" / "summary.md").read_text()


def test_failing_job_is_reported_as_failed(slurm, tmp_path):
    good = np.random.default_rng(0).integers(-200, 300, size=(16, 16, 6)).astype(np.int16)
    write_nifti(tmp_path / "good.nii.gz", good)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti at all" * 10)
    (tmp_path / "samples.tsv").write_text("case_id\timage\ngood\tgood.nii.gz\nbad\tbad.nii.gz\n")
    cfg = {"dataset": {"source": "samplesheet", "samplesheet": str(tmp_path / "samples.tsv")},
           "slices": {"size": 32}, "cluster": {"cpu_partition": "cpu", "gpu_partition": "gpu", "account": ""}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_on_slurm(tmp_path, "results/preprocess/good.h5", "results/preprocess/bad.h5")
    text = r.stdout + r.stderr
    assert r.returncode not in (0, 124, 137), text[-3000:]  # failed, and did not hang into the timeout
    assert (tmp_path / "results/preprocess/good.h5").exists(), text[-3000:]
    import h5py

    with h5py.File(tmp_path / "results/preprocess/good.h5") as f:  # the good case's job finished its output
        assert f.attrs["case_id"] == "good" and f["image"].shape == (6, 32, 32) and "label" not in f
    assert not (tmp_path / "results/preprocess/bad.h5").exists()
    log = (tmp_path / "results/logs/preprocess/bad.log").read_text().strip().splitlines()
    assert log[-1].startswith("liverseg preprocess: error: case bad: cannot read image")
    states = sacct(list(submitted(text)))
    # SLURM jobs: the two checks and the good case's preprocessing completed (the bad case's check records its
    # verdict and succeeds, so the other cases go on); the bad case's preprocessing is the one failed job
    # (split and plan are local rules)
    assert sorted(s for _, s in states.values()) == ["COMPLETED"] * 3 + ["FAILED"], states
