"""Environment for the jobs a Snakemake run starts (called once by the Snakefile)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def configure(basedir: str | os.PathLike) -> None:
    """Make ``python -m liverseg`` work in every job.

    - PYTHONPATH gets ``workflow/``: under ``--use-conda`` a job runs another Python that has not installed the
      package, and must still import it from the checkout.
    - PATH starts with the directory of the Python running Snakemake, so a plain run started as
      ``.venv/bin/snakemake`` (venv not activated) runs its jobs in that venv; conda jobs put their env first.
    - HF_HUB_OFFLINE: model weights are never fetched at run time.
    """
    pkg = str(Path(basedir) / "workflow")
    old = os.environ.get("PYTHONPATH", "")
    if pkg not in old.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([pkg] + ([old] if old else []))
    exe_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [exe_dir]:
        os.environ["PATH"] = os.pathsep.join([exe_dir, path])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def local_gpus() -> int:
    """NVIDIA GPUs this machine shows (honouring CUDA_VISIBLE_DEVICES), without importing torch (the Snakefile
    calls this when it decides whether a job asks for a GPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def torch_env_file(build: str, wants_gpu: bool) -> str:
    """The conda env file (relative to workflow/rules/) of a training/prediction job: config software.torch_build
    ``cuda``/``cpu``, or ``auto`` = the CUDA build exactly for jobs that ask for a GPU, so a CPU-only workstation
    never has to build (or fail to build, without a GPU driver) the CUDA environment."""
    if build not in ("auto", "cuda", "cpu"):
        raise ValueError(f"software.torch_build must be auto, cuda or cpu, not {build!r}")
    cuda = wants_gpu if build == "auto" else build == "cuda"
    return "../../envs/torch.yaml" if cuda else "../../envs/torch-cpu.yaml"
