"""Fold ensembles: averaged probabilities, the pooled out-of-fold classifier threshold, probability and
uncertainty maps."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

import liverseg.predict as P
from liverseg.ensemble import pooled_threshold
from liverseg.phantom import PhantomSpec, generate
from liverseg.preprocess import preprocess_case
from liverseg.train import sensitivity_threshold

from conftest import tiny_config, write_nifti


def _fold_model(role, paths, folder, seed):
    """An untrained model of ``role`` for the tiny cases, its head scaled up so that folds disagree clearly."""
    from liverseg.data import index_cases
    from liverseg.models import build, save
    from liverseg.train import make_spec, stored_grid

    spec = make_spec(tiny_config(), role, stored_grid(index_cases(list(paths.values()))))
    torch.manual_seed(seed)
    model = build(spec, download=False)
    with torch.no_grad():
        for p in model.segmentation_head.parameters():
            p.mul_(20.0)
    save(model, spec, folder / "model.pt", folder / "model.json")
    return folder / "model.pt"


def _decoded(path):
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.uint8 and np.isclose(img.dataobj.slope, 1 / 255)
    return np.asanyarray(img.dataobj)  # slope applied: floats in [0, 1]


def test_ensemble_probabilities_are_the_mean_of_the_folds(tiny_dataset, tmp_path):
    _, paths, split = tiny_dataset
    folds = [_fold_model("model_a", paths, tmp_path / f"fold_{f}", seed=f) for f in range(2)]
    h5 = paths[split["test"][0]]
    probs = {}
    for name, files in (("f0", folds[:1]), ("f1", folds[1:]), ("ens", folds)):
        P.predict_case("c", h5, {"model_a": files}, tmp_path / f"{name}.nii.gz", mode="model_a", device="cpu",
                       tta="false", probabilities_path=tmp_path / f"{name}_p.nii.gz")
        probs[name] = _decoded(tmp_path / f"{name}_p.nii.gz")
    assert probs["ens"].shape[-1] == 3
    assert np.abs(probs["f0"] - probs["f1"]).max() > 0.3  # the folds disagree, so the mean is not either one
    # each map is rounded to 1/255: the mean of two rounded maps is within one step of the rounded mean
    assert np.abs(probs["ens"] - (probs["f0"] + probs["f1"]) / 2).max() <= 1 / 255 + 1e-6
    # the labels are the argmax of those probabilities
    labels = np.asanyarray(nib.load(str(tmp_path / "ens.nii.gz")).dataobj)
    top = np.sort(probs["ens"], axis=-1)
    clear = top[..., -1] - top[..., -2] > 2 / 255
    assert np.array_equal(labels[clear], probs["ens"].argmax(-1)[clear])


def test_pooled_threshold_is_chosen_on_all_folds_scores_not_averaged():
    # fold 0's liver slices score high, fold 1's low: each fold alone keeps its liver slices with its own
    # threshold (0.9, 0.2: mean 0.55), but 0.55 would drop every liver slice of fold 1; the pooled choice keeps
    # them all (min sensitivity 1.0)
    s0, t0 = np.array([0.9, 0.95, 0.1, 0.05], np.float32), np.array([True, True, False, False])
    s1, t1 = np.array([0.2, 0.3, 0.02, 0.01], np.float32), np.array([True, True, False, False])
    r = pooled_threshold([s0, s1], [t0, t1], min_sensitivity=1.0)
    pooled, _ = sensitivity_threshold(np.concatenate([s0, s1]), np.concatenate([t0, t1]), 1.0)
    assert r["threshold"] == pooled == pytest.approx(0.2)
    assert r["fold_thresholds"] == pytest.approx([0.9, 0.2])
    assert r["mean_of_fold_thresholds"] == pytest.approx(0.55) != r["threshold"]
    assert r["slices"] == 8 and r["liver_slices"] == 4


def test_ensemble_threshold_writes_json_from_each_folds_own_validation_cases(tiny_dataset, tmp_path):
    from liverseg.ensemble import ensemble_threshold, fold_scores

    _, paths, _ = tiny_dataset
    clf = [_fold_model_clf(paths, tmp_path / f"fold_{f}", f) for f in range(2)]
    val = [[paths["0"], paths["1"]], [paths["2"]]]
    r = ensemble_threshold(clf, val, tmp_path / "ensemble.json", min_sensitivity=0.9)
    pairs = [fold_scores(m, v) for m, v in zip(clf, val)]
    expect, _ = sensitivity_threshold(np.concatenate([s for s, _ in pairs]), np.concatenate([t for _, t in pairs]), 0.9)
    assert json.loads((tmp_path / "ensemble.json").read_text())["threshold"] == pytest.approx(expect) == r["threshold"]
    assert r["slices"] == sum(len(t) for _, t in pairs)


def _fold_model_clf(paths, folder, seed):
    from liverseg.data import index_cases
    from liverseg.models import build, save
    from liverseg.train import make_spec, stored_grid

    spec = make_spec(tiny_config(), "classifier", stored_grid(index_cases(list(paths.values()))))
    spec["threshold"] = 0.5
    torch.manual_seed(seed)
    save(build(spec, download=False), spec, folder / "model.pt", folder / "model.json")
    return folder / "model.pt"


def test_probability_and_uncertainty_maps_decode_to_the_models_probabilities(tmp_path, monkeypatch):
    """A stub model A gives two known probability vectors (even and odd slices); the maps, read with their
    scl_slope, hold them and their normalised entropy on the scan's grid."""
    img, lab, aff = generate(5, PhantomSpec(size=40, slices=12))
    aff = aff.copy()
    aff[:3, :3] = np.sign(aff[:3, :3]) * 4.0
    ip = write_nifti(tmp_path / "volume-5.nii.gz", img, aff)
    lp = write_nifti(tmp_path / "segmentation-5.nii.gz", lab, aff)
    h5 = tmp_path / "5.h5"
    preprocess_case("5", ip, h5, label_path=lp, size=40, spacing_mm=4.0)
    _, _, attrs, label = P.read_case(h5, "5")
    assert tuple(attrs["resampled_shape"]) == (40, 40)  # no resampling; the placement may cut off a column

    spec = {"window": {"mode": "fixed", "lower": -150.0, "upper": 250.0}, "slice_size": 40, "spacing_mm": 4.0,
            "classes": 3}
    monkeypatch.setattr(P, "load_ensemble", lambda *a, **k: (None, spec))
    vecs = np.array([[0.2, 0.5, 0.3], [0.7, 0.1, 0.2]], np.float32)

    def stub(model, spec, image, device, on_batch=None, **kw):
        """run_a's contract: each batch's probabilities to on_batch, A's labels returned."""
        n = image.shape[0]
        p = np.broadcast_to(vecs[np.arange(n) % 2][:, :, None, None], (n, 3, 40, 40)).astype(np.float32)
        for z0 in range(0, n, 4):
            zs = list(range(z0, min(n, z0 + 4)))
            on_batch(zs, torch.from_numpy(p[zs].copy()))
        return np.asarray(p.argmax(1), np.uint8)

    monkeypatch.setattr(P, "run_a", stub)
    P.predict_case("5", h5, {"model_a": ["unused.pt"]}, tmp_path / "pred.nii.gz", mode="model_a",
                   probabilities_path=tmp_path / "p.nii.gz", uncertainty_path=tmp_path / "u.nii.gz")
    p_img, u_img = nib.load(str(tmp_path / "p.nii.gz")), nib.load(str(tmp_path / "u.nii.gz"))
    assert p_img.shape == img.shape + (3,) and u_img.shape == img.shape and np.allclose(p_img.affine, aff)
    p = np.asanyarray(nib.as_closest_canonical(p_img).dataobj)
    u = np.asanyarray(nib.as_closest_canonical(u_img).dataobj)
    assert np.isclose(p_img.dataobj.slope, 1 / 255) and p_img.get_data_dtype() == np.uint8
    for z in range(img.shape[2]):
        v = vecs[z % 2].astype(np.float64)
        on = np.abs(p[:, :, z] - v).max(-1) <= 0.5 / 255 + 1e-6
        assert on.mean() > 0.9
        # pixels the stored grid cut off are certain background
        assert np.allclose(p[:, :, z][~on], [1.0, 0.0, 0.0], atol=1e-6)
        h = -(v * np.log(v)).sum() / math.log(3)
        assert np.abs(u[:, :, z][on] - h).max() <= 0.5 / 255 + 1e-3 and not u[:, :, z][~on].any()
    assert abs(u[:, :, 0].mean() - u[:, :, 1].mean()) > 0.1  # the two vectors' entropies differ


