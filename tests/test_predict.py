import json

import cc3d
import nibabel as nib
import numpy as np
import pytest
import torch.nn.functional as F
import torch
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform

import liverseg.predict as P
from liverseg.errors import ModelFileError
from liverseg.phantom import PhantomSpec, generate
from liverseg.preprocess import preprocess_case

from conftest import fit, tiny_config, write_nifti


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("R", "A", "I"), ("A", "S", "R"), ("P", "I", "L")])
def test_prediction_lands_on_the_original_grid(tmp_path, monkeypatch, codes):
    """With an oracle in place of model A, the written prediction must equal the source label voxel for voxel."""
    img, lab, aff = generate(5, PhantomSpec(size=40, slices=40))  # cube, so every permutation keeps square slices
    aff = aff.copy()
    aff[:3, :3] = np.sign(aff[:3, :3]) * 4.0  # isotropic 4 mm voxels: every permutation keeps square pixels
    t = ornt_transform(nib.orientations.io_orientation(aff), axcodes2ornt(codes))
    img_o = np.ascontiguousarray(nib.orientations.apply_orientation(img, t))
    lab_o = np.ascontiguousarray(nib.orientations.apply_orientation(lab, t))
    aff_o = aff @ inv_ornt_aff(t, img.shape)
    ip = write_nifti(tmp_path / "volume-5.nii.gz", img_o, aff_o)
    lp = write_nifti(tmp_path / "segmentation-5.nii.gz", lab_o, aff_o)
    h5 = tmp_path / "5.h5"
    preprocess_case("5", ip, h5, label_path=lp, size=40, spacing_mm=4.0)
    _, _, attrs, label = P.read_case(h5, "5")

    spec = {"window": {"mode": "fixed", "lower": -150.0, "upper": 250.0}, "slice_size": 40, "spacing_mm": 4.0}
    monkeypatch.setattr(P, "load_ensemble", lambda *a, **k: (None, spec))

    def oracle(model, spec, image, device, on_batch=None, **kw):  # model A's probabilities = the one-hot label
        on_batch(list(range(len(label))), torch.from_numpy(np.moveaxis(np.eye(3, dtype=np.float32)[label], -1, 1)))
        return label

    monkeypatch.setattr(P, "run_a", oracle)
    P.predict_case("5", h5, P.models_in(tmp_path / "models", "model_a"), tmp_path / "pred.nii.gz", tmp_path / "s.tsv", mode="model_a")
    out = nib.load(tmp_path / "pred.nii.gz")
    assert np.allclose(out.affine, aff_o) and out.shape == img_o.shape
    assert np.array_equal(np.asanyarray(out.dataobj), lab_o)
    assert nib.aff2axcodes(out.affine) == codes


@pytest.mark.parametrize("codes", [("L", "P", "S"), ("A", "R", "I"), ("P", "I", "L")])
def test_prediction_lands_on_the_original_grid_from_non_square_anisotropic_slices(tmp_path, monkeypatch, codes):
    """As above, for a 40 x 56 in-plane matrix with 0.7 x 0.9 x 3 mm voxels, stored at 0.7 mm on an 80 x 80 grid
    (72 rows x 40 columns placed at the body's centre): the oracle's probabilities are taken off the grid and
    resampled back to 56 rows x 40 columns.  The label's 5 x 7 pixel blocks are 5 x 9 pixels at 0.7 mm, which the
    grid represents exactly, so the round trip must be exact."""
    from test_preprocess import GRID, TARGET, blocky_case

    img_o, lab_o, aff_o, _ = blocky_case(codes, seed=2)
    ip = write_nifti(tmp_path / "volume-6.nii.gz", img_o, aff_o)
    lp = write_nifti(tmp_path / "segmentation-6.nii.gz", lab_o, aff_o)
    h5 = tmp_path / "6.h5"
    preprocess_case("6", ip, h5, label_path=lp, size=GRID, spacing_mm=TARGET)
    _, _, attrs, label = P.read_case(h5, "6")
    assert label.shape[1:] == (GRID, GRID)

    spec = {"window": {"mode": "fixed", "lower": -150.0, "upper": 250.0}, "slice_size": GRID, "spacing_mm": TARGET}
    monkeypatch.setattr(P, "load_ensemble", lambda *a, **k: (None, spec))

    def oracle(model, spec, image, device, on_batch=None, **kw):  # model A's probabilities = the one-hot label
        on_batch(list(range(len(label))), torch.from_numpy(np.moveaxis(np.eye(3, dtype=np.float32)[label], -1, 1)))
        return label

    monkeypatch.setattr(P, "run_a", oracle)
    P.predict_case("6", h5, P.models_in(tmp_path / "models", "model_a"), tmp_path / "pred.nii.gz", mode="model_a")
    out = nib.load(tmp_path / "pred.nii.gz")
    assert np.allclose(out.affine, aff_o) and out.shape == img_o.shape
    assert np.allclose(out.header.get_zooms()[:3], np.linalg.norm(aff_o[:3, :3], axis=0))
    assert np.array_equal(np.asanyarray(out.dataobj), lab_o)


