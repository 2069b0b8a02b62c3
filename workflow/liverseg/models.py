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


def build(spec: dict) -> nn.Module:
    weights = spec.get("encoder_weights") or None
    if spec["kind"] == "classifier":
        return SliceClassifier(spec["encoder"], spec["in_channels"], spec.get("encoder_depth", 5), weights)
    if spec["kind"] == "segmenter":
        return smp.UnetPlusPlus(
            encoder_name=spec["encoder"],
            encoder_weights=weights,
            encoder_depth=spec.get("encoder_depth", 5),
            decoder_channels=tuple(spec["decoder_channels"]),
            in_channels=spec["in_channels"],
            classes=spec["classes"],
        )
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
        model = build(spec)
        model.load_state_dict(state)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ModelFileError(
            f"weights {weights_path} do not match the architecture in {spec_path}: {str(exc).splitlines()[0][:200]}"
        ) from None
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
