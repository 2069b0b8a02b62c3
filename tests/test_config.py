import subprocess
import sys

import pytest
import yaml

from liverseg import config
from liverseg.errors import ConfigError

from conftest import ROOT


def test_defaults_are_filled():
    cfg = config.load(None)
    assert cfg["window"] == {"mode": "fixed", "lower": -150, "upper": 250}
    assert cfg["train"]["model_a"]["encoder"] == "resnet18"
    assert cfg["postprocess"]["connectivity"] == 26


def test_repo_config_is_valid():
    cfg = config.load(ROOT / "config.yaml")
    assert cfg["dataset"]["source"] == "phantom"


@pytest.mark.parametrize("bad, key", [
    ({"window": {"lower": "low"}}, "window.lower"),
    ({"slices": {"size": 8}}, "slices.size"),
    ({"dataset": {"source": "ftp"}}, "dataset.source"),
    ({"experiments": ["v9"]}, "experiments.0"),
    ({"train": {"model_a": {"epochs": 0}}}, "train.model_a.epochs"),
])
def test_bad_values_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(None, bad)


def test_snakemake_stops_on_a_bad_value_naming_the_key(tmp_path):
    cfg = yaml.safe_load(open(ROOT / "config.yaml"))
    cfg["slices"]["context"] = 9
    cfg["results"] = str(tmp_path / "res")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(tmp_path / "c.yaml")],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0
    assert "context" in (r.stdout + r.stderr) and "9" in (r.stdout + r.stderr)


def test_a_renamed_key_says_what_it_became():
    with pytest.raises(ConfigError, match=r"'train.model_b.z_margin': renamed to z_margin_mm"):
        config.validate({"train": {"model_b": {"z_margin": 2}}})