@pytest.fixture(scope="module")
def tiny_models(tiny_dataset, tmp_path_factory):
    _, paths, split = tiny_dataset
    out = tmp_path_factory.mktemp("models")
    for role in ("classifier", "model_a", "model_b"):
        needs = {r: str(out / r / "model.pt") for r in ("classifier", "model_a")} if role == "model_b" else None
        fit(role, paths, split, tiny_config(), out / role, out / "ck" / role, needs=needs)
    return out


def test_cascade_writes_prediction_and_gating_table(tiny_dataset, tiny_models, tmp_path):
    root, paths, _ = tiny_dataset
    s = P.predict_case("3", paths["3"], P.models_in(tiny_models, "cascade"), tmp_path / "p.nii.gz", tmp_path / "s.tsv", mode="cascade",
                       device="cpu")
    src = nib.load(root / "volume-3.nii.gz")
    out = nib.load(tmp_path / "p.nii.gz")
    assert out.shape == src.shape and np.allclose(out.affine, src.affine)
    assert out.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(out.dataobj))) <= {0, 1, 2}
    rows = (tmp_path / "s.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["slice", "classifier_score", "source", "model_a_liver_pixels_stored_grid",
                                   "final_liver_voxels"]
    assert len(rows) == 1 + s["slices"]
    # independent of the code's own count: B only ever gets slices the classifier scored at or above its threshold
    import json

    thr = json.loads((tiny_models / "classifier" / "model.json").read_text())["threshold"]
    for r in rows[1:]:
        z, score, source = r.split("\t")[:3]
        assert source in ("A", "B", "background")
        if source == "B":
            assert float(score) >= thr - 1e-5, r


def test_models_from_another_window_are_refused(tiny_dataset, tiny_models, tmp_path):
    root, _, _ = tiny_dataset
    h5 = tmp_path / "w.h5"
    preprocess_case("3", root / "volume-3.nii.gz", h5, label_path=root / "segmentation-3.nii.gz", size=32,
                    lower=-100, upper=200)
    with pytest.raises(ModelFileError, match="window mode, lower, upper, size"):
        P.predict_case("3", h5, P.models_in(tiny_models, "model_a"), tmp_path / "p.nii.gz", mode="model_a", device="cpu")
    assert not (tmp_path / "p.nii.gz").exists()


