"""Inference for one preprocessed case: V2 (model A), V4 (the gated cascade, liverseg.cascade), V3, V1.

Models run on the stored slice grid; the class probabilities of each batch of slices are resized to the input's
canonical in-plane grid before the argmax, and the labels are written on the input's original grid and affine.
The gate mode and test-time augmentation default to what was chosen on the validation cases (``selection`` in
model_a's and model_b's model.json); ``gate``/``tta`` override it.
"""

from __future__ import annotations

import contextlib
import csv
import logging
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import torch

from liverseg.cascade import USE_B, cascade_batches, gate_slices, liver_region, run_a, z_margin_slices
from liverseg.config import default
from liverseg.errors import CaseError, ConfigError
from liverseg.inference import case_stride, classify, segment_sequences, sliding_window_3d, to_source_grid
from liverseg.io import Geometry, atomic_path, quantise_unit, save_nifti_like, save_unit_nifti
from liverseg.models import ModelFileError, load_ensemble, resolve_device
from liverseg.roles import MODES

log = logging.getLogger(__name__)
CODE_NAMES = {0: "background", 1: "A", 2: "B"}


def read_case(h5_path, case: str, label: bool = True):
    """Image slices (Z, S, S) float16, geometry, attributes and (if ``label`` and stored) the label of a
    preprocessed case."""
    try:
        with h5py.File(h5_path, "r") as f:
            image = f["image"][:]
            attrs = dict(f.attrs)
            label = f["label"][:] if label and "label" in f else None
    except (OSError, KeyError) as exc:
        raise CaseError(case, f"cannot read preprocessed file {h5_path}: {exc}") from None
    return image, case_geometry(attrs), attrs, label


def case_geometry(attrs: dict) -> Geometry:
    """The scan's own grid (shape, affine, orientation) recorded in a preprocessed case's attributes."""
    return Geometry(tuple(int(v) for v in attrs["original_shape"]), np.asarray(attrs["affine"]), np.asarray(attrs["ornt"]))


class StoredSlices:
    """The stored image (Z, S, S) of an open HDF5 file, read slice by slice as the networks ask for it, so
    prediction never holds the whole float16 image (about the int16 scan's size; with it V2 at batch 16 peaked
    at 4.3x the int16 volume at 512 x 512 x 900, issue 13).  What prediction indexes with: an int (negative
    counts from the end) gives one slice, a list or integer array of slice indices a stack of that shape (the
    2.5D context: any order, repeats allowed); anything else (a slice object) is read through h5py.  Slices
    come back read-only.  The last ``keep`` slices read are kept, since neighbouring batches share their 2.5D
    context slices (each pass over the volume still reads every slice once: A's, the classifier's, B's)."""

    ndim = 3

    def __init__(self, dataset, keep: int = 64):
        self._ds = dataset
        self.shape = tuple(int(v) for v in dataset.shape)
        self.dtype = dataset.dtype
        self._keep = int(keep)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return self.shape[0]

    def _slice(self, z: int) -> np.ndarray:
        n = self.shape[0]
        if not -n <= z < n:
            raise IndexError(f"slice {z} out of range for {n} slices")
        z %= n
        hit = self._cache.get(z)
        if hit is not None:
            self._cache.move_to_end(z)
            return hit
        a = self._ds[z]
        a.setflags(write=False)  # shared by every later read of this slice while cached
        self._cache[z] = a
        if len(self._cache) > self._keep:
            self._cache.popitem(last=False)
        return a

    def __getitem__(self, idx):
        if isinstance(idx, (int, np.integer)):
            return self._slice(int(idx))
        if isinstance(idx, (slice, tuple)):
            return self._ds[idx]
        zs = np.asarray(idx)
        if zs.dtype.kind not in "iu":
            if zs.size:  # a boolean mask or floats: not an index prediction uses
                raise IndexError(f"StoredSlices takes integer slice indices, not {zs.dtype}")
            zs = zs.astype(np.int64)
        if zs.size == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.stack([self._slice(int(z)) for z in zs.ravel()]).reshape(zs.shape + self.shape[1:])


