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
