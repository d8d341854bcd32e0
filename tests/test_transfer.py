"""Weight transfer with a report: DoLL -> fine-tune, classifier-encoder, external, and mismatched checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from bundle.networks.classifiers import build_classifier
from bundle.networks.segmentation import build_segmenter, encoder_parameter_names, head_module_names, matches_prefix
from bundle.networks.transfer import (TransferReport, initialise_segmenter, load_encoder_from_classifier,
                                      load_external, load_pretrained, read_state_dict)
from bundle.utils import BundleInputError


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(arch: str = "segresnet", out_channels: int = 3, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_segmenter(arch, out_channels=out_channels, **kwargs)


def _snapshot(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _save_with_checkpoint_saver(net: torch.nn.Module, folder) -> str:
    """Save ``{"network": ..., "optimizer": ...}`` the way the training configs do: MONAI's CheckpointSaver."""
    from ignite.engine import Engine
    from monai.handlers import CheckpointSaver

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    engine = Engine(lambda e, b: None)
    CheckpointSaver(save_dir=str(folder), save_dict={"network": net, "optimizer": opt}, save_final=True,
                    final_filename="doll_final.pt").attach(engine)
    engine.run([0], max_epochs=1)
    return str(folder / "doll_final.pt")


# ---------------------------------------------------------------------------------------------------------------------
# DoLL checkpoint -> fine-tune network (new head)
# ---------------------------------------------------------------------------------------------------------------------
def test_doll_segresnet_checkpoint_into_finetune_net(tmp_path, caplog):
    pre = _net(out_channels=14, seed=1)
    path = _save_with_checkpoint_saver(pre, tmp_path)
    assert set(torch.load(path, weights_only=True)) == {"network", "optimizer"}
    net = _net(out_channels=3, seed=2)
    init = _snapshot(net)
    with caplog.at_level("INFO", logger="bundle.networks.transfer"):
        report = load_pretrained(net, path)
    src, dst = pre.state_dict(), net.state_dict()
    head = head_module_names(net)
    for k, v in dst.items():
        if matches_prefix(k, head):
            assert v.shape != src[k].shape and torch.equal(v, init[k]), k  # new head, left at its init
        else:
            assert torch.equal(v, src[k]), k
    assert {(n, s, d) for n, s, d in report.skipped_shape} == {
        ("conv_final.2.conv.weight", (14, 8, 1, 1), (3, 8, 1, 1)), ("conv_final.2.conv.bias", (14,), (3,))}
    assert len(report.loaded) == len(dst) - 2 and report.non_head_fraction == 1.0
    assert report.missing_in_source == [] and report.unused_in_source == [] and report.skipped_head == []
    assert sorted(report.reinitialised) == ["conv_final.2.conv.bias", "conv_final.2.conv.weight"]
    text = str(report)
    assert path in text and "conv_final.2.conv.weight (14, 8, 1, 1)->(3, 8, 1, 1)" in text
    assert path in caplog.text  # logged
    d = json.loads(json.dumps(report.as_dict()))
    assert d["transfer_loaded"] == len(dst) - 2 and d["skipped_shape"][0]["head"] is True
    assert all(isinstance(v, float) for v in report.scalars().values())


@pytest.mark.parametrize("num_res_units", [2, 0])
def test_doll_unet_checkpoint_into_finetune_net(tmp_path, num_res_units):
    kw = {"channels": (8, 16, 32, 64, 128), "num_res_units": num_res_units}
    pre = _net("unet", out_channels=14, seed=1, **kw)
    path = tmp_path / "unet.pt"
    torch.save({"network": pre.state_dict()}, path)
    net = _net("unet", out_channels=3, seed=2, **kw)
    init = _snapshot(net)
    report = load_pretrained(net, path)
    src = pre.state_dict()
    for k, v in net.state_dict().items():
        if k.startswith("model.2."):  # the head: entirely new, including the shape-agnostic PReLU slope
            assert torch.equal(v, init[k]), k
        else:
            assert torch.equal(v, src[k]), k
    assert all(n.startswith("model.2.") for n, _, _ in report.skipped_shape) and report.skipped_shape
    assert report.skipped_head == (["model.2.0.adn.A.weight"] if num_res_units else [])
    assert report.non_head_fraction == 1.0 and set(report.head) == {k for k in src if k.startswith("model.2.")}