@contextlib.contextmanager
def open_case(h5_path, case: str):
    """(StoredSlices of the image, geometry, attributes) of a preprocessed case, its file open while in use."""
    f = None
    try:
        f = h5py.File(h5_path, "r")
        image, attrs = StoredSlices(f["image"]), dict(f.attrs)
    except (OSError, KeyError) as exc:
        if f is not None:
            f.close()
        raise CaseError(case, f"cannot read preprocessed file {h5_path}: {exc}") from None
    try:
        yield image, case_geometry(attrs), attrs
    finally:
        f.close()


def require_mm(spec: dict, model_path) -> None:
    """Models from before the millimetre plan saw slices squashed to their grid: no scan can be prepared as they
    were trained, so they are refused with what to do, not with a grid mismatch."""
    if not spec.get("spacing_mm"):
        raise ModelFileError(f"model {model_path} predates the millimetre plan (its model.json has no spacing_mm); "
                             "train it again (snakemake reruns the train rules)")


def check_compatible(spec: dict, attrs: dict, model_path) -> None:
    """A model only applies to slices made with the window, slice size and mm per pixel it was trained on."""
    require_mm(spec, model_path)
    w = spec["window"]
    mm = attrs.get("spacing_mm")
    got = (attrs["window_mode"], float(attrs["window_lower"]), float(attrs["window_upper"]), int(attrs["size"]),
           round(float(mm), 4) if mm is not None else None)
    want = (w["mode"], float(w["lower"]), float(w["upper"]), int(spec["slice_size"]), round(float(spec["spacing_mm"]), 4))
    if got != want:
        raise ModelFileError(
            f"model {model_path} was trained on slices (window mode, lower, upper, size, mm per pixel) = {want} "
            f"but case {attrs['case_id']} was preprocessed with {got}; preprocess again or use matching models"
        )


