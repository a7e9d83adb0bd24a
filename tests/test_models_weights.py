"""weights=path loading, checkpoint formats, offline and missing-package errors."""

from __future__ import annotations

import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from nirdml.models import FrozenBatchNorm2d, WeightsUnavailableError, build_model


def _torchvision_resnet18_file(tmp_path: Path) -> tuple[Path, nn.Module]:
    """A random torchvision resnet18 with non-trivial BN statistics, saved as a state_dict."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        net = torchvision.models.resnet18(weights=None)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
                m.num_batches_tracked.fill_(1234)
    path = tmp_path / "resnet18-random.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_weights_path_loads_torchvision_state_dict(tmp_path: Path) -> None:
    path, net = _torchvision_resnet18_file(tmp_path)
    model = build_model("resnet18", 32, weights=path)
    assert model.spec["weights"] == str(path) and model.spec["pretrained"] is False
    assert model.spec["freeze_bn"] is True  # weights from a file count as pretrained
    ours = model.backbone.state_dict()
    ref = net.state_dict()
    assert set(ours) == {k for k in ref if not k.startswith("fc.")}
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k
    # Same function as the torchvision network without its classifier, also in train mode.
    net.fc = nn.Identity()
    net.eval()
    model.train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), net(x), atol=1e-5, rtol=1e-5)


def test_weights_path_loads_our_model_state_and_checkpoints(tmp_path: Path) -> None:
    model = build_model("resnet18", 24, pretrained=False, freeze_bn=True, seed=5)
    state = model.state_dict()
    formats = {
        "bare.pth": state,
        "ckpt.pth": {"model": state, "epoch": 3, "spec": dict(model.spec)},
        "ddp.pth": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in state.items()},
    }
    for name, obj in formats.items():
        path = tmp_path / name
        torch.save(obj, path)
        loaded = build_model("resnet18", 24, weights=path, seed=99)
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, state[k]), (name, k)
        assert sum(isinstance(m, FrozenBatchNorm2d) for m in loaded.modules()) == 20


def test_safetensors_timm_state_dict(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        net = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    model = build_model("timm:resnet18", 16, weights=path)
    ours = model.backbone.net.state_dict()
    for k, v in ours.items():
        assert torch.equal(v, net.state_dict()[k]), k
    # Our "avg" features equal timm's own pooled features (pre-logits) with the same weights.
    net.reset_classifier(0)
    net.eval()
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), net(x), atol=1e-5, rtol=1e-5)


def test_mismatched_weights_are_refused_with_details(tmp_path: Path) -> None:
    path, _ = _torchvision_resnet18_file(tmp_path)
    with pytest.raises(ValueError, match="do not fit torchvision resnet50.*missing"):
        build_model("resnet50", 32, weights=path)
    own = tmp_path / "own.pth"
    torch.save(build_model("small_cnn", 64, in_channels=1).state_dict(), own)
    with pytest.raises(ValueError, match=r"head.weight: file \(64, 256\) vs model \(32, 256\)"):
        build_model("small_cnn", 32, in_channels=1, weights=own)


def test_unreadable_weight_files(tmp_path: Path) -> None:
    bad = tmp_path / "list.pth"
    torch.save([1, 2, 3], bad)
    with pytest.raises(ValueError, match="not a state_dict"):
        build_model("resnet18", 8, weights=bad)
    nested = tmp_path / "nested.pth"
    torch.save({"optimizer": {"lr": 0.1}}, nested)
    with pytest.raises(ValueError, match="'optimizer'"):
        build_model("resnet18", 8, weights=nested)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="weights_only"):
        build_model("resnet18", 8, weights=junk)


def test_offline_torchvision_download_message(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("resnet50", 128)
    msg = str(info.value)
    assert url in msg and "IMAGENET1K_V1" in msg and "name resolution" in msg
    assert "weights='/path/to/resnet50-0676ba61.pth'" in msg
    assert str(Path(torch.hub.get_dir()) / "checkpoints") in msg
    assert "pretrained=False" in msg
    v2 = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    with pytest.raises(WeightsUnavailableError, match=v2):
        build_model("resnet50", 128, pretrained="IMAGENET1K_V2")


def test_offline_timm_download_message(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise ConnectionError("huggingface.co unreachable")

    monkeypatch.setattr(builder, "load_pretrained", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model("timm:resnet18.a1_in1k", 16)
    msg = str(info.value)
    assert "huggingface.co/timm/resnet18.a1_in1k" in msg and "weights='/path/to/" in msg
    assert "pretrained=False" in msg


@pytest.mark.parametrize(
    "arch,module,extra",
    [
        ("efficientnet_lite0", "efficientnet_lite_pytorch", "efficientnet"),
        ("timm:resnet18", "timm", "timm"),
    ],
)
def test_missing_optional_package_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, arch: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"pip install \"nirdml\[{extra}\]\""):
        build_model(arch, 8, pretrained=False)
