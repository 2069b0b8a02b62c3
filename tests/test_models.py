"""liverseg.models: every network kind of the role table builds offline and has the output shape its callers
expect; model files round-trip exactly, are read with weights_only and never trigger a download."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from liverseg import models as M  # noqa: E402
from liverseg.errors import ModelFileError  # noqa: E402
from liverseg.roles import ROLES  # noqa: E402

# One tiny spec and one input per network kind, with the output shape the callers rely on:
# classifier (B, C, H, W) -> (B,) logits; segmenter -> (B, K, H, W); convlstm (B, T, C, H, W) -> (B, T, K, H, W);
# unet3d (B, 1, D, H, W) -> (B, K, D, H, W).  H != W on purpose, so a transposed view would show.
TINY = {
    "classifier": ({"kind": "classifier", "encoder": "resnet18", "encoder_depth": 3, "in_channels": 3},
                   (2, 3, 32, 48), (2,)),
    "segmenter": ({"kind": "segmenter", "encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": [16, 8, 8],
                   "in_channels": 3, "classes": 3}, (2, 3, 32, 48), (2, 3, 32, 48)),
    "segmenter_full_res": ({"kind": "segmenter", "encoder": "mobilenet_v2", "encoder_depth": 3,
                            "decoder_channels": [16, 8, 8], "in_channels": 3, "classes": 3, "full_res_channels": 4},
                           (2, 3, 32, 48), (2, 3, 32, 48)),
    "convlstm": ({"kind": "convlstm", "encoder": "mobilenet_v2", "encoder_depth": 3, "decoder_channels": [16, 8, 8],
                  "in_channels": 3, "classes": 3}, (2, 3, 3, 32, 48), (2, 3, 3, 32, 48)),
    "unet3d": ({"kind": "unet3d", "in_channels": 1, "classes": 3, "channels_3d": [4, 8]},
               (1, 1, 4, 8, 12), (1, 3, 4, 8, 12)),
}


def _spec(kind, weights=None):
    spec = dict(TINY[kind][0])  # "segmenter_full_res" is kind "segmenter" with full_res_channels
    spec["encoder_weights"] = weights
    return spec


def _no_downloads(monkeypatch):
    """Make every way segmentation-models-pytorch / timm / torchvision could fetch weights raise."""
    import huggingface_hub
    import segmentation_models_pytorch.encoders as enc

    def refuse(*a, **k):
        raise AssertionError(f"a download was attempted: {a} {k}")

    monkeypatch.setattr(enc, "hf_hub_download", refuse, raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_every_kind_in_the_role_table_has_a_case_here():
    assert {r["kind"] for r in ROLES.values()} <= set(TINY)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_build_output_shapes(kind, monkeypatch):
    _no_downloads(monkeypatch)
    spec, in_shape, out_shape = TINY[kind]
    torch.manual_seed(0)
    model = M.build(_spec(kind)).eval()
    with torch.no_grad():
        out = model(torch.rand(in_shape))
    assert tuple(out.shape) == out_shape


def test_convlstm_keeps_the_slices_of_a_sequence_apart():
    """(B, T) is flattened and restored around the encoder/decoder: sequence b's output must depend only on
    sequence b (a wrong view/reshape mixes batch and time)."""
    torch.manual_seed(0)
    model = M.build(_spec("convlstm")).eval()
    x = torch.rand(2, 3, 3, 32, 32)
    with torch.no_grad():
        both = model(x)
        one = model(x[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_unknown_kind_is_a_model_file_error():
    with pytest.raises(ModelFileError, match="unknown model kind"):
        M.build({"kind": "transformer"})


@pytest.mark.parametrize("kind", sorted(TINY))
def test_save_load_round_trip_gives_identical_outputs(kind, tmp_path, monkeypatch):
    _no_downloads(monkeypatch)
    spec, in_shape, _ = TINY[kind]
    spec = _spec(kind)
    torch.manual_seed(1)
    model = M.build(spec)
    # Move normalisation statistics away from their initial values, so buffers must round-trip too.
    model.train()
    with torch.no_grad():
        model(torch.rand(in_shape) * 3 + 1)
    model.eval()
    x = torch.rand(in_shape)
    with torch.no_grad():
        want = model(x)
    M.save(model, spec, tmp_path / "model.pt", tmp_path / "model.json")
    assert json.loads((tmp_path / "model.json").read_text()) == spec
    torch.manual_seed(2)  # a fresh build would come out different: the outputs below must come from the file
    loaded, spec2 = M.load(tmp_path / "model.pt")
    assert spec2 == spec and not loaded.training
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, want)


def test_load_reads_weights_only(tmp_path, monkeypatch):
    spec = _spec("unet3d")
    M.save(M.build(spec), spec, tmp_path / "m.pt", tmp_path / "m.json")
    calls = []
    real = torch.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    M.load(tmp_path / "m.pt", tmp_path / "m.json")
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_load_never_downloads(tmp_path, monkeypatch):
    for kind in ("classifier", "segmenter"):
        spec = _spec(kind)
        M.save(M.build(spec), spec, tmp_path / f"{kind}.pt", tmp_path / f"{kind}.json")
    _no_downloads(monkeypatch)
    for kind in ("classifier", "segmenter"):
        M.load(tmp_path / f"{kind}.pt")


def test_load_of_a_model_trained_from_imagenet_weights_never_downloads(tmp_path, monkeypatch):
    """The model file holds every weight: loading must not fetch ImageNet weights (offline compute nodes)."""
    spec = _spec("segmenter")
    M.save(M.build(spec), dict(spec, encoder_weights="imagenet"), tmp_path / "m.pt", tmp_path / "m.json")
    _no_downloads(monkeypatch)
    model, spec2 = M.load(tmp_path / "m.pt")
    assert spec2["encoder_weights"] == "imagenet"


def _no_network(monkeypatch):
    """Cut the network at the socket: any connection attempt (a download by any library) raises."""
    import socket

    def refuse(*a, **k):
        raise AssertionError(f"a network connection was attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("kind", ["classifier", "segmenter", "segmenter_full_res", "convlstm"])
def test_imagenet_model_loads_with_the_network_cut_off_and_normalises_its_input(kind, tmp_path, monkeypatch):
    """A model saved as if ImageNet-initialised: loading fetches nothing (socket cut, download helpers refused),
    and the network sees the input normalised with the encoder's ImageNet statistics, channel i with those of RGB
    channel i mod 3 (smp's first-conv adaptation)."""
    spec, in_shape, _ = TINY[kind]
    spec = dict(spec, encoder_weights="imagenet", in_channels=5,
                input_norm={"mean": [0.485, 0.456, 0.406, 0.485, 0.456], "std": [0.229, 0.224, 0.225, 0.229, 0.224]})
    in_shape = in_shape[:-3] + (5,) + in_shape[-2:]
    torch.manual_seed(0)
    plain = M.build({k: v for k, v in spec.items() if k not in ("encoder_weights", "input_norm")}).eval()
    M.save(plain, spec, tmp_path / "m.pt", tmp_path / "m.json")
    _no_network(monkeypatch)
    _no_downloads(monkeypatch)
    model, spec2 = M.load(tmp_path / "m.pt")
    assert spec2["encoder_weights"] == "imagenet"
    assert set(model.state_dict()) == set(plain.state_dict())  # same file layout as a plain model
    mean = torch.tensor([0.485, 0.456, 0.406, 0.485, 0.456]).view(5, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225, 0.229, 0.224]).view(5, 1, 1)
    x = torch.rand(in_shape)
    with torch.no_grad():
        got, want = model(x), plain((x - mean) / std)
    assert torch.allclose(got, want, atol=1e-5)


