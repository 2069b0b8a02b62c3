import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
REALDATA = ROOT.parent / "shared" / "realdata"


def realdata(*parts) -> Path:
    """Path into ../shared/realdata; skips when absent, but fails under CI=true (CI must test real data)."""
    p = REALDATA.joinpath(*parts)
    if not p.exists():
        msg = f"real data not found at {p} (expected ../shared/realdata beside the project)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI=true requires it")
        pytest.skip(msg)
    return p


def write_nifti(path, arr, affine=None, dtype=None):
    affine = np.eye(4) if affine is None else affine
    img = nib.Nifti1Image(np.asarray(arr) if dtype is None else np.asarray(arr).astype(dtype), affine)
    nib.save(img, str(path))
    return str(path)


@pytest.fixture
def tiny_case(tmp_path):
    """A small phantom case (64 x 64 x 24) as volume/segmentation NIfTI files."""
    from liverseg.phantom import PhantomSpec, write_case

    img, lab = tmp_path / "volume-1.nii.gz", tmp_path / "segmentation-1.nii.gz"
    write_case(1, img, lab, PhantomSpec(size=64, slices=24))
    return img, lab


TINY_TRAIN = {
    "seed": 0, "workers": 0, "threads": 1, "device": "cpu",
    "classifier": {"encoder": "resnet18", "encoder_depth": 3, "input_size": 32, "batch_size": 4, "epochs": 2,
                   "samples_per_epoch": 8},
    "model_a": {"encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": [16, 8, 8], "batch_size": 4,
                "epochs": 2, "samples_per_epoch": 8},
    "model_b": {"encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": [16, 8, 8], "batch_size": 4,
                "epochs": 2, "samples_per_epoch": 8, "crop_margin": 2, "patch_size": 16, "z_margin_mm": 1, "box_shift": 2},
    "v3_convlstm": {"encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": [16, 8, 8], "batch_size": 2,
                    "epochs": 2, "samples_per_epoch": 4, "seq_len": 3},
    "v1_3dcnn": {"channels_3d": [4, 8, 16], "patch_depth": 8, "patch_size": 32, "batch_size": 2, "epochs": 2,
                 "samples_per_epoch": 4},
}


def tiny_config(**over):
    from liverseg import config

    cfg = {"slices": {"size": 32, "context": 1}, "train": TINY_TRAIN}
    import copy

    cfg = copy.deepcopy(cfg)
    config._merge(cfg, over)
    return config.validate(cfg)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """Four small phantom cases preprocessed to HDF5 (32 x 32 slices) and a split: 2 train, 1 val, 1 test."""
    from liverseg.phantom import PhantomSpec, write_case
    from liverseg.plan import spacing_to_fit
    from liverseg.preprocess import preprocess_case

    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for i in range(4):
        write_case(100 + i, root / f"volume-{i}.nii.gz", root / f"segmentation-{i}.nii.gz", PhantomSpec(size=48, slices=16))
    mm = spacing_to_fit([root / f"volume-{i}.nii.gz" for i in range(4)], 32)  # one grid for all, as a plan gives
    for i in range(4):
        paths[str(i)] = str(root / f"{i}.h5")
        preprocess_case(str(i), root / f"volume-{i}.nii.gz", paths[str(i)], label_path=root / f"segmentation-{i}.nii.gz",
                        size=32, spacing_mm=mm)
    split = {"train": ["0", "1"], "val": ["2"], "test": ["3"], "predict": [], "seed": 0, "folds": 1, "fold": 0}
    return root, paths, split


def fit(role, paths, split, cfg, out_dir, checkpoint_dir, needs=None, **kw):
    """Train ``role`` on the split's train/val cases into the standard files of ``out_dir`` (as the rule does)."""
    from liverseg.train import train

    out_dir = Path(out_dir)
    outputs = {"model": out_dir / "model.pt", "spec": out_dir / "model.json", "log": out_dir / "log.csv",
               "curves": out_dir / "curves.png"}
    kw.setdefault("threads", 1)
    kw.setdefault("device", cfg["train"]["device"])  # how the job runs: passed apart from the config, as the rule does
    kw.setdefault("workers", cfg["train"]["workers"])
    return train(role, [paths[c] for c in split["train"]], [paths[c] for c in split["val"]], cfg, outputs,
                 checkpoint_dir, needs=needs, **kw)
