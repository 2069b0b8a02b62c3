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
    """The device id of each slot: the entries of CUDA_VISIBLE_DEVICES when set, else 0..slots-1."""
    listed = [d.strip() for d in (visible or "").split(",") if d.strip() not in ("", "-1")]
    return [listed[i] if i < len(listed) else str(i) for i in range(slots)] if visible is not None else [str(i) for i in range(slots)]


def try_take(lock_dir: Path, slots: int, take: int) -> list[tuple[int, int]]:
    """Lock ``take`` free slots of ``slots`` without waiting: [(slot, fd)], or [] (nothing held) when too few
    are free."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    held = []
    for i in range(slots):
        fd = os.open(lock_dir / f"gpu{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        held.append((i, fd))
        if len(held) == take:
            return held
    for _, fd in held:
        os.close(fd)
    return []


def take_slots(lock_dir: Path, slots: int, take: int, poll_s: float = POLL_S) -> list[tuple[int, int]]:
    """Wait until ``take`` slots are free and lock them."""
    if take > slots:
        raise SystemExit(f"liverseg gpuslot: error: a job needs {take} GPUs but this machine has {slots} "
                         "(resources.local_gpus, train.gpus)")
    waited = False
    while True:
        held = try_take(lock_dir, slots, take)
        if held:
            return held
        if not waited:
            log.warning("all %d GPU slot(s) in %s are taken; waiting for one", slots, lock_dir)
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
        held = take_slots(a.lock_dir or default_lock_dir(), a.slots, a.take)
        for _, fd in held:
            os.set_inheritable(fd, True)  # the command keeps the lock for as long as it runs
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[i] for i, _ in held)
        log.info("CUDA_VISIBLE_DEVICES=%s", os.environ["CUDA_VISIBLE_DEVICES"])
    os.execvp(cmd[0], cmd)
    return 127  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
