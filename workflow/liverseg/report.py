"""Pictures and tables for people: per-case overlays, the experiment comparison table, per-case Dice plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from liverseg.errors import CaseError  # noqa: E402
from liverseg.roles import EXPERIMENTS, parse_experiment  # noqa: E402
from liverseg.io import atomic_path, geometry_of, load_nifti, read_labels, read_raw  # noqa: E402

COLOURS = {"liver": "#33dd55", "tumour": "#ff3355"}


def _display(slice_xy: np.ndarray) -> np.ndarray:
    """Canonical (x, y) slice -> image rows = anterior at top, patient right on the image's left (radiological)."""
    return slice_xy[::-1, :].T


def pick_slices(ref: np.ndarray, pred: np.ndarray) -> list[tuple[str, int]]:
    """Three representative canonical z indices: largest liver, largest tumour (or worst liver error), a border."""
    liver_area = (ref >= 1).sum(axis=(0, 1))
    out = []
    if liver_area.any():
        out.append(("largest liver", int(np.argmax(liver_area))))
    else:
        out.append(("largest predicted liver", int(np.argmax((pred >= 1).sum(axis=(0, 1))))))
    tum = (ref == 2).sum(axis=(0, 1))
    if tum.any():
        out.append(("largest tumour", int(np.argmax(tum))))
    else:
        err = ((ref >= 1) ^ (pred >= 1)).sum(axis=(0, 1))
        out.append(("largest liver error", int(np.argmax(err))))
    zs = np.flatnonzero(liver_area)
    if zs.size:
        out.append(("liver border (superior end)", int(zs[-1] - min(2, (zs.size - 1) // 4))))
    else:
        out.append(("middle slice", ref.shape[2] // 2))
    return out


def case_window(h5_path, case: str) -> tuple[float, float]:
    """The HU window the case was preprocessed with (its HDF5 attributes), so pictures show what models saw."""
    import h5py

    try:
        with h5py.File(h5_path, "r") as f:
            return float(f.attrs["window_lower"]), float(f.attrs["window_upper"])
    except (OSError, KeyError) as exc:
        raise CaseError(case, f"cannot read the window of preprocessed file {h5_path}: {exc}") from None


def _stored_grid(h5_path) -> str:
    """What the models saw of the case: the stored grid's mm per pixel and field of view (HDF5 attributes)."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        a = f.attrs
        return f"; models saw it at {float(a['spacing_mm']):.3g} mm per pixel, {float(a['fov_mm']):.0f} mm field of view"


def overlay_case(case: str, image_path, ref_path, pred_path, h5_path, out_png, title="") -> None:
    """CT | reference | prediction at three slices, contours (not filled), aspect ratio from the voxel spacing,
    grey levels in the case's own HU window."""
    lower, upper = case_window(h5_path, case)
    img = load_nifti(image_path, case, "image")
    geom = geometry_of(img)
    # CT in its stored dtype (a scaled int16 file would otherwise become a float64 copy); HU only for the 3 slices.
    raw, slope, inter = read_raw(img, case, image_path, "image")
    ct = geom.to_canonical(raw)
    ref = geom.to_canonical(read_labels(load_nifti(ref_path, case, "label")))
    pred = geom.to_canonical(read_labels(load_nifti(pred_path, case, "prediction")))
    sx, sy, sz = geom.canonical_spacing
    stored = _stored_grid(h5_path)
    rows = pick_slices(ref, pred)
    fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 3.6 * len(rows)))
    for r, (what, z) in enumerate(rows):
        ct2 = _display(ct[:, :, z].astype(np.float32) * slope + inter)
        for c, (name, lab) in enumerate((("CT", None), ("reference", ref), ("prediction", pred))):
            ax = axes[r, c]
            ax.imshow(ct2, cmap="gray", vmin=lower, vmax=upper, origin="lower", aspect=sy / sx,
                      interpolation="nearest")
            if lab is not None:
                l2 = _display(lab[:, :, z])
                for cls, level in (("liver", 1), ("tumour", 2)):
                    m = (l2 >= level).astype(float)
                    if m.any():
                        ax.contour(m, levels=[0.5], colors=COLOURS[cls], linewidths=1.2, origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name} - {what}, slice {z}" if c == 0 else name, fontsize=9)
    nx, ny, _ = ct.shape
    fig.suptitle(f"case {case} {title}  (green: liver, red: tumour; radiological view: patient right on the left)\n"
                 f"voxels {sx:.3g} x {sy:.3g} x {sz:.3g} mm, field of view {nx * sx:.0f} x {ny * sy:.0f} mm"
                 f"{stored}", fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def _fmt(v, nd=4):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{nd}f}"


def _mean_sd(block):
    if block["mean"] is None:
        return "n/a"
    return f"{block['mean']:.4f} ± {block['sd']:.4f}"


def inference_seconds(bench_tsvs: list[str]) -> float | None:
    vals = []
    for p in bench_tsvs:
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            vals.append(float(rows[0]["s"]))
    return float(np.mean(vals)) if vals else None


def table_rows(summaries: dict[str, dict], run: list[str]) -> list[tuple[str, str]]:
    """(experiment key, row title) in the study's order; a fold ensemble's experiment (its summary names
    ``ensemble_folds``) is followed by each of its folds alone (``<experiment>-fold<f>``)."""
    rows = []
    for key, e in EXPERIMENTS.items():
        k = summaries.get(key, {}).get("ensemble_folds")
        rows.append((key, f"{e['title']} (ensemble of {k} folds)" if k else e["title"]))
        folds = sorted((f, name) for name in run for base, f in [parse_experiment(name)] if base == key and f is not None)
        rows += [(name, f"{e['title']} (fold {f} alone)") for f, name in folds]
    return rows


def summary_table(summaries: dict[str, dict], seconds: dict[str, float | None], run: list[str],
                  skipped: list[str], out_md, raw: dict[str, dict] | None = None,
                  failed: dict[str, str] | None = None) -> str:
    """Markdown comparison with the original study's rows; experiments not run say so."""
    lines = [
        "# liverseg: experiment comparison",
        "",
        "Metrics on the held-out **test cases** on their original voxel grids, after post-processing (largest 3D",
        "liver component). Liver = label >= 1 (tumour included), tumour = label 2, as LiTS scores them.",
        "Dice per case is mean ± sd over cases; Dice global pools the voxel counts of all cases (as LiTS does).",
        "ASSD is the liver's, in mm.",
        "",
        "| experiment | liver Dice per case | liver Dice global | tumour Dice per case | liver ASSD (mm) |"
        " lesion recall | inference s/case | cases | liver Dice per case before CCA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, name in table_rows(summaries, run):
        if key not in run or key not in summaries:
            lines.append(f"| {name} | not run | | | | | | | |")
            continue
        agg = summaries[key]["aggregate"]
        lv, tu = agg["liver"], agg["tumour"]
        lines.append(
            f"| {name} | {_mean_sd(lv['dice'])} | {_fmt(lv['dice_global'])} | {_mean_sd(tu['dice'])} |"
            f" {_fmt(lv['assd']['mean'], 2)} | {_fmt(tu.get('lesion_recall_pooled'), 3)} |"
            f" {_fmt(seconds.get(key), 1)} | {lv['cases']} |"
            f" {_mean_sd(raw[key]['aggregate']['liver']['dice']) if raw and key in raw else 'n/a'} |"
        )
    lines += [
        "",
        "The last column (raw prediction, before the largest-component step) shows what post-processing did; every",
        "metric of both stages is in `evaluate/<experiment>/raw/` and `evaluate/<experiment>/post/`",
        "(`per_case.tsv`, `summary.json`). Inference seconds per case include process start-up and model loading.",
        "",
        "Published reference points (other data, other splits; not comparable one-to-one): the original study",
        "reports liver Dice 0.9717 (V2) and 0.9720 (V4) on an 80/51 re-split of LiTS; the best published LiTS",
        "per-case Dice is 0.963 (liver) and 0.739 (tumour).",
    ]
    if any(s.get("ensemble_folds") for s in summaries.values()):
        lines += ["", "An ensemble row averages the class probabilities of its folds' models (TTA and gate as chosen",
                  "for fold 0; the classifier's threshold chosen on the pooled out-of-fold validation slices,",
                  "`train/classifier/ensemble.json`); a fold row is that fold's models alone, on the same test cases."]
    geometry = next((s["geometry"] for s in summaries.values() if s.get("geometry")), {})
    if geometry:
        lines += ["", "Test cases (voxel spacing and field of view of each scan, in its stored axis order; models see",
                  "every scan resampled to the plan's mm per pixel, `results/plan/plan.json`):", "",
                  "| case | voxel spacing (mm) | field of view (mm) |", "|---|---|---|"]
        lines += [f"| {c} | {g['spacing_mm']} | {g['fov_mm']} |" for c, g in sorted(geometry.items())]
    if skipped:
        lines += ["", f"Predict-only cases (no reference label, not evaluated): {', '.join(skipped)}"]
    if failed:
        lines += ["", f"**Failed cases** ({len(failed)}; left out of training, prediction and evaluation):", ""]
        lines += [f"- `{c}`: {msg}" for c, msg in sorted(failed.items())]
    text = "\n".join(lines) + "\n"
    with atomic_path(out_md) as tmp:
        Path(tmp).write_text(text)
    return text


def dice_plot(summaries: dict[str, dict], out_png) -> None:
    """Strip plot of per-case liver and tumour Dice per experiment (from each summary's ``dice_per_case``)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    names = list(summaries)
    for ax, cls in zip(axes, ("liver", "tumour")):
        for i, exp in enumerate(names):
            vals = list(summaries[exp]["aggregate"][cls]["dice_per_case"].values())
            x = np.full(len(vals), i) + np.linspace(-0.12, 0.12, max(len(vals), 1))[: len(vals)]
            ax.plot(x, vals, "o", alpha=0.7)
            if vals:
                ax.hlines(np.mean(vals), i - 0.25, i + 0.25, colors="k")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=15)
        ax.set_title(f"{cls} Dice per case (bar: mean)")
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def summarize(summary_files: list, benchmarks: dict[str, list], out_md, out_plot) -> str:
    """The comparison table and the Dice plot from the summary.json of every experiment and stage (each names its
    experiment and stage) and the prediction benchmark files of each experiment."""
    post, raw = {}, {}
    for f in summary_files:
        s = json.loads(Path(f).read_text())
        (post if s["stage"] == "post" else raw)[s["experiment"]] = s
    run = list(post)
    seconds = {e: inference_seconds(benchmarks.get(e, [])) for e in run}
    skipped = sorted({c for s in post.values() for c in s.get("predict_only_skipped", [])})
    failed = {}
    for s in post.values():
        failed.update(s.get("failed_cases", {}))
        failed.update({c: f"rejected: {r}" for c, r in s.get("rejected_cases", {}).items()})
    text = summary_table(post, seconds, run, skipped, out_md, raw=raw, failed=failed)
    dice_plot(post, out_plot)
    return text
