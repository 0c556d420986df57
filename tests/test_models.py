"""Tests for trainer.model.encoders: encoders, builder, config and the plain-torchvision export."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from trainer.model.encoders import (
    ARCHS,
    CONVNET_WIDTHS,
    EncoderConfig,
    ResNetEncoder,
    SmallConvNet,
    build_encoder,
    encoder_num_params,
)
from trainer.model.export import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    export_encoder,
    load_encoder,
    read_export_config,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomize_buffers(model: nn.Module) -> None:
    """Give BatchNorm running stats non-default values so that exports must carry them."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)


def _assert_unit_rows(out: torch.Tensor, batch: int, low_dim: int) -> None:
    assert out.shape == (batch, low_dim)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(batch), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- shapes and norms


@pytest.mark.parametrize(
    ("arch", "cifar_stem", "batch", "size"),
    [
        ("small", None, 3, 32),
        ("resnet18", True, 2, 32),
        ("resnet18", False, 2, 64),
        ("resnet50", True, 1, 32),
    ],
)
def test_output_shape_and_unit_norm(arch: str, cifar_stem: bool | None, batch: int, size: int):
    model = build_encoder(arch, low_dim=16, cifar_stem=cifar_stem).eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    _assert_unit_rows(out, batch, 16)


@settings(max_examples=10, deadline=None)
@given(low_dim=st.integers(1, 300), batch=st.integers(2, 5))
def test_small_any_low_dim_gives_unit_rows(low_dim: int, batch: int):
    model = SmallConvNet(low_dim=low_dim)
    out = model(torch.randn(batch, 3, 32, 32))  # train mode: batch statistics
    _assert_unit_rows(out.detach(), batch, low_dim)


def test_forward_is_plain_network_then_l2_normalize():
    model = build_encoder("resnet18", low_dim=8, cifar_stem=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = torchvision.models.ResNet.forward(model, x)
        expected = raw / raw.norm(dim=1, keepdim=True)
        torch.testing.assert_close(model(x), expected)


# --------------------------------------------------------------------------- resnet structure


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_cifar_stem_replaces_conv1_and_maxpool(arch: str):
    model = build_encoder(arch, low_dim=128, cifar_stem=True)
    assert isinstance(model.conv1, nn.Conv2d)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1)
    assert model.conv1.bias is None
    assert (model.conv1.in_channels, model.conv1.out_channels) == (3, 64)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 128


def test_default_stem_is_torchvision_stem():
    model = build_encoder("resnet18")
    assert model.conv1.kernel_size == (7, 7)
    assert model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("cifar_stem", [False, True])
def test_resnet18_state_dict_keys_equal_torchvision(cifar_stem: bool):
    ours = build_encoder("resnet18", low_dim=32, cifar_stem=cifar_stem).state_dict()
    ref = torchvision.models.resnet18(weights=None, num_classes=32).state_dict()
    assert list(ours) == list(ref)
    changed = {"conv1.weight"} if cifar_stem else set()
    for key, value in ref.items():
        if key not in changed:
            assert ours[key].shape == value.shape, key
    if cifar_stem:
        assert ours["conv1.weight"].shape == (64, 3, 3, 3)


def test_resnet50_state_dict_keys_equal_torchvision():
    ours = ResNetEncoder("resnet50", low_dim=128).state_dict()
    ref = torchvision.models.resnet50(weights=None, num_classes=128).state_dict()
    assert list(ours) == list(ref)
    assert all(ours[k].shape == v.shape for k, v in ref.items())


# --------------------------------------------------------------------------- learning


def test_small_convnet_gradient_reaches_every_parameter():
    model = build_encoder("small", low_dim=16)
    x = torch.randn(4, 3, 32, 32)
    target = F.normalize(torch.randn(4, 16), dim=1)
    loss = -(model(x) * target).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_small_convnet_overfits_toy_instance_task():
    """Instance discrimination on 16 fixed images against 16 fixed target directions."""
    n, low_dim, tau = 16, 32, 0.1
    images = torch.randn(n, 3, 32, 32)
    targets = F.normalize(torch.randn(n, low_dim), dim=1)
    labels = torch.arange(n)
    model = build_encoder("small", low_dim=low_dim)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images) @ targets.T / tau, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


# --------------------------------------------------------------------------- builder and config