def test_same_head_loads_everything_and_checkpoint_variants(tmp_path):
    pre = _net(out_channels=3, seed=1)
    src = pre.state_dict()
    variants = {
        "bare.pt": src,
        "model.pth": {"model": src, "epoch": 7},
        "ddp.pt": {"network": {f"module.{k}": v for k, v in src.items()}, "optimizer": {"state": {}}},
    }
    for name, obj in variants.items():
        torch.save(obj, tmp_path / name)
        net = _net(out_channels=3, seed=2)
        report = load_pretrained(net, tmp_path / name)
        assert len(report.loaded) == len(src) and not report.reinitialised, name
        assert all(torch.equal(v, src[k]) for k, v in net.state_dict().items()), name
    # in-memory state dict and key_prefix_map
    net = _net(out_channels=3, seed=2)
    report = load_pretrained(net, {f"backbone.{k}": v for k, v in src.items()}, key_prefix_map={"backbone.": ""})
    assert report.source == "<state_dict>" and len(report.loaded) == len(src)
    # ambiguous checkpoint dicts need checkpoint_key
    torch.save({"student": src, "teacher": src}, tmp_path / "two.pt")
    with pytest.raises(BundleInputError, match="checkpoint_key"):
        read_state_dict(tmp_path / "two.pt")
    assert len(read_state_dict(tmp_path / "two.pt", checkpoint_key="teacher")[0]) == len(src)