def normalised_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of class probabilities (n, K, ...) over the class axis, divided by log K: in [0, 1]."""
    p = probs.float().clamp_min(0)
    p = p / p.sum(dim=1, keepdim=True).clamp_min(1e-12)
    h = -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)
    return (h / float(np.log(p.shape[1]))).clamp(0, 1)


def _choice(value, spec: dict, key: str, default):
    """An explicit setting wins; "auto" (or None) takes what was chosen on validation."""
    if value not in (None, "auto"):
        return value
    return spec.get("selection", {}).get(key, default)


def _tta_flag(value) -> bool | str:
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    return value


def models_in(folder, mode: str) -> dict[str, list[Path]]:
    """``{role: [<folder>/<role>/model.pt]}`` for the roles a mode loads: the layout `liverseg predict` reads
    (results/train).  A role trained as a fold ensemble (split.ensemble) has no model.pt but
    ``<role>/fold_<f>/model.pt``: all its folds are taken, and averaged."""
    out = {}
    for role in MODES[mode]:
        single = Path(folder) / role / "model.pt"
        folds = sorted((Path(folder) / role).glob("fold_*/model.pt"), key=lambda p: int(p.parent.name[5:]))
        if single.is_file() and folds:
            log.warning("%s holds both model.pt and fold models; using model.pt (move one away to choose)",
                        Path(folder) / role)
        out[role] = [single] if single.is_file() or not folds else folds
    return out


def ensemble_threshold_in(folder, models: dict) -> float | None:
    """The fold ensemble's classifier threshold (<folder>/classifier/ensemble.json, liverseg.ensemble) when the
    classifier of ``models`` is such an ensemble; None otherwise (the model's own threshold applies)."""
    from liverseg.ensemble import read_threshold

    path = Path(folder) / "classifier" / "ensemble.json"
    loaded = models.get("classifier", [])
    if len(loaded) > 1 and path.is_file():
        import json

        # by fold folder (the file records paths as the workflow ran, relative to its working directory)
        chosen_for = [Path(m).parent.name for m in json.loads(path.read_text()).get("models", [])]
        if chosen_for != [Path(m).parent.name for m in loaded]:  # left from another set of folds
            log.warning("%s was chosen for other classifier files (%s); using the members' mean threshold instead",
                        path, ", ".join(map(str, chosen_for)) or "none listed")
            return None
        return read_threshold(path)
    return None


def predict_case(case: str, h5_path, models: dict, out_path, scores_path=None, mode: str = "cascade",
                 device: str = default("predict.device"), tta=default("predict.tta"),
                 batch: int = default("predict.batch_size"), amp: bool = True,
                 gate: str = default("predict.gate"), classifier_threshold: float | None = None,
                 probabilities_path=None, uncertainty_path=None) -> dict:
    """Segment one preprocessed case.  ``models`` maps each role of the mode (liverseg.roles.MODES) to its model
    file(s); several files for one role are averaged as an ensemble (models.load_ensemble): the mean of their
    class probabilities (the classifier's: of its slice scores), with the first file's choice of TTA and gate.
    ``classifier_threshold`` replaces the classifier spec's threshold (a fold ensemble's, chosen on the pooled
    out-of-fold validation slices: liverseg.ensemble).

    ``probabilities_path``: the class probabilities the labels are the argmax of (background, liver, tumour as
    the 4th axis), ``uncertainty_path``: their entropy over log(3) (0 = certain, 1 = all classes equally
    likely); both uint8 on the scan's grid with scl_slope 1/255 (liverseg.io.save_unit_nifti), filled batch by
    batch from the same probabilities as the labels, so no whole float volume is held."""
    if mode not in MODES:
        raise ConfigError(f"unknown prediction mode {mode!r}; choose one of {tuple(MODES)}")
    missing = [r for r in MODES[mode] if not models.get(r)]
    if missing:
        raise ConfigError(f"mode {mode} needs model file(s) for {missing} (give --model ROLE=MODEL_PT)")
    dev = resolve_device(device)
    tta = _tta_flag(tta)
    # the image is read slice by slice as the networks need it (StoredSlices); the file stays open meanwhile
    with open_case(h5_path, case) as (image, geom, attrs):
        loaded = {}
        for role in MODES[mode]:
            paths = [Path(p) for p in models[role]]
            loaded[role] = load_ensemble(paths, device=dev)
            check_compatible(loaded[role][1], attrs, paths[0])
        nx, ny, nz = (int(v) for v in attrs["canonical_shape"])
        z_mm = float(attrs["slice_spacing"])
        vol = np.zeros((nx, ny, nz), np.uint8)
        scores = np.full(nz, np.nan, np.float32)
        codes = np.ones(nz, np.int8)
        a_liver = np.zeros(nz, np.int64)
        summary = {"case": case, "mode": mode, "slices": nz}
        maps = {}  # uint8 probability / uncertainty volumes, made at the first batch (its class count)

        def put(zs, probs):
            """Stored-grid probabilities of slices ``zs`` -> labels on the scan's own grid (to_source_grid)."""
            probs = to_source_grid(probs, attrs)
            vol[:, :, zs] = np.transpose(probs.argmax(dim=1).to(torch.uint8).numpy(), (2, 1, 0))
            if probabilities_path:  # (n, K, y, x) -> (x, y, n, K)
                if "p" not in maps:
                    maps["p"] = np.zeros((nx, ny, nz, probs.shape[1]), np.uint8)
                    maps["p"][..., 0] = 255  # a slice no batch covers stays certain background, as its label
                maps["p"][:, :, zs] = quantise_unit(np.transpose(probs.float().numpy(), (3, 2, 0, 1)))
            if uncertainty_path:
                if "u" not in maps:
                    maps["u"] = np.zeros((nx, ny, nz), np.uint8)
                maps["u"][:, :, zs] = quantise_unit(np.transpose(normalised_entropy(probs).numpy(), (2, 1, 0)))

        # Memory (issue 13): besides the image, only uint8 volumes are held whole; probabilities exist for one batch
        # of slices at a time (V1: the slices one row of 3D patches covers), from the network to the label's argmax.
        if mode == "v1_3dcnn":
            model, spec = loaded["v1_3dcnn"]
            for zs, p in sliding_window_3d(model, spec, image, dev, amp=amp, stride=case_stride(spec, z_mm)):
                put(zs, p)
        elif mode == "v3_convlstm":
            model, spec = loaded["v3_convlstm"]
            for zs, p in segment_sequences(model, spec, image, dev, amp=amp, stride=case_stride(spec, z_mm)):
                put(zs, p)
        else:
            model_a, spec_a = loaded["model_a"]
            tta_a = bool(_choice(tta, spec_a, "tta", False))
            # A's result is written for every slice as it comes; the cascade then rewrites the slices it gives to B
            # or to background (cascade_batches), so A's probabilities are never kept for the whole volume.
            a_labels = run_a(model_a, spec_a, image, dev, batch=batch, amp=amp, tta=tta_a,
                             stride=case_stride(spec_a, z_mm), on_batch=put)
            summary["tta_a"] = tta_a
            if mode == "cascade":
                clf, spec_c = loaded["classifier"]
                model_b, spec_b = loaded["model_b"]
                g = _choice(gate, spec_b, "gate", "route")
                tta_b = bool(_choice(tta, spec_b, "tta", False))
                # in batches of predict.batch_size like A and B: the classifier's own default of 64 slices was
                # the cascade's largest batch of activations at 512 px (issue 13)
                scores = classify(clf, spec_c, image, dev, batch=batch, amp=amp, stride=case_stride(spec_c, z_mm))
                present, region, zrange = liver_region(a_labels, int(spec_b["crop_margin"]), z_margin_slices(spec_b, z_mm),
                                                       int(spec_b["patch_size"]))
                if region is None:
                    log.warning("case %s: model A found no liver; no slice goes to model B", case)
                thr = float(spec_c["threshold"] if classifier_threshold is None else classifier_threshold)
                codes = gate_slices(scores, thr, present, zrange, g)
                summary.update(gate=g, tta_b=tta_b, threshold=thr, region=region, z_range=zrange)
                for zs, probs in cascade_batches(image, codes, region, model_b, spec_b, dev, batch=batch, amp=amp,
                                                 tta=tta_b, stride=case_stride(spec_b, z_mm)):
                    put(zs, probs)
            a_liver = (a_labels >= 1).sum(axis=(1, 2))
            del a_labels
    save_nifti_like(vol, geom, out_path)
    for key, path in (("p", probabilities_path), ("u", uncertainty_path)):
        if path:
            save_unit_nifti(maps.pop(key), geom, path)
    final = (vol >= 1).sum(axis=(0, 1))
    if scores_path:
        with atomic_path(scores_path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh, delimiter="\t")
            w.writerow(["slice", "classifier_score", "source", "model_a_liver_pixels_stored_grid", "final_liver_voxels"])
            for z in range(nz):
                w.writerow([z, "" if np.isnan(scores[z]) else f"{scores[z]:.5f}", CODE_NAMES[int(codes[z])],
                            int(a_liver[z]) if mode in ("cascade", "model_a") else "", int(final[z])])
    summary.update(slices_to_b=int((codes == USE_B).sum()), liver_voxels=int((vol >= 1).sum()),
                   tumour_voxels=int((vol == 2).sum()))
    log.info("case %s: %s", case, summary)
    return summary


# ---------------------------------------------------------------------------------------------- new scans
def _scan_id(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


OUTPUT_FORMATS = ("nifti", "dicom-seg", "both")


def outputs_for(out_path, output_format: str = default("predict.output_format"), statistics: bool = False,
                probabilities: bool = False, uncertainty: bool = False) -> dict:
    """The files one scan's prediction goes to, from its NIfTI name ``x.nii.gz`` (or ``x.dcm``): ``nifti``
    x.nii.gz, ``seg`` x.dcm, ``stats`` x.stats.json, ``probabilities`` x_probabilities.nii.gz, ``uncertainty``
    x_uncertainty.nii.gz (predict_case); None for what was not asked for."""
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {output_format!r}; choose one of {OUTPUT_FORMATS}")
    out = Path(out_path)
    stem = _scan_id(out)[: -len(".dcm")] if out.name.endswith(".dcm") else _scan_id(out)
    nifti = out if out.name.endswith((".nii", ".nii.gz")) else out.with_name(f"{stem}.nii.gz")
    return {"nifti": nifti if output_format != "dicom-seg" else None,
            "seg": out.with_name(f"{stem}.dcm") if output_format != "nifti" else None,
            "stats": out.with_name(f"{stem}.stats.json") if statistics else None,
            "probabilities": out.with_name(f"{stem}_probabilities.nii.gz") if probabilities else None,
            "uncertainty": out.with_name(f"{stem}_uncertainty.nii.gz") if uncertainty else None}


def predict_scan(in_path, out_path, model_dir, mode: str = "cascade", device: str = default("predict.device"),
                 tta=default("predict.tta"), batch: int = default("predict.batch_size"), postprocess: bool = True,
                 connectivity: int = default("postprocess.connectivity"), gate: str = default("predict.gate"),
                 output_format: str = default("predict.output_format"), statistics: bool = False,
                 series_uid: str | None = None, probabilities: bool = default("predict.save_probabilities"),
                 uncertainty: bool = default("predict.save_uncertainty")) -> dict:
    """Segment one scan (NIfTI file or DICOM series folder) with trained models; write a label NIfTI and/or a
    DICOM-SEG (DICOM input only) and, with ``statistics``, the case's figures (liverseg.statistics) as JSON;
    with ``probabilities``/``uncertainty`` the class probabilities and their entropy (predict_case).  A role
    trained as a fold ensemble is averaged over its folds (models_in), with the ensemble's threshold.

    The scan is preprocessed with the window, slice size and mm per pixel the models were trained with (read
    from model_a/model.json), segmented, and post-processed (largest 3D liver component) unless told otherwise.
    File names follow ``outputs_for(out_path)``.
    """
    import json
    import tempfile
    import time

    import nibabel as nib

    from liverseg.dicom import read_series
    from liverseg.postprocess import postprocess_case
    from liverseg.preprocess import preprocess_case
    from liverseg.statistics import case_statistics, model_versions, write_json

    t0 = time.perf_counter()
    in_path, model_dir = Path(in_path), Path(model_dir)
    case = _scan_id(in_path)
    outs = outputs_for(out_path, output_format, statistics, probabilities, uncertainty)
    is_dicom = in_path.is_dir()
    if outs["seg"] and not is_dicom:
        if outs["nifti"] is None:
            raise CaseError(case, f"a DICOM-SEG needs a DICOM series as input; {in_path} is not a folder "
                                  "(use --output-format nifti or both)")
        log.warning("case %s: NIfTI input, so no DICOM-SEG (only the NIfTI is written)", case)
        outs["seg"] = None
    if series_uid and not is_dicom:
        raise CaseError(case, f"--series-uid applies to a DICOM folder; {in_path} is not one")
    models = models_in(model_dir, mode)
    # the grid and window every model of the mode shares, from its whole-volume segmenter (model_a, V3 or V1)
    spec_path = Path(models[MODES[mode][0]][0]).with_suffix(".json")
    if not spec_path.is_file():
        raise ModelFileError(f"model file missing: {spec_path}")
    spec = json.loads(spec_path.read_text())
    require_mm(spec, spec_path)
    w = spec["window"]
    with tempfile.TemporaryDirectory(prefix="liverseg-") as tmp:
        image = in_path
        if is_dicom:  # read once (the chosen series) for preprocessing and the statistics' HU
            image = Path(tmp) / "image.nii"
            nib.save(read_series(in_path, case, series_uid), str(image))
        h5 = Path(tmp) / "case.h5"
        preprocess_case(case, image, h5, lower=w["lower"], upper=w["upper"], mode=w["mode"],
                        size=int(spec["slice_size"]), spacing_mm=spec.get("spacing_mm"))
        final = outs["nifti"] or Path(tmp) / "final.nii.gz"
        raw = Path(tmp) / "raw.nii.gz"
        s = predict_case(case, h5, models, raw if postprocess else final, mode=mode, device=device, tta=tta,
                         batch=batch, gate=gate, classifier_threshold=ensemble_threshold_in(model_dir, models),
                         probabilities_path=outs["probabilities"], uncertainty_path=outs["uncertainty"])
        if postprocess:
            postprocess_case(case, raw, final, connectivity=connectivity)
        versions = model_versions(models)
        if outs["seg"]:
            from liverseg.dicomseg import write_seg

            write_seg(case, final, in_path, outs["seg"], series_uid=series_uid, model_versions=versions)
        if outs["stats"]:
            stats = {**case_statistics(case, image, final, models), "scan": str(in_path)}
            write_json(stats, outs["stats"])
            s["statistics"] = stats
            liver_ml = stats["liver_ml"]
        else:
            pred = nib.load(str(final))
            liver_ml = float((np.asanyarray(pred.dataobj) >= 1).sum() * np.prod(pred.header.get_zooms()[:3]) / 1000)
    s.update(liver_ml=liver_ml, seconds=round(time.perf_counter() - t0, 2),
             outputs={k: str(v) for k, v in outs.items() if v})
    return s


def predict_path(in_path, out_path, model_dir, **kw) -> list[dict]:
    """`liverseg predict`: a NIfTI file or a DICOM series folder -> ``out_path`` (a .nii.gz or .dcm file, or an
    existing folder that receives ``<scan id>.nii.gz`` / ``.dcm``); a folder of scans -> ``out_path/<scan id>.*``
    each (predict_many)."""
    from liverseg.dicom import is_dicom_folder

    src, out = Path(in_path), Path(out_path)
    if not src.exists():
        raise CaseError(src.name, f"input does not exist: {src}")
    if src.is_dir() and not is_dicom_folder(src):
        if out.exists() and not out.is_dir():
            raise CaseError(src.name, f"output {out} is a file; a folder of scans needs an output folder")
        if kw.get("series_uid"):
            raise ConfigError("--series-uid names one series: give one DICOM series folder, not a folder of scans")
        return predict_many(src, out, model_dir, **kw)
    if out.is_dir():
        out = out / f"{_scan_id(src)}.nii.gz"
    elif not out.name.endswith((".nii", ".nii.gz", ".dcm")):
        raise CaseError(_scan_id(src), f"output {out} is neither an existing folder nor a .nii/.nii.gz/.dcm file")
    elif out.name.endswith(".dcm") and kw.get("output_format", default("predict.output_format")) == "nifti":
        raise CaseError(_scan_id(src), f"output {out} is a .dcm file: add --output-format dicom-seg (or both)")
    return [predict_scan(src, out, model_dir, **kw)]


def predict_many(in_dir, out_dir, model_dir, **kw) -> list[dict]:
    """Every NIfTI file (and every DICOM series sub-folder) in ``in_dir`` -> ``out_dir/<name>.*``.

    One progress line per scan (time, liver volume); a scan that fails is reported and skipped, the others go
    on; the end lists successes and each failure in one line, and raises CaseError if any failed.  With
    ``statistics``, ``out_dir/statistics.tsv`` holds one row per segmented scan."""
    from liverseg.dicom import is_dicom_folder
    from liverseg.statistics import write_table

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    scans = sorted(p for p in in_dir.iterdir() if not p.name.startswith(".") and (
        p.name.endswith((".nii", ".nii.gz")) or is_dicom_folder(p)))
    if not scans:
        raise CaseError(in_dir.name, f"no NIfTI files or DICOM series folders in {in_dir}")
    out, failed = [], []
    for i, p in enumerate(scans, start=1):
        try:
            s = predict_scan(p, out_dir / f"{_scan_id(p)}.nii.gz", model_dir, **kw)
        except CaseError as exc:
            log.error("[%d/%d] %s", i, len(scans), exc)
            failed.append(exc)
            continue
        out.append(s)
        log.info("[%d/%d] %s: %.1f s, liver %.1f mL", i, len(scans), s["case"], s.get("seconds", 0.0),
                 s.get("liver_ml", 0.0))
    if kw.get("statistics") and out:
        write_table([s["statistics"] for s in out if "statistics" in s], out_dir / "statistics.tsv")
    log.info("%d of %d scans segmented, %d failed", len(out), len(scans), len(failed))
    for exc in failed:
        log.error("failed: %s", exc)
    if failed:
        raise CaseError(",".join(e.case for e in failed), f"{len(failed)} of {len(scans)} scans failed (see messages above)")
    return out
