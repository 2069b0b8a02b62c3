"""Give a GPU job of a local run its own GPU(s): ``python -m liverseg.gpuslot --slots N [--take K] -- CMD ...``.

Snakemake's ``--resources gpu=N`` keeps at most N GPU jobs running but does not say which GPU each may use, so
without this every job would see all GPUs and start on GPU 0.  The wrapper takes an exclusive lock (fcntl) on K
of N slot files, sets CUDA_VISIBLE_DEVICES to those slots' devices and replaces itself with CMD, which holds the
locks until it ends (however it ends: the kernel drops a lock with its process).  With the workflow's ``gpu``
limit no two jobs want the same slot; a job of another run on the same machine waits for a free one.

``--slots 0`` (cluster runs, where the scheduler sets CUDA_VISIBLE_DEVICES, and jobs without a GPU) runs CMD
untouched.  When CUDA_VISIBLE_DEVICES is already set (e.g. ``CUDA_VISIBLE_DEVICES=2,3 snakemake ...``) slot i
is the i-th device of that list.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
POLL_S = 1.0


def default_lock_dir() -> Path:
    """One folder per user and machine, so that jobs of different runs share the slots (LIVERSEG_GPU_SLOT_DIR
    overrides it)."""
    return Path(os.environ.get("LIVERSEG_GPU_SLOT_DIR") or Path(tempfile.gettempdir()) / f"liverseg-gpu-slots-{os.getuid()}")


def devices(slots: int, visible: str | None) -> list[str]:
    """The device id of each slot: the entries of CUDA_VISIBLE_DEVICES when set, else 0..slots-1.  More slots
    than listed devices would hand out GPUs the user excluded: a one-line error."""
    if visible is None:
        return [str(i) for i in range(slots)]
    listed = [d.strip() for d in visible.split(",") if d.strip() not in ("", "-1")]
    if slots > len(listed):
        raise SystemExit(f"liverseg gpuslot: error: {slots} GPU slots asked for but CUDA_VISIBLE_DEVICES lists "
                         f"{len(listed)} device(s) ({visible!r}); lower resources.local_gpus")
    return listed[:slots]


def _lock_name(device: str) -> str:
    return "gpu" + re.sub(r"[^A-Za-z0-9_-]", "_", device) + ".lock"


def try_take(lock_dir: Path, ids: list[str], take: int) -> list[tuple[str, int]]:
    """Lock ``take`` free devices of ``ids`` without waiting: [(device id, fd)], or [] (nothing held) when too
    few are free.  A lock is named after the device, not the slot, so runs that see the GPUs through different
    CUDA_VISIBLE_DEVICES lists still never share one."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = []
    for dev in ids:
        fd = os.open(lock_dir / _lock_name(dev), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((dev, fd))
        if len(held) == take:
            return held
    for _, fd in held:
        os.close(fd)
    return []


def take_slots(lock_dir: Path, ids: list[str], take: int, poll_s: float = POLL_S) -> list[tuple[str, int]]:
    """Wait until ``take`` slots are free and lock them."""
    if take > len(ids):
        raise SystemExit(f"liverseg gpuslot: error: a job needs {take} GPUs but this machine has {len(ids)} "
                         "(resources.local_gpus, train.gpus)")
    waited = False
    while True:
        held = try_take(lock_dir, ids, take)
        if held:
            return held
        if not waited:
            log.warning("all %d GPU slot(s) in %s are taken; waiting for one", len(ids), lock_dir)
            waited = True
        time.sleep(poll_s)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("liverseg gpuslot: error: usage: python -m liverseg.gpuslot --slots N [--take K] -- CMD ...")
    cut = argv.index("--")
    p = argparse.ArgumentParser(prog="python -m liverseg.gpuslot", description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, required=True, help="GPUs of this machine (0: run CMD untouched)")
    p.add_argument("--take", type=int, default=1, help="GPUs this job uses")
    p.add_argument("--lock-dir", type=Path, default=None, help="slot lock files (default: one per user in /tmp)")
    a = p.parse_args(argv[:cut])
    cmd = argv[cut + 1:]
    if not cmd:
        p.error("no command after --")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    if a.slots > 0 and a.take > 0:
        ids = devices(a.slots, os.environ.get("CUDA_VISIBLE_DEVICES"))
        held = take_slots(a.lock_dir or default_lock_dir(), ids, a.take)
        for _, fd in held:
            os.set_inheritable(fd, True)  # the command keeps the lock for as long as it runs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(dev for dev, _ in held)
        log.info("CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