# ---------------------------------------------------------------------------------------------------------------------
# mismatched checkpoints fail clearly and leave the network untouched
# ---------------------------------------------------------------------------------------------------------------------
def test_unet_checkpoint_into_segresnet_fails(tmp_path):
    path = tmp_path / "unet_doll.pt"
    torch.save({"network": _net("unet", out_channels=14, channels=(8, 16, 32, 64, 128)).state_dict()}, path)
    net = _net()
    init = _snapshot(net)
    with pytest.raises(ValueError) as err:
        load_pretrained(net, path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and "0 keys match by name and shape" in msg and "SegResNet" in msg
    assert all(torch.equal(v, init[k]) for k, v in net.state_dict().items())


def test_random_state_dict_fails(tmp_path):
    path = tmp_path / "random.pt"
    torch.save({"fc.weight": torch.randn(4, 4), "fc.bias": torch.randn(4)}, path)
    with pytest.raises(BundleInputError, match=r"random\.pt: no tensor of the checkpoint matches"):
        load_pretrained(_net(), path)


def test_other_configuration_fails_with_counts(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(_net(out_channels=14, init_filters=16).state_dict(), path)
    with pytest.raises(BundleInputError) as err:
        load_pretrained(_net(), path)
    assert "0 keys match by name and shape (83 by name only" in str(err.value)


def test_strict_shapes_and_min_fraction(tmp_path):
    src = _net(out_channels=3, seed=1).state_dict()
    bad = dict(src)
    bad["up_layers.0.0.conv1.conv.weight"] = torch.zeros(32, 32, 1, 1)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(BundleInputError, match=r"1 non-head tensors .* up_layers\.0\.0\.conv1\.conv\.weight \[decod"):
        load_pretrained(_net(), tmp_path / "bad.pt")
    net = _net()
    report = load_pretrained(net, tmp_path / "bad.pt", strict_shapes=False)
    assert [n for n, _, _ in report.skipped_shape] == ["up_layers.0.0.conv1.conv.weight"]
    assert len(report.loaded) == len(src) - 1
    # only the encoder: 58 of 81 non-head tensors
    enc = {k: v for k, v in src.items() if k.startswith(("convInit", "down_layers"))}
    torch.save(enc, tmp_path / "enc.pt")
    with pytest.raises(BundleInputError, match=r"only 58 of the 81 non-head tensors"):
        load_pretrained(_net(), tmp_path / "enc.pt", min_fraction=0.9)
    report = load_pretrained(_net(), tmp_path / "enc.pt", min_fraction=0.5)
    assert len(report.missing_in_source) == len(src) - len(enc)


def test_exclude(tmp_path):
    src = _net(out_channels=3, seed=1).state_dict()
    net = _net(out_channels=3, seed=2)
    init = _snapshot(net)
    report = load_pretrained(net, src, exclude=("up_layers", "*.norm1.bias"))
    assert report.excluded and all(k.startswith("up_layers") or k.endswith("norm1.bias") for k in report.excluded)
    for k, v in net.state_dict().items():
        assert torch.equal(v, init[k] if k in report.excluded else src[k]), k


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(BundleInputError, match=r"nope\.pt: checkpoint file not found"):
        load_pretrained(_net(), tmp_path / "nope.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BundleInputError, match=r"corrupt\.pt: cannot read checkpoint"):
        load_pretrained(_net(), tmp_path / "corrupt.pt")


# ---------------------------------------------------------------------------------------------------------------------
# classifier-encoder and external initialisation
# ---------------------------------------------------------------------------------------------------------------------
def test_classifier_encoder_transfer(tmp_path):
    torch.manual_seed(5)
    clf = build_classifier("segresnet_encoder")
    path = tmp_path / "clf.pt"
    torch.save({"network": clf.state_dict(), "optimizer": {}}, path)
    net = _net(out_channels=3, seed=2)
    init = _snapshot(net)
    report = load_encoder_from_classifier(net, path)
    csd = clf.state_dict()
    enc = set(encoder_parameter_names(net))
    assert set(report.loaded) == enc and len(enc) == 58
    for k, v in net.state_dict().items():
        assert torch.equal(v, csd[k] if k in enc else init[k]), k
    assert set(report.unused_in_source) == {k for k in csd if k.startswith("head.")}
    assert set(report.missing_in_source) == set(net.state_dict()) - enc
    assert str(path) in str(report)


def test_classifier_encoder_mismatch_fails(tmp_path):
    torch.save(build_classifier("densenet_small").state_dict(), tmp_path / "dense.pt")
    with pytest.raises(BundleInputError, match=r"dense\.pt: not a segresnet_encoder classifier"):
        load_encoder_from_classifier(_net(), tmp_path / "dense.pt")
    torch.save(build_classifier("segresnet_encoder", blocks_down=(1, 2, 2)).state_dict(), tmp_path / "short.pt")
    net = _net()
    init = _snapshot(net)
    with pytest.raises(BundleInputError, match=r"short\.pt: the classifier's encoder does not match.*down_layers\.3"):
        load_encoder_from_classifier(net, tmp_path / "short.pt")
    assert all(torch.equal(v, init[k]) for k, v in net.state_dict().items())
    torch.save(build_classifier("segresnet_encoder", init_filters=16).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(BundleInputError, match="other shape: convInit.conv.weight"):
        load_encoder_from_classifier(_net(), tmp_path / "wide.pt")
    with pytest.raises(ValueError, match="needs a SegResNet"):
        load_encoder_from_classifier(_net("unet", channels=(8, 16, 32), strides=(2, 2)), tmp_path / "short.pt")


def test_external_and_initialise_dispatch(tmp_path):
    # an external SegResNet trained with 3 input channels (ImageNet-like): convInit is skipped, the rest loads
    ext = _net(out_channels=5, seed=1, in_channels=3).state_dict()
    torch.save(ext, tmp_path / "external.pt")
    net = _net(out_channels=3, seed=2)
    report = load_external(net, tmp_path / "external.pt")
    assert [n for n, _, _ in report.skipped_shape if n.startswith("convInit")] == ["convInit.conv.weight"]
    assert torch.equal(net.state_dict()["down_layers.1.0.conv.weight"], ext["down_layers.1.0.conv.weight"])
    assert isinstance(initialise_segmenter(_net(), "external", tmp_path / "external.pt"), TransferReport)
    assert initialise_segmenter(_net(), "random") is None
    torch.save(_net(out_channels=14).state_dict(), tmp_path / "doll.pt")
    assert initialise_segmenter(_net(), "doll", tmp_path / "doll.pt").non_head_fraction == 1.0
    with pytest.raises(ValueError, match="needs a checkpoint path"):
        initialise_segmenter(_net(), "doll")
    with pytest.raises(ValueError, match="unknown initialisation"):
        initialise_segmenter(_net(), "imagenet", tmp_path / "doll.pt")
