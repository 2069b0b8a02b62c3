"""Model builders (segmentation-models-pytorch) and model files: a state_dict plus a JSON spec to rebuild it.

A model file is only ever read with ``torch.load(..., weights_only=True)``: a crafted pickle cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from liverseg.errors import ModelFileError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are never downloaded at run time

import segmentation_models_pytorch as smp  # noqa: E402


class SliceClassifier(nn.Module):
    """smp encoder -> global average pooling -> linear: one logit for "liver in this slice"."""

    def __init__(self, encoder: str, in_channels: int, depth: int = 5, weights: str | None = None):
        super().__init__()
        self.encoder = smp.encoders.get_encoder(encoder, in_channels=in_channels, depth=depth, weights=weights)
        self.head = nn.Linear(self.encoder.out_channels[-1], 1)

    def forward(self, x):
        feats = self.encoder(x)[-1]
        return self.head(feats.mean(dim=(2, 3)))[:, 0]


class ConvLSTMCell(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(channels + hidden, 4 * hidden, kernel_size=3, padding=1)

    def forward(self, x, state):
        h, c = state
        i, f, o, g = self.gates(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class BiConvLSTM(nn.Module):
    """Bidirectional ConvLSTM over a sequence (B, T, C, H, W); returns (B, T, C, H, W)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fwd, self.bwd = ConvLSTMCell(channels, hidden), ConvLSTMCell(channels, hidden)
        self.proj = nn.Conv2d(2 * hidden, channels, kernel_size=1)

    def _run(self, cell, seq):
        b, _, _, h, w = seq.shape
        state = (seq.new_zeros(b, cell.hidden, h, w), seq.new_zeros(b, cell.hidden, h, w))
        out = []
        for t in range(seq.shape[1]):
            state = cell(seq[:, t], state)
            out.append(state[0])
        return torch.stack(out, dim=1)

    def forward(self, seq):
        f = self._run(self.fwd, seq)
        b = self._run(self.bwd, seq.flip(1)).flip(1)
        both = torch.cat([f, b], dim=2)
        bt = both.flatten(0, 1)
        return self.proj(bt).view(seq.shape)


def _unetpp(encoder, depth, decoder_channels, in_channels, classes, weights=None) -> nn.Module:
    """smp's UNet++ as every segmenter kind here builds it (plain, V3's, the full-resolution one)."""
    return smp.UnetPlusPlus(encoder_name=encoder, encoder_weights=weights, encoder_depth=depth,
                            decoder_channels=tuple(decoder_channels), in_channels=in_channels, classes=classes)