def test_normalised_entropy_is_zero_when_certain_and_one_when_uniform():
    p = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])[:, :, None]
    assert P.normalised_entropy(p)[:, 0].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_models_in_takes_every_fold_of_a_role_trained_as_an_ensemble(tmp_path):
    for f in (1, 0, 10):
        (tmp_path / "model_a" / f"fold_{f}").mkdir(parents=True)
        (tmp_path / "model_a" / f"fold_{f}" / "model.pt").write_bytes(b"")
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "model.pt").write_bytes(b"")
    m = P.models_in(tmp_path, "model_a")
    assert [p.parent.name for p in m["model_a"]] == ["fold_0", "fold_1", "fold_10"]
    assert P.models_in(tmp_path, "cascade")["classifier"] == [tmp_path / "classifier" / "model.pt"]


def test_an_ensemble_needs_folds():
    from liverseg import config
    from liverseg.errors import ConfigError

    with pytest.raises(ConfigError, match="split.ensemble"):
        config.load(overrides={"split": {"ensemble": True}})
    assert config.load(overrides={"split": {"ensemble": True, "folds": 3}})["split"]["ensemble"] is True


def test_an_ensemble_threshold_chosen_for_other_folds_is_not_used(tmp_path):
    """classifier/ensemble.json applies only to the fold models it was chosen for (a leftover fold_2 from an
    earlier 3-fold run, or a file from another set of folds, falls back to the members' own thresholds)."""
    import json

    folds = [tmp_path / "classifier" / f"fold_{f}" / "model.pt" for f in range(2)]
    record = {"threshold": 0.25, "models": [f"results/train/classifier/fold_{f}/model.pt" for f in range(2)]}
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "ensemble.json").write_text(json.dumps(record))
    assert P.ensemble_threshold_in(tmp_path, {"classifier": folds}) == 0.25
    three = folds + [tmp_path / "classifier" / "fold_2" / "model.pt"]
    assert P.ensemble_threshold_in(tmp_path, {"classifier": three}) is None
    assert P.ensemble_threshold_in(tmp_path, {"classifier": folds[:1]}) is None  # a single model: its own