def test_predict_new_scans_dicom_and_folder(tiny_dataset, tiny_models, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, realdata

    dicom = realdata("totalseg_tests", "original", "example_ct_dicom")
    r = subprocess.run([sys.executable, "-m", "liverseg", "predict", "--models", str(tiny_models), "--device", "cpu",
                        str(dicom), str(tmp_path / "dicom_pred.nii.gz")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    out = nib.load(tmp_path / "dicom_pred.nii.gz")
    from liverseg.io import load_nifti

    src = load_nifti(dicom, "902")
    assert out.shape == src.shape == (512, 512, 20) and np.allclose(out.affine, src.affine)

    root, _, _ = tiny_dataset
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "good.nii.gz").write_bytes((root / "volume-3.nii.gz").read_bytes())
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    r = subprocess.run([sys.executable, "-m", "liverseg", "predict", "--models", str(tiny_models), "--device", "cpu",
                        str(scans), str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert "case broken: cannot read image" in r.stderr
    assert (tmp_path / "out" / "good.nii.gz").exists() and not (tmp_path / "out" / "broken.nii.gz").exists()


def test_predict_path_writes_into_an_existing_folder_and_refuses_bad_outputs(tmp_path, monkeypatch):
    from liverseg.errors import CaseError

    seen = []
    monkeypatch.setattr(P, "predict_scan", lambda src, out, models, **kw: seen.append(out) or {"out": str(out)})
    scan = tmp_path / "volume-12.nii.gz"
    scan.write_bytes(b"")
    (tmp_path / "out").mkdir()
    P.predict_path(scan, tmp_path / "out", "models")
    P.predict_path(scan, tmp_path / "out" / "x.nii.gz", "models")
    assert seen == [tmp_path / "out" / "volume-12.nii.gz", tmp_path / "out" / "x.nii.gz"]
    with pytest.raises(CaseError, match="neither an existing folder nor a .nii/.nii.gz/.dcm file"):
        P.predict_path(scan, tmp_path / "nowhere", "models")
    P.predict_path(scan, tmp_path / "new" / "x.nii.gz", "models")  # the file's folder is made when written
    assert seen[-1] == tmp_path / "new" / "x.nii.gz"
    with pytest.raises(CaseError, match="input does not exist"):
        P.predict_path(tmp_path / "missing.nii.gz", tmp_path / "out", "models")


def _stub_predict(case, h5, models, out, *a, **kw):
    """In place of the models: a liver box with a tumour inside, on the case's canonical grid, and a stray liver
    voxel that post-processing removes (so what is written differs from the raw prediction)."""
    _, geom, attrs, _ = P.read_case(h5, case)
    vol = np.zeros(tuple(int(v) for v in attrs["canonical_shape"]), np.uint8)
    nx, ny, _ = vol.shape
    vol[nx // 4: nx // 2, ny // 3: 2 * ny // 3, :] = 1
    vol[nx // 4 + 5: nx // 4 + 15, ny // 3 + 3: ny // 3 + 9, :2] = 2
    vol[nx - 3:, ny - 3:, 0] = 1
    P.save_nifti_like(vol, geom, out)
    return {"case": case}


def _stub_models(tmp_path):
    spec = {"window": {"mode": "fixed", "lower": -150.0, "upper": 250.0}, "slice_size": 64, "spacing_mm": 8.0}
    (tmp_path / "models" / "model_a").mkdir(parents=True)
    (tmp_path / "models" / "model_a" / "model.json").write_text(json.dumps(spec))
    return tmp_path / "models"


def test_predict_writes_seg_nifti_and_statistics_for_a_dicom_series(tmp_path, monkeypatch):
    """`liverseg predict --output-format both --statistics` on the real 3-slice series with a stub model: the SEG's
    frames equal the written NIfTI at every source instance, and the statistics are those of that NIfTI."""
    import highdicom as hd
    import pydicom

    from conftest import realdata
    from liverseg.dicomseg import source_uid
    from liverseg.statistics import label_statistics
    from test_dicomseg import expected_frame

    ct = realdata("dcmqi_ct3slice", "ct")
    monkeypatch.setattr(P, "predict_case", _stub_predict)
    (s,) = P.predict_path(ct, tmp_path / "x.dcm", _stub_models(tmp_path), output_format="both", statistics=True,
                          mode="model_a")
    assert set(s["outputs"]) == {"nifti", "seg", "stats"}
    pred = nib.load(tmp_path / "x.nii.gz")
    labels = np.asanyarray(pred.dataobj)
    assert (labels == 2).any() and int(cc3d.connected_components(labels >= 1, return_N=True)[1]) == 1  # stray gone
    srcs = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(ct.iterdir())]
    seg = hd.seg.segread(str(tmp_path / "x.dcm"))
    px = seg.get_pixels_by_source_instance([source_uid(d) for d in srcs], segment_numbers=[1, 2],
                                           assert_missing_frames_are_empty=True)
    for k, d in enumerate(srcs):
        want = expected_frame(d, labels, pred.affine)
        assert int(((px[k, ..., 0] > 0) != (want >= 1)).sum()) == 0
        assert int(((px[k, ..., 1] > 0) != (want == 2)).sum()) == 0
    stats = json.loads((tmp_path / "x.stats.json").read_text())
    from liverseg.io import load_nifti

    src = load_nifti(ct, "ct")
    want = label_statistics(labels, np.asanyarray(src.dataobj), pred.header.get_zooms()[:3])
    assert stats["liver_ml"] == pytest.approx(want["liver_ml"]) and stats["liver_ml"] > 0
    assert stats["tumour_count"] == want["tumour_count"] == 1
    assert stats["parenchyma_hu_mean"] == pytest.approx(want["parenchyma_hu_mean"], abs=1e-3)
    assert s["liver_ml"] == pytest.approx(stats["liver_ml"])


def test_predict_folder_reports_progress_summary_and_statistics_table(tmp_path, monkeypatch, caplog):
    import logging
    import shutil

    from conftest import realdata

    ct = realdata("dcmqi_ct3slice", "ct")
    scans = tmp_path / "scans"
    shutil.copytree(ct, scans / "dq")
    (scans / "broken.nii.gz").write_bytes(b"not a nifti")
    monkeypatch.setattr(P, "predict_case", _stub_predict)
    caplog.set_level(logging.INFO, logger="liverseg.predict")
    with pytest.raises(P.CaseError, match="1 of 2 scans failed"):
        P.predict_path(scans, tmp_path / "out", _stub_models(tmp_path), statistics=True, mode="model_a")
    lines = [r.getMessage() for r in caplog.records if r.name == "liverseg.predict"]
    assert any(ln.startswith("[2/2] dq: ") and "liver" in ln and " mL" in ln for ln in lines), lines
    assert "1 of 2 scans segmented, 1 failed" in lines
    assert [ln for ln in lines if ln.startswith("failed: ")] == [next(ln for ln in lines if ln.startswith("failed: "))]
    assert "case broken" in next(ln for ln in lines if ln.startswith("failed: "))
    rows = (tmp_path / "out" / "statistics.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].split("\t")[0] == "dq"
    assert (tmp_path / "out" / "dq.nii.gz").exists() and (tmp_path / "out" / "dq.stats.json").exists()


def test_dicom_seg_needs_a_dicom_input(tmp_path, monkeypatch):
    from liverseg.errors import CaseError

    scan = tmp_path / "volume-1.nii.gz"
    scan.write_bytes(b"")
    with pytest.raises(CaseError, match="a DICOM-SEG needs a DICOM series"):
        P.predict_scan(scan, tmp_path / "o.nii.gz", tmp_path, output_format="dicom-seg")
    with pytest.raises(CaseError, match="add --output-format dicom-seg"):
        P.predict_path(scan, tmp_path / "o.dcm", tmp_path)


@pytest.mark.parametrize("mode", ["v3_convlstm", "v1_3dcnn"])
def test_a_scan_is_preprocessed_with_the_grid_of_the_modes_own_models(tmp_path, monkeypatch, mode):
    """V3 and V1 load no model A: predict_scan must read window and grid from the mode's own model file."""
    from conftest import write_nifti
    from liverseg.phantom import PhantomSpec, generate

    img, lab, aff = generate(3, PhantomSpec(size=48, slices=10))
    scan = write_nifti(tmp_path / "scan.nii.gz", img, aff)
    spec = {"window": {"mode": "fixed", "lower": -150.0, "upper": 250.0}, "slice_size": 48, "spacing_mm": 8.0}
    (tmp_path / "models" / mode).mkdir(parents=True)
    (tmp_path / "models" / mode / "model.json").write_text(json.dumps(spec))
    (tmp_path / "models" / mode / "model.pt").write_bytes(b"")
    seen = {}

    def stub(case, h5, models, out, *a, **kw):
        seen["models"], seen["mode"] = models, kw.get("mode")
        return _stub_predict(case, h5, models, out)

    monkeypatch.setattr(P, "predict_case", stub)
    P.predict_scan(scan, tmp_path / "out.nii.gz", tmp_path / "models", mode=mode)
    assert list(seen["models"]) == [mode] and (tmp_path / "out.nii.gz").exists()


def test_stored_slices_index_like_the_whole_array(tmp_path):
    """The lazy reader answers every index prediction uses (one slice, negative, a 2.5D context stack out of
    order with repeats, a 2D index array, a strided slice) exactly as the array read whole, and keeps at most
    ``keep`` slices."""
    import h5py

    a = np.random.default_rng(0).normal(size=(12, 5, 5)).astype(np.float16)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.create_dataset("image", data=a, chunks=(1, 5, 5))
    with h5py.File(tmp_path / "x.h5", "r") as f:
        s = P.StoredSlices(f["image"], keep=3)
        assert s.shape == a.shape and len(s) == 12
        for idx in (4, -1, -12, np.int64(7), [3, 2, 2, 11, 0], np.array([[1, 1, 2], [5, 4, 3]]), [], slice(1, None, 3)):
            got, want = s[idx], a[idx]
            assert got.shape == want.shape and np.array_equal(got, want), idx
        assert len(s._cache) <= 3
        for bad in (12, -13, [0, 12], np.ones(12, bool)):  # out of range, or a mask: refused as numpy would
            with pytest.raises(IndexError):
                s[bad]
        with pytest.raises(ValueError):  # a cached slice is shared by later reads: read-only
            s[4][0, 0] = 1


def test_v1_reads_only_the_slices_of_its_current_row_of_patches(tmp_path):
    """V1's sliding window asks the stored image for one row of patches at a time (d slices), never the whole
    volume, and its probabilities equal those from the image held whole."""
    import h5py

    from liverseg.inference import sliding_window_3d

    class Stub(torch.nn.Module):  # class probabilities from the intensity: a known, position-dependent output
        def forward(self, x):
            return torch.cat([-x, x, 0.5 * x], dim=1)

    a = np.random.default_rng(1).random((21, 8, 8)).astype(np.float16)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("image", data=a, chunks=(1, 8, 8))
    reads = []
    with h5py.File(tmp_path / "v.h5", "r") as f:
        class Counting:
            shape, dtype = f["image"].shape, f["image"].dtype

            def __getitem__(self, idx):
                out = f["image"][idx]
                reads.append(1 if np.ndim(out) == 2 else out.shape[0])
                return out

        spec = {"patch": [4, 8]}
        for stride in (1, 2):
            lazy = list(sliding_window_3d(Stub(), spec, P.StoredSlices(Counting(), keep=4), torch.device("cpu"),
                                          amp=False, stride=stride))
            whole = list(sliding_window_3d(Stub(), spec, a, torch.device("cpu"), amp=False, stride=stride))
            assert [zs for zs, _ in lazy] == [zs for zs, _ in whole]
            assert sorted(z for zs, _ in lazy for z in zs) == list(range(21))
            for (_, pl), (_, pw) in zip(lazy, whole):
                assert torch.equal(pl, pw)
    assert reads and max(reads) == 1, reads


@pytest.mark.parametrize("mode", ["model_a", "cascade"])
def test_prediction_reads_the_stored_image_a_slice_at_a_time(tiny_dataset, tiny_models, tmp_path, monkeypatch, mode):
    """Prediction never reads the stored image whole (issue 13: the float16 image alone is the int16 scan's
    size), and its labels equal those made from the image held whole in memory."""
    _, paths, _ = tiny_dataset
    models = P.models_in(tiny_models, mode)
    P.predict_case("3", paths["3"], models, tmp_path / "lazy.nii.gz", mode=mode, device="cpu", batch=2)
    reads = []
    real_open = P.open_case

    class Counting:  # the dataset, recording how many slices each read returns
        def __init__(self, ds):
            self._ds, self.shape, self.dtype = ds, ds.shape, ds.dtype

        def __getitem__(self, idx):
            out = self._ds[idx]
            reads.append(1 if np.ndim(out) == 2 else out.shape[0])
            return out

    import contextlib

    @contextlib.contextmanager
    def counting_open(h5, case):
        with real_open(h5, case) as (image, geom, attrs):
            yield P.StoredSlices(Counting(image._ds)), geom, attrs

    monkeypatch.setattr(P, "open_case", counting_open)
    P.predict_case("3", paths["3"], models, tmp_path / "counted.nii.gz", mode=mode, device="cpu", batch=2)
    assert reads and max(reads) == 1, reads

    @contextlib.contextmanager
    def whole_open(h5, case):
        with real_open(h5, case) as (image, geom, attrs):
            yield image._ds[:], geom, attrs

    monkeypatch.setattr(P, "open_case", whole_open)
    P.predict_case("3", paths["3"], models, tmp_path / "whole.nii.gz", mode=mode, device="cpu", batch=2)
    lazy = np.asanyarray(nib.load(tmp_path / "lazy.nii.gz").dataobj)
    assert np.array_equal(lazy, np.asanyarray(nib.load(tmp_path / "whole.nii.gz").dataobj))
    assert (lazy >= 1).any() or mode == "model_a"
