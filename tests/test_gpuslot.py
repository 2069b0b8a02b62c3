"""One GPU per job on a multi-GPU workstation (liverseg.gpuslot), tested with a fake two-GPU machine: the slot
count comes from the command line as the workflow passes it (config resources.local_gpus), no GPU needed."""

import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from liverseg.gpuslot import devices

# The job: write the GPUs it was given, then hold them until told to finish.
JOB = ("import os, sys, time\n"
       "open(sys.argv[1] + '.tmp', 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))\n"
       "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
       "while not os.path.exists(sys.argv[2]): time.sleep(0.02)\n")


def _start(tmp_path, name, *opts, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update({"PYTHONPATH": str(ROOT / "workflow"), **(env_extra or {})})
    cmd = [sys.executable, "-m", "liverseg.gpuslot", *opts, "--lock-dir", str(tmp_path / "locks"), "--",
           sys.executable, "-c", JOB, str(tmp_path / f"{name}.seen"), str(tmp_path / f"{name}.done")]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def _seen(tmp_path, name, timeout=20.0):
    p = tmp_path / f"{name}.seen"
    end = time.monotonic() + timeout
    while not p.exists():
        assert time.monotonic() < end, f"job {name} never started"
        time.sleep(0.02)
    return p.read_text()


def _finish(tmp_path, proc, name):
    (tmp_path / f"{name}.done").touch()
    assert proc.wait(timeout=20) == 0, proc.stderr.read()


def test_two_jobs_get_their_own_gpu_and_a_third_waits(tmp_path):
    a = _start(tmp_path, "a", "--slots", "2")
    b = _start(tmp_path, "b", "--slots", "2")
    try:
        assert {_seen(tmp_path, "a"), _seen(tmp_path, "b")} == {"0", "1"}
        c = _start(tmp_path, "c", "--slots", "2")
        time.sleep(2.0)  # both slots are held: the third job has not started
        assert not (tmp_path / "c.seen").exists()
        freed = _seen(tmp_path, "a")
        _finish(tmp_path, a, "a")
        assert _seen(tmp_path, "c") == freed  # it gets the slot that was given back
        _finish(tmp_path, b, "b")
        _finish(tmp_path, c, "c")
        assert "waiting" in c.stderr.read()
    finally:
        for p in (a, b):
            p.kill()


def test_a_job_of_several_gpus_takes_that_many_slots(tmp_path):
    a = _start(tmp_path, "a", "--slots", "2", "--take", "2")
    assert _seen(tmp_path, "a") == "0,1"
    _finish(tmp_path, a, "a")
    r = subprocess.run([sys.executable, "-m", "liverseg.gpuslot", "--slots", "1", "--take", "2",
                        "--lock-dir", str(tmp_path / "locks"), "--", "true"],
                       env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")}, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("liverseg gpuslot: error: a job needs 2")


def test_slots_follow_a_set_cuda_visible_devices_and_zero_slots_leave_it_alone(tmp_path):
    a = _start(tmp_path, "a", "--slots", "2", env_extra={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert _seen(tmp_path, "a") == "5"
    _finish(tmp_path, a, "a")
    # a cluster job (--slots 0): the scheduler's CUDA_VISIBLE_DEVICES, or none, reaches the command unchanged
    b = _start(tmp_path, "b", "--slots", "0", env_extra={"CUDA_VISIBLE_DEVICES": "3"})
    assert _seen(tmp_path, "b") == "3"
    _finish(tmp_path, b, "b")
    c = _start(tmp_path, "c", "--slots", "0")
    assert _seen(tmp_path, "c") == "<unset>"
    _finish(tmp_path, c, "c")


def test_devices():
    assert devices(2, None) == ["0", "1"]
    assert devices(2, "4,6") == ["4", "6"]
    assert devices(1, "4,6") == ["4"]
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES lists 1 device"):
        devices(2, "4")  # never hand out a GPU the user excluded


def test_runs_that_see_the_gpus_through_different_lists_never_share_one(tmp_path):
    """Run A sees only GPU 1 (its slot 0), run B sees GPUs 0,1: while A holds GPU 1, B's free GPU is 0. Locks
    named after slots would give B its slot 1, which is GPU 1 as well."""
    a = _start(tmp_path, "a", "--slots", "1", env_extra={"CUDA_VISIBLE_DEVICES": "1"})
    try:
        assert _seen(tmp_path, "a") == "1"
        b = _start(tmp_path, "b", "--slots", "2", env_extra={"CUDA_VISIBLE_DEVICES": "0,1"})
        assert _seen(tmp_path, "b") == "0"
        _finish(tmp_path, b, "b")
        _finish(tmp_path, a, "a")
    finally:
        a.kill()