def test_imagenet_statistics_follow_smps_first_convolution(monkeypatch):
    """Channel i takes RGB channel i mod 3's statistics; one channel their means (smp sums the RGB filters).
    smp's table is stubbed: the real lookup reads a cached config that this offline machine may not have."""
    import segmentation_models_pytorch.encoders as enc

    monkeypatch.setattr(enc, "get_preprocessing_params",
                        lambda name, pretrained: {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]})
    assert M.imagenet_statistics("resnet18", 5) == {"mean": [0.1, 0.2, 0.3, 0.1, 0.2], "std": [1.0, 2.0, 3.0, 1.0, 2.0]}
    one = M.imagenet_statistics("resnet18", 1)
    assert one["mean"] == pytest.approx([0.2]) and one["std"] == pytest.approx([2.0])


def test_models_without_input_norm_see_raw_input():
    """Scratch models, and files from before input_norm existed, get no normalisation hook."""
    spec = dict(TINY["segmenter"][0], encoder_weights="imagenet")  # an old ImageNet file: trained on raw inputs
    assert M.input_normalisation(spec) is None
    assert not M.build(dict(spec, encoder_weights=None))._forward_pre_hooks
    with pytest.raises(ModelFileError, match="channels"):
        M.input_normalisation(dict(spec, input_norm={"mean": [0.5], "std": [0.2]}))


def test_resolve_device(monkeypatch):
    assert M.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert M.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ModelFileError, match="no CUDA device"):
        M.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert M.resolve_device("auto") == torch.device("cuda")
    assert M.resolve_device("cuda") == torch.device("cuda")


