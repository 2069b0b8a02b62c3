"""Conda environments (not buildable on machines without conda channels) agree with requirements.txt, every rule
that runs code names one, and jobs find the package with a Python that has not installed it."""

import os
import re
import subprocess
import sys
import sysconfig

import pytest
import yaml

from conftest import ROOT

CONDA_TO_PIP = {"pytorch": "torch", "pytorch-gpu": "torch", "pytorch-cpu": "torch", "matplotlib-base": "matplotlib"}
# conda-only selectors with no PyPI counterpart (the CUDA runtime comes inside the PyPI torch wheel)
CONDA_ONLY = {"cuda-version"}


def _requirements():
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _env_pins(path):
    env = yaml.safe_load(open(path))
    assert env["channels"] == ["conda-forge", "nodefaults"], path
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for p in dep["pip"]:
                name, version = p.split("==")
                pins[name.lower()] = version
        elif "=" in dep:
            name, version = dep.split("=")[:2]
            pins[CONDA_TO_PIP.get(name, name).lower()] = version
    return pins


@pytest.mark.parametrize("env", sorted((ROOT / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_versions_agree_with_requirements(env):
    req = _requirements()
    pins = _env_pins(env)
    assert len(pins) >= 10
    for name, version in pins.items():
        if name == "python" or name in CONDA_ONLY:
            continue
        assert name in req, f"{env.name}: {name} is not pinned in requirements.txt"
        assert req[name] == version, f"{env.name}: {name}={version} but requirements.txt has {req[name]}"


def test_requirements_are_all_exact_pins():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", line), line


def test_every_shell_rule_has_a_conda_env():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"\n(?=rule )", text):
            if block.startswith("rule ") and "shell:" in block:
                assert "conda:" in block, f"{smk.name}: {block.splitlines()[0]} has no conda env"


def test_jobs_find_the_package_with_another_python(tmp_path):
    """A Python without liverseg installed (as in a --use-conda env) still runs the rules through PYTHONPATH."""
    env_dir = tmp_path / "otherpy"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    other = env_dir / "bin" / "python"
    site = subprocess.run([str(other), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies but not the package: a plain path entry does not process the editable-install .pth files.
    with open(os.path.join(site, "deps.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(other), "-c", "import liverseg"], capture_output=True, text=True, cwd=tmp_path, env=clean)
    assert r.returncode != 0 and "No module named 'liverseg'" in r.stderr
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"dataset": {"phantom": {"n_cases": 3, "size": 32, "slices": 8}}}))
    r = subprocess.run([str(other), "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                        "--cores", "1", "results/ingest/phantom/volume-0.nii.gz"], capture_output=True, text=True,
                       env=clean)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "results/ingest/phantom/volume-0.nii.gz").exists()


def test_imaging_env_commands_run_without_torch(tmp_path):
    """envs/imaging.yaml has no PyTorch: every command its rules run must work with torch unimportable."""
    fake = tmp_path / "notorch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch is not in the imaging environment')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(ROOT / "workflow")])}

    def run(*args):
        r = subprocess.run([sys.executable, "-m", "liverseg", *map(str, args)], cwd=tmp_path, env=env,
                           capture_output=True, text=True)
        assert r.returncode == 0, (args[0], r.stderr[-2000:])

    assert subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True).returncode != 0
    run("phantom", "--seed", 3, "--size", 48, "--slices", 12, "v.nii.gz", "s.nii.gz")
    run("check", "--case", 3, "--image", "v.nii.gz", "--label", "s.nii.gz", "c.json")
    (tmp_path / "split.json").write_text('{"train": ["3"], "val": [], "test": [], "predict": []}')
    run("plan", "--split", "split.json", "--checks", "c.json", "--size", 64, "plan.json")
    run("preprocess", "--case", 3, "--image", "v.nii.gz", "--label", "s.nii.gz", "--plan", "plan.json", "o.h5")
    run("postprocess", "--case", 3, "s.nii.gz", "p.nii.gz")
    run("evaluate-case", "--case", 3, "--pred", "p.nii.gz", "--ref", "s.nii.gz", "e.tsv")
    run("overlay", "--case", 3, "--image", "v.nii.gz", "--ref", "s.nii.gz", "--pred", "p.nii.gz", "--h5", "o.h5", "o.png")
    run("statistics", "--case", 3, "--image", "v.nii.gz", "--pred", "p.nii.gz", "st.json")
    run("statistics-table", "--out", "st.tsv", "st.json")
    # the dicom_seg rule's module (its CLI run needs a DICOM series: tests/test_dicomseg.py)
    r = subprocess.run([sys.executable, "-c", "import liverseg.dicomseg, highdicom"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def _deps(name):
    return [d for d in yaml.safe_load(open(ROOT / "envs" / name))["dependencies"] if isinstance(d, str)]


def test_gpu_env_pins_a_cuda_build_and_cpu_env_a_cpu_build():
    """conda-forge picks a CUDA build only where it detects a GPU: envs/torch.yaml must pin one (build string and
    metapackage), so an env built on a login node does not silently train on CPU; torch-cpu.yaml the CPU build."""
    gpu, cpu = _deps("torch.yaml"), _deps("torch-cpu.yaml")
    assert "pytorch=2.14.1=cuda*" in gpu and "pytorch-gpu=2.14.1" in gpu
    assert any(d.startswith("cuda-version=") for d in gpu)
    assert "pytorch=2.14.1=cpu*" in cpu and "pytorch-cpu=2.14.1" in cpu
    assert not any("cuda" in d for d in cpu)
    strip = {"pytorch=2.14.1=cuda*", "pytorch-gpu=2.14.1", "pytorch=2.14.1=cpu*", "pytorch-cpu=2.14.1"}
    assert [d for d in gpu if d not in strip and not d.startswith("cuda-version")] == [d for d in cpu if d not in strip]


def test_training_and_prediction_rules_choose_their_torch_build_per_job():
    from liverseg.runenv import torch_env_file

    assert torch_env_file("auto", True) == "../../envs/torch.yaml"
    assert torch_env_file("auto", False) == "../../envs/torch-cpu.yaml"
    assert torch_env_file("cuda", False) == "../../envs/torch.yaml"
    assert torch_env_file("cpu", True) == "../../envs/torch-cpu.yaml"
    for smk, section in (("train.smk", "train"), ("predict.smk", "predict")):
        text = (ROOT / "workflow" / "rules" / smk).read_text()
        assert f'torch_env("{section}")' in text, smk
    for f in ("torch.yaml", "torch-cpu.yaml"):
        assert (ROOT / "workflow" / "rules" / "../../envs" / f).resolve().is_file()


def test_container_recipe_installs_exactly_requirements_txt_and_the_workflow_can_use_it(tmp_path):
    """container/liverseg.def (not buildable here: no Apptainer, no registry) installs requirements.txt as is, and
    its Python comes first in a job's PATH; the Snakefile's container: directive follows software.container."""
    text = (ROOT / "container" / "liverseg.def").read_text()
    assert "requirements.txt /opt/liverseg/requirements.txt" in text
    assert "pip install --no-cache-dir -r /opt/liverseg/requirements.txt" in text
    assert "export PATH=/opt/liverseg/venv/bin:$PATH" in text
    from_line = re.search(r"^From: python:(\d+\.\d+)", text, re.M)
    env_python = [d for d in yaml.safe_load(open(ROOT / "envs" / "torch.yaml"))["dependencies"]
                  if isinstance(d, str) and d.startswith("python=")][0]
    assert from_line and env_python == f"python={from_line.group(1)}"
    assert 'container: config["software"]["container"] or None' in (ROOT / "Snakefile").read_text()