def test_unknown_arch_names_it_and_lists_choices():
    with pytest.raises(ValueError, match="'vgg16'") as info:
        build_encoder("vgg16")
    for arch in ARCHS:
        assert arch in str(info.value)


@pytest.mark.parametrize("low_dim", [0, -3, 1.5, "128", True, None])
def test_bad_low_dim(low_dim: Any):
    with pytest.raises(ValueError, match="low_dim"):
        build_encoder("small", low_dim=low_dim)


def test_bad_cifar_stem():
    with pytest.raises(ValueError, match="cifar_stem"):
        build_encoder("small", cifar_stem=True)
    with pytest.raises(ValueError, match="cifar_stem"):
        EncoderConfig("resnet18", 128, cifar_stem="yes")  # type: ignore[arg-type]


def test_config_resolves_and_round_trips():
    config = EncoderConfig("resnet18", 64)
    assert config.cifar_stem is False
    assert config.to_dict() == {"arch": "resnet18", "low_dim": 64, "cifar_stem": False}
    assert EncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert EncoderConfig.from_dict({"arch": "small"}) == EncoderConfig("small", 128, False)


def test_config_for_preset_gives_resnets_the_cifar_stem_below_imagenet_size():
    assert EncoderConfig.for_preset("resnet18", 128, "cifar").cifar_stem is True
    assert EncoderConfig.for_preset("resnet50", 64, "digits").cifar_stem is True
    assert EncoderConfig.for_preset("resnet18", 128, "imagenet").cifar_stem is False
    for arch in CONVNET_WIDTHS:
        for preset in ("cifar", "imagenet"):
            assert EncoderConfig.for_preset(arch, 32, preset) == EncoderConfig(arch, 32, False)


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    low_dim=st.integers(1, 4096),
    cifar_stem=st.sampled_from([None, False, True]),
)
def test_config_round_trip_property(arch: str, low_dim: int, cifar_stem: bool | None):
    if arch in CONVNET_WIDTHS and cifar_stem:
        with pytest.raises(ValueError):
            EncoderConfig(arch, low_dim, cifar_stem)
        return
    config = EncoderConfig(arch, low_dim, cifar_stem)
    assert EncoderConfig.from_dict(config.to_dict()) == config
    assert config.cifar_stem == bool(cifar_stem)


def test_config_from_dict_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="lowdim"):
        EncoderConfig.from_dict({"arch": "small", "lowdim": 3})
    with pytest.raises(ValueError, match="arch"):
        EncoderConfig.from_dict({"arch": "alexnet"})
    with pytest.raises(ValueError, match="mapping"):
        EncoderConfig.from_dict(["small"])  # type: ignore[arg-type]


def test_encoder_num_params_matches_plain_count():
    model = build_encoder("resnet18", low_dim=128)
    ref = torchvision.models.resnet18(weights=None, num_classes=128)
    assert encoder_num_params(model) == sum(p.numel() for p in ref.parameters())
    small = build_encoder("small")
    small[0].weight.requires_grad_(False)
    total = sum(p.numel() for p in small.parameters())
    assert encoder_num_params(small) == total
    assert encoder_num_params(small, trainable_only=True) == total - small[0].weight.numel()


# --------------------------------------------------------------------------- export