class UnetPlusPlusConvLSTM(nn.Module):
    """V3 (2.5D): an smp UNet++ whose encoder runs per slice, with a bidirectional ConvLSTM over the sequence of
    slices at the bottleneck (residual), then the UNet++ decoder per slice.  Input (B, T, C, H, W)."""

    def __init__(self, encoder, depth, decoder_channels, in_channels, classes, weights=None):
        super().__init__()
        self.net = _unetpp(encoder, depth, decoder_channels, in_channels, classes, weights)
        deep = self.net.encoder.out_channels[-1]
        self.lstm = BiConvLSTM(deep, max(8, deep // 4))

    def forward(self, x):
        b, t = x.shape[:2]
        feats = self.net.encoder(x.flatten(0, 1))
        deep = feats[-1]
        deep = deep.view(b, t, *deep.shape[1:])
        feats = list(feats[:-1]) + [(deep + self.lstm(deep)).flatten(0, 1)]
        out = self.net.segmentation_head(self.net.decoder(feats))
        return out.view(b, t, *out.shape[1:])


def _block2d(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UnetPlusPlusFullRes(nn.Module):
    """smp's UNet++ with a skip at input resolution, which the original UNet++ has (its level-0 nodes run at full
    resolution, Zhou et al. 2018) and smp's does not.

    smp's encoders start at stride 2: their first skip is half the input's size, so the decoder's last block
    upsamples without one and the outline is drawn from half-resolution features.  On model B's liver crops most
    liver error was within one stored pixel of the boundary (BENCHMARKS.md, issue 12).  Here a conv block reads
    the input at full resolution (``full_res`` channels), is concatenated with the decoder's output, and one more
    block fuses them before smp's head; everything else is smp's (same encoder, decoder, head, input-size check).
    ``encoder``, ``decoder`` and ``segmentation_head`` are smp's modules, as on a plain model."""

    def __init__(self, encoder, depth, decoder_channels, in_channels, classes, full_res: int, weights=None):
        super().__init__()
        self.net = _unetpp(encoder, depth, decoder_channels, in_channels, classes, weights)
        last = int(decoder_channels[depth - 1])
        self.stem = nn.Sequential(_block2d(in_channels, full_res), _block2d(full_res, full_res))
        self.fuse = _block2d(last + full_res, last)

    encoder = property(lambda self: self.net.encoder)
    decoder = property(lambda self: self.net.decoder)
    segmentation_head = property(lambda self: self.net.segmentation_head)

    def forward(self, x):
        self.net.check_input_shape(x)  # smp's one-line "pad to a multiple of the output stride" error
        dec = self.net.decoder(self.net.encoder(x))
        return self.net.segmentation_head(self.fuse(torch.cat([dec, self.stem(x)], dim=1)))


def _block3d(cin, cout):
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.01, True),
    )


class UNet3D(nn.Module):
    """V1: a compact 3D U-Net (plain PyTorch; smp has no 3D models). Input (B, C, D, H, W), D/H/W divisible by
    2 ** (levels - 1)."""

    def __init__(self, in_channels: int, classes: int, channels=(16, 32, 64, 128)):
        super().__init__()
        ch = list(channels)
        self.down = nn.ModuleList([_block3d(in_channels, ch[0])] + [_block3d(ch[i - 1], ch[i]) for i in range(1, len(ch))])
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList([nn.ConvTranspose3d(ch[i], ch[i - 1], 2, stride=2) for i in range(len(ch) - 1, 0, -1)])
        self.dec = nn.ModuleList([_block3d(2 * ch[i - 1], ch[i - 1]) for i in range(len(ch) - 1, 0, -1)])
        self.head = nn.Conv3d(ch[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def imagenet_statistics(encoder: str, in_channels: int) -> dict:
    """The input statistics an ImageNet-initialised encoder expects, per input channel: ``{"mean", "std"}``.

    Read from smp's preprocessing parameters for the encoder (cached with its weights: training an ImageNet
    encoder needs that cache anyway) when the spec is made at training time, and recorded in model.json, so loading
    a model never looks them up.  Our inputs are windowed CT in [0, 1] with 2c+1 channels; smp adapts the first
    convolution by giving input channel i the RGB filter i mod 3 (one channel: the sum of the three), so channel i
    takes the statistics of RGB channel i mod 3 (one channel: their means)."""
    params = smp.encoders.get_preprocessing_params(encoder, pretrained="imagenet")
    mean, std = [float(v) for v in params["mean"]], [float(v) for v in params["std"]]
    if in_channels == 1:
        return {"mean": [sum(mean) / 3], "std": [sum(std) / 3]}
    return {"mean": [mean[i % 3] for i in range(in_channels)], "std": [std[i % 3] for i in range(in_channels)]}


def input_normalisation(spec: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) as (C, 1, 1) tensors from the spec's ``input_norm`` (set for ImageNet encoders), else None.
    A model file without the key was trained on raw inputs and keeps seeing them."""
    norm = spec.get("input_norm")
    if not norm:
        return None
    c = int(spec["in_channels"])
    if len(norm["mean"]) != c or len(norm["std"]) != c:
        raise ModelFileError(f"input_norm has {len(norm['mean'])} channels, the model {c}")
    # (C, 1, 1) broadcasts over (B, C, H, W) and over V3's (B, T, C, H, W).
    return torch.tensor(norm["mean"]).view(c, 1, 1), torch.tensor(norm["std"]).view(c, 1, 1)


def _normalise_input(mean: torch.Tensor, std: torch.Tensor):
    def hook(module, args):
        x = args[0]
        return ((x - mean.to(x.device, x.dtype)) / std.to(x.device, x.dtype),) + tuple(args[1:])
    return hook


def build(spec: dict, download: bool = True) -> nn.Module:
    """The network a spec describes.  ``download=False`` never fetches pretrained weights (a model file being
    loaded holds them all); the spec's input normalisation (``input_norm``) applies either way."""
    model = _build(spec, (spec.get("encoder_weights") or None) if download else None)
    norm = input_normalisation(spec)
    if norm is not None:
        # A forward pre-hook, not a wrapper module: the state_dict keys stay those of the plain network.
        model.register_forward_pre_hook(_normalise_input(*norm))
    return model


def _build(spec: dict, weights: str | None) -> nn.Module:
    if spec["kind"] == "classifier":
        return SliceClassifier(spec["encoder"], spec["in_channels"], spec.get("encoder_depth", 5), weights)
    if spec["kind"] == "segmenter":
        args = (spec["encoder"], spec.get("encoder_depth", 5), spec["decoder_channels"], spec["in_channels"],
                spec["classes"])
        if spec.get("full_res_channels"):
            return UnetPlusPlusFullRes(*args, int(spec["full_res_channels"]), weights)
        return _unetpp(*args, weights)
    if spec["kind"] == "convlstm":
        return UnetPlusPlusConvLSTM(spec["encoder"], spec.get("encoder_depth", 5), spec["decoder_channels"],
                                    spec["in_channels"], spec["classes"], weights)
    if spec["kind"] == "unet3d":
        return UNet3D(spec["in_channels"], spec["classes"], tuple(spec["channels_3d"]))
    raise ModelFileError(f"unknown model kind {spec['kind']!r}")


def save(model: nn.Module, spec: dict, weights_path, spec_path) -> None:
    from liverseg.io import atomic_path

    with atomic_path(weights_path) as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_path(spec_path) as tmp:
        Path(tmp).write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def load(weights_path, spec_path=None, device="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from its JSON spec and load its weights; every failure is a one-line ModelFileError."""
    weights_path = Path(weights_path)
    spec_path = Path(spec_path) if spec_path else weights_path.with_suffix(".json")
    for p in (weights_path, spec_path):
        if not p.is_file():
            raise ModelFileError(f"model file missing: {p}")
    try:
        spec = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"model spec {spec_path} is not valid JSON: {exc}") from None
    try:
        state = torch.load(weights_path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "refuse this file"
        raise ModelFileError(
            f"cannot load model weights {weights_path} safely (weights_only=True): {str(exc).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state, dict):
        raise ModelFileError(f"{weights_path} does not hold a state_dict")
    try:
        # The file holds every weight: never let the builder fetch pretrained ones (compute nodes are offline).
        model = build(spec, download=False)
        model.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ModelFileError(
            f"weights {weights_path} do not match the architecture in {spec_path}: {str(exc).splitlines()[0][:200]}"
        ) from None
    return model.to(device).eval(), spec


class Ensemble(nn.Module):
    """Several trained models of one role (e.g. the folds of a cross-validation) as one: the output is a logit
    whose softmax (sigmoid for a one-logit classifier) is the mean of the members' probabilities, so every
    consumer of a single model (TTA, tiling, gating) works unchanged."""

    def __init__(self, members: list[nn.Module], class_dim: int, binary: bool):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.class_dim, self.binary = class_dim, binary

    def forward(self, x):
        outs = [m(x).float() for m in self.members]
        if self.binary:
            p = torch.stack([torch.sigmoid(o) for o in outs]).mean(0).clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        p = torch.stack([torch.softmax(o, dim=self.class_dim) for o in outs]).mean(0)
        return torch.log(p.clamp_min(1e-12))


# What members of an ensemble must share: they read the same inputs and give the same outputs.
ENSEMBLE_KEYS = ("kind", "classes", "context", "context_mm", "spacing_mm", "input_size", "slice_size", "window",
                 "patch_size", "seq_len", "patch", "crop_margin", "z_margin", "z_margin_mm", "augment")


def load_ensemble(paths: list, device="cpu") -> tuple[nn.Module, dict]:
    """One model file, or several of one role averaged (``Ensemble``).  The spec is the first member's (so is
    its ``selection`` of TTA and gate), with the classifier threshold averaged over members and ``ensemble``
    listing the files.  The averaged threshold was not itself chosen on validation: the members' sensitivity
    guarantee (train.min_sensitivity) does not carry over exactly; a fold ensemble's prediction replaces it with the
    threshold chosen on the pooled out-of-fold validation slices (liverseg.ensemble, predict_case's
    ``classifier_threshold``)."""
    loaded = [load(p, device=device) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    spec = dict(loaded[0][1])
    for p, (_, s) in zip(paths[1:], loaded[1:]):
        diff = [k for k in ENSEMBLE_KEYS if s.get(k) != spec.get(k)]
        if diff:
            raise ModelFileError(f"model {p} cannot join an ensemble with {paths[0]}: they differ in {diff}")
    if "threshold" in spec:
        spec["threshold"] = float(sum(s["threshold"] for _, s in loaded) / len(loaded))
    spec["ensemble"] = [str(p) for p in paths]
    model = Ensemble([m for m, _ in loaded], class_dim=2 if spec["kind"] == "convlstm" else 1,
                     binary=spec["classes"] == 1)
    return model.to(device).eval(), spec


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelFileError("device 'cuda' requested but no CUDA device is available")
    return torch.device(device)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA when the card supports it (fp16 otherwise); a no-op on CPU."""
    if device.type != "cuda" or not enabled:
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)