@pytest.mark.parametrize("device, enabled", [("cpu", True), ("cpu", False), ("cuda", False)])
def test_autocast_is_a_no_op_on_cpu_and_when_disabled(device, enabled):
    a, b = torch.rand(8, 8), torch.rand(8, 8)
    with M.autocast(torch.device(device), enabled):
        assert not torch.is_autocast_enabled("cpu")
        out = a @ b
    assert out.dtype == torch.float32
    assert torch.equal(out, a @ b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_autocast_on_cuda_uses_half_precision():
    dev = torch.device("cuda")
    a, b = torch.rand(8, 8, device=dev), torch.rand(8, 8, device=dev)
    with M.autocast(dev):
        out = a @ b
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert out.dtype == want


class _Fixed(torch.nn.Module):
    """Returns fixed logits whatever the input (shape taken from the input's batch and size)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, x):
        shape = (x.shape[0], len(self.logits), *x.shape[2:]) if self.logits.ndim else (x.shape[0],)
        return self.logits.view(1, -1, *([1] * (x.dim() - 2))).expand(shape) if self.logits.ndim else \
            self.logits.expand(shape)


def test_ensemble_averages_member_probabilities():
    a, b = _Fixed([2.0, 0.0, -1.0]), _Fixed([-1.0, 3.0, 0.0])
    ens = M.Ensemble([a, b], class_dim=1, binary=False)
    x = torch.zeros(2, 1, 4, 5)
    want = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    assert torch.allclose(torch.softmax(ens(x), 1), want, atol=1e-6)
    c, d = _Fixed(torch.tensor(2.0).tolist()), _Fixed(torch.tensor(-0.5).tolist())
    ens = M.Ensemble([c, d], class_dim=1, binary=True)
    x = torch.zeros(3, 1, 4, 4)
    want = (torch.sigmoid(torch.tensor(2.0)) + torch.sigmoid(torch.tensor(-0.5))) / 2
    assert torch.allclose(torch.sigmoid(ens(x)), want.expand(3), atol=1e-6)


def test_load_ensemble_checks_members_and_averages_the_threshold(tmp_path):
    spec = {**_spec("classifier"), "classes": 1, "input_size": 32}
    for i, thr in enumerate((0.2, 0.6)):
        M.save(M.build(spec), {**spec, "threshold": thr}, tmp_path / f"{i}.pt", tmp_path / f"{i}.json")
    model, s = M.load_ensemble([tmp_path / "0.pt", tmp_path / "1.pt"])
    assert isinstance(model, M.Ensemble) and s["threshold"] == pytest.approx(0.4) and len(s["ensemble"]) == 2
    single, s1 = M.load_ensemble([tmp_path / "0.pt"])
    assert not isinstance(single, M.Ensemble) and s1["threshold"] == 0.2
    M.save(M.build(spec), {**spec, "input_size": spec["input_size"] * 2}, tmp_path / "2.pt", tmp_path / "2.json")
    with pytest.raises(ModelFileError, match=r"cannot join an ensemble .* differ in \['input_size'\]"):
        M.load_ensemble([tmp_path / "0.pt", tmp_path / "2.pt"])


@pytest.mark.parametrize("weights", [None, "imagenet"])
def test_training_spec_records_input_statistics_only_for_imagenet_encoders(weights, monkeypatch):
    """train.make_spec writes the statistics into model.json when training starts from ImageNet weights (the
    lookup is stubbed: it reads smp's cache); scratch models and the 3D U-Net get none."""
    import segmentation_models_pytorch.encoders as enc

    from liverseg import config as C
    from liverseg.train import make_spec

    monkeypatch.setattr(enc, "get_preprocessing_params",
                        lambda name, pretrained: {"mean": [0.1, 0.2, 0.3], "std": [1.0, 2.0, 3.0]})
    cfg = C.load(None, {"train": {"encoder_weights": weights}})
    grid = {"slice_size": 64, "spacing_mm": 2.0, "context_mm_auto": 5.0}
    for role in ROLES:
        spec = make_spec(cfg, role, grid)
        if weights and spec["kind"] != "unet3d":
            c = spec["in_channels"]
            assert spec["input_norm"] == {"mean": [[0.1, 0.2, 0.3][i % 3] for i in range(c)],
                                          "std": [[1.0, 2.0, 3.0][i % 3] for i in range(c)]}
        else:
            assert "input_norm" not in spec


def test_full_resolution_node_is_built_from_the_config_and_shapes_the_output(monkeypatch):
    """train.<role>.full_res_channels (default 16) gives a segmenter the UNet++ node at input resolution (its spec
    names the architecture, so a model file rebuilds it); 0 leaves smp's UNet++ and the spec as before.  The node
    is on the path to the output: its weights receive gradient, and zeroing them changes the prediction."""
    from liverseg import config as C
    from liverseg.train import make_spec

    _no_downloads(monkeypatch)
    grid = {"slice_size": 64, "spacing_mm": 2.0, "context_mm_auto": 5.0}
    plain = make_spec(C.load(None, {"train": {"model_b": {"full_res_channels": 0}}}), "model_b", grid)
    assert "full_res_channels" not in plain and plain["arch"] == "UnetPlusPlus"
    assert type(M.build(plain)).__name__ == "UnetPlusPlus"
    for role, want in (("model_a", 16), ("model_b", 16), ("classifier", None), ("v3_convlstm", None)):
        assert make_spec(C.load(None, {}), role, grid).get("full_res_channels") == want, role
    spec = make_spec(C.load(None, {"train": {"model_b": {"full_res_channels": 8}}}), "model_b", grid)
    assert spec["full_res_channels"] == 8 and spec["arch"] == "UnetPlusPlusFullRes"
    torch.manual_seed(0)
    model = M.build(dict(TINY["segmenter_full_res"][0]))
    assert isinstance(model, M.UnetPlusPlusFullRes)
    x = torch.rand(2, 3, 32, 32)
    model(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.stem.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        before = model(x)
        for p in model.stem.parameters():
            p.zero_()
        assert not torch.allclose(model(x), before)