def _plain_torchvision_resnet(doc: dict[str, Any]) -> nn.Module:
    """What a user without this project writes after reading encoder.json."""
    ctor = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
    model = ctor[doc["arch"]](weights=None, num_classes=doc["low_dim"])
    if doc["cifar_stem"]:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _resolve(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _plain_from_build_section(build: dict[str, Any]) -> nn.Module:
    """Rebuild from the machine-readable "build" section with torch/torchvision only."""
    if "layers" in build:
        return _resolve(build["constructor"])(
            *(_resolve(layer["class"])(**layer["kwargs"]) for layer in build["layers"])
        )
    model = _resolve(build["constructor"])(**build["kwargs"])
    for attr, spec in build["replace"].items():
        setattr(model, attr, _resolve(spec["class"])(**spec["kwargs"]))
    return model


def _trained_export(tmp_path: Path, arch: str, cifar_stem: bool | None, low_dim: int = 16):
    config = EncoderConfig(arch, low_dim, cifar_stem)
    model = build_encoder(**config.to_dict())
    _randomize_buffers(model)
    model.eval()
    out_dir = tmp_path / "export"
    export_encoder(model, config, out_dir, metadata={"mean": [0.5] * 3})
    return model, config, out_dir


def _only_tensors(state: dict[str, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


@pytest.mark.parametrize(("arch", "cifar_stem"), [("resnet18", True), ("resnet18", False)])
def test_export_loads_into_plain_torchvision(tmp_path: Path, arch: str, cifar_stem: bool):
    model, _, out_dir = _trained_export(tmp_path, arch, cifar_stem)
    doc = json.loads((out_dir / CONFIG_FILE).read_text())
    assert (doc["arch"], doc["low_dim"], doc["cifar_stem"]) == (arch, 16, cifar_stem)
    assert doc["normalization"] == {"kind": "l2", "dim": 1}
    assert doc["metadata"] == {"mean": [0.5] * 3}
    state = torch.load(out_dir / WEIGHTS_FILE, weights_only=True)
    assert _only_tensors(state)

    x = torch.randn(2, 3, 16, 16)  # small input keeps the three resnet forwards fast
    with torch.no_grad():
        expected = model(x)
        for plain in (_plain_torchvision_resnet(doc), _plain_from_build_section(doc["build"])):
            assert type(plain) is torchvision.models.ResNet
            plain.load_state_dict(state, strict=True)
            plain.eval()
            torch.testing.assert_close(F.normalize(plain(x), dim=1), expected, rtol=0, atol=0)


def test_export_small_loads_into_plain_sequential(tmp_path: Path):
    model, _, out_dir = _trained_export(tmp_path, "small", None)
    doc = json.loads((out_dir / CONFIG_FILE).read_text())
    plain = _plain_from_build_section(doc["build"])
    assert type(plain) is nn.Sequential
    plain.load_state_dict(torch.load(out_dir / WEIGHTS_FILE, weights_only=True), strict=True)
    plain.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(plain(x), dim=1), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "cifar_stem"), [("small", None), ("resnet18", True)])
def test_export_python_recipe_runs(tmp_path: Path, monkeypatch, arch: str, cifar_stem: bool):
    """The human-readable recipe in encoder.json is valid code giving the same embeddings."""
    model, _, out_dir = _trained_export(tmp_path, arch, cifar_stem)
    doc = read_export_config(out_dir)
    images = torch.randn(2, 3, 16, 16)
    namespace: dict[str, Any] = {"images": images}
    monkeypatch.chdir(out_dir)
    with torch.no_grad():
        exec(doc["python"], namespace)
        torch.testing.assert_close(namespace["embedding"], model(images), rtol=0, atol=0)


@pytest.mark.parametrize(("arch", "cifar_stem"), [("small", None), ("resnet18", True)])
def test_load_encoder_round_trip(tmp_path: Path, arch: str, cifar_stem: bool | None):
    model, _, out_dir = _trained_export(tmp_path, arch, cifar_stem)
    loaded = load_encoder(out_dir)
    assert not loaded.training
    assert type(loaded) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_export_overwrites_previous_export(tmp_path: Path):
    out_dir = tmp_path / "e"
    config = EncoderConfig("small", 8)
    export_encoder(build_encoder("small", 8), config, out_dir)
    second = build_encoder("small", 8)
    export_encoder(second, config, out_dir)
    state = torch.load(out_dir / WEIGHTS_FILE, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in second.state_dict().items())
    assert sorted(p.name for p in out_dir.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_export_rejects_model_config_mismatch(tmp_path: Path):
    out_dir = tmp_path / "bad"
    model = build_encoder("small", low_dim=8)
    with pytest.raises(ValueError, match="wrong shapes"):
        export_encoder(model, EncoderConfig("small", 16), out_dir)
    wrapped = nn.Sequential()
    wrapped.add_module("module", model)  # like a DDP wrapper: "module." prefix
    with pytest.raises(ValueError, match=r"ddp_model\.module"):
        export_encoder(wrapped, EncoderConfig("small", 8), out_dir)
    with pytest.raises(ValueError, match="config"):
        export_encoder(model, {"arch": "small"}, out_dir)  # type: ignore[arg-type]
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_load_encoder_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_encoder(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_encoder(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="npid-encoder"):
        load_encoder(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"format": "npid-encoder", "format_version": 9}))
    with pytest.raises(ValueError, match="format_version"):
        load_encoder(tmp_path)
