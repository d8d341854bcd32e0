"""Segmentation networks, their part map, head replacement and fine-tuning modes (bundle.networks)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bundle.networks.classifiers import build_classifier
from bundle.networks.finetune import (EncoderWarmupHandler, ResidualAdapter, add_adapters, adapter_module_names,
                                      prepare_finetune, replace_head, set_trainable)
from bundle.networks.segmentation import (build_segmenter, decoder_stage_names, encoder_module_names,
                                          encoder_parameter_names, head_module_names, head_out_channels,
                                          head_parameter_names, matches_prefix, network_parts, part_of)



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


UNET_ENCODER = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0",
                "model.1.submodule.1.submodule.1.submodule.0",
                "model.1.submodule.1.submodule.1.submodule.1.submodule"]
UNET_DECODER = ["model.1.submodule.1.submodule.1.submodule.2", "model.1.submodule.1.submodule.2",
                "model.1.submodule.2"]


def _net(arch: str, out_channels: int = 3, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_segmenter(arch, out_channels=out_channels, **kwargs)


def _x(h: int = 32, w: int = 32, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 1, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# factory and part map
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["segresnet", "unet", "UNet"])
@pytest.mark.parametrize("hw", [(32, 32), (64, 48)])
def test_build_segmenter_output_shape(arch, hw):
    net = _net(arch, out_channels=5)
    with torch.no_grad():
        y = net(_x(*hw))
    assert y.shape == (2, 5, *hw)
    assert head_out_channels(net) == 5


def test_build_segmenter_defaults_and_overrides():
    seg = build_segmenter()
    assert type(seg).__name__ == "SegResNet" and seg.init_filters == 8 and tuple(seg.blocks_down) == (1, 2, 2, 4)
    assert head_out_channels(seg) == 14
    unet = build_segmenter("unet", channels=[8, 16, 32], strides=[2, 2])  # YAML lists
    assert tuple(unet.channels) == (8, 16, 32) and unet.num_res_units == 2
    with pytest.raises(ValueError, match="unknown segmentation architecture 'vnet'"):
        build_segmenter("vnet")


def test_segresnet_parts():
    net = _net("segresnet")
    parts = network_parts(net)
    assert encoder_module_names(net) == ["convInit", "down_layers"]
    assert head_module_names(net) == ["conv_final.2"]
    assert decoder_stage_names(net) == ["up_layers.0", "up_layers.1", "up_layers.2"]
    assert head_parameter_names(net) == ["conv_final.2.conv.weight", "conv_final.2.conv.bias"]
    assert part_of("conv_final.0.weight", parts) == "decoder"  # the final GroupNorm is not the head
    assert part_of("down_layers.3.2.conv1.conv.weight", parts) == "encoder"
    # the classifier-encoder keeps exactly the segmenter's encoder parameter names
    clf = build_classifier("segresnet_encoder")
    clf_enc = [n for n, _ in clf.named_parameters() if not n.startswith("head.")]
    assert encoder_parameter_names(net) == clf_enc


@pytest.mark.parametrize("num_res_units, head_params", [
    (2, ["model.2.0.conv.weight", "model.2.0.conv.bias", "model.2.0.adn.A.weight",
         "model.2.1.conv.unit0.conv.weight", "model.2.1.conv.unit0.conv.bias"]),
    (0, ["model.2.conv.weight", "model.2.conv.bias"]),
])
def test_unet_parts(num_res_units, head_params):
    net = _net("unet", num_res_units=num_res_units)
    assert encoder_module_names(net) == UNET_ENCODER
    assert decoder_stage_names(net) == UNET_DECODER
    assert head_module_names(net) == ["model.2"]
    assert head_parameter_names(net) == head_params
    # encoder, decoder and head partition the parameters; every encoder/decoder module exists
    parts = network_parts(net)
    names = [n for n, _ in net.named_parameters()]
    counts = {p: sum(part_of(n, parts) == p for n in names) for p in ("encoder", "decoder", "head")}
    assert all(c > 0 for c in counts.values()) and sum(counts.values()) == len(names)
    for name in UNET_ENCODER + UNET_DECODER:
        net.get_submodule(name)


def test_unet_head_is_the_last_layer():
    """Replacing the head's output with a constant must change the network output: model.2 is the last layer."""
    net = _net("unet").eval()
    handle = net.get_submodule("model.2").register_forward_hook(lambda m, i, o: torch.full_like(o, 7.0))
    with torch.no_grad():
        y = net(_x())
    handle.remove()
    assert torch.all(y == 7.0)


def test_network_parts_rejects_other_networks():
    with pytest.raises(ValueError, match="no part map for DenseNet"):
        network_parts(build_classifier("densenet_small"))


def test_matches_prefix_is_module_aware():
    assert matches_prefix("model.1.submodule.0.conv.weight", ["model.1.submodule.0"])
    assert not matches_prefix("model.1.submodule.01.weight", ["model.1.submodule.0"])


# ---------------------------------------------------------------------------------------------------------------------
# head replacement
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["segresnet", "unet"])
def test_replace_head(arch):
    net = _net(arch, out_channels=14)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    head = network_parts(net).head
    torch.manual_seed(123)
    replace_head(net, 3)
    after = net.state_dict()
    assert net.out_channels == 3 and head_out_channels(net) == 3
    assert net(_x()).shape == (2, 3, 32, 32)
    for k, v in before.items():
        if not matches_prefix(k, head):
            assert torch.equal(after[k], v), k
    assert any(after[k].shape != v.shape for k, v in before.items() if matches_prefix(k, head))
    # seeded: the same seed gives the same head, another seed another one
    other = _net(arch, out_channels=14)
    torch.manual_seed(123)
    replace_head(other, 3)
    third = _net(arch, out_channels=14)
    torch.manual_seed(124)
    replace_head(third, 3)
    for name in head_parameter_names(net):
        assert torch.equal(net.get_parameter(name), other.get_parameter(name))
    w = [n for n in head_parameter_names(net) if n.endswith("weight") and net.get_parameter(n).numel() > 1][0]
    assert not torch.equal(net.get_parameter(w), third.get_parameter(w))
    with pytest.raises(ValueError):
        replace_head(net, 0)


# ---------------------------------------------------------------------------------------------------------------------
# fine-tuning modes
# ---------------------------------------------------------------------------------------------------------------------
def test_full_mode_and_encoder_lr():
    net = _net("segresnet")
    set_trainable(net, False)
    setup = prepare_finetune(net, "full")
    assert all(p.requires_grad for p in net.parameters())
    assert len(setup.params) == len(list(net.parameters())) and setup.handler is None and setup.handlers == []
    assert setup.summary.frozen == 0 and setup.summary.trainable == sum(p.numel() for p in net.parameters())
    groups = prepare_finetune(net, "full", encoder_lr=1e-5).params
    enc = {id(net.get_parameter(n)) for n in encoder_parameter_names(net)}
    assert groups[0]["lr"] == 1e-5 and {id(p) for p in groups[0]["params"]} == enc
    assert "lr" not in groups[1] and len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    opt = torch.optim.Adam(groups, lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-3]
    with pytest.raises(ValueError, match="unknown fine-tuning mode"):
        prepare_finetune(net, "lora")


@pytest.mark.parametrize("arch", ["segresnet", "unet"])
def test_adapter_mode_identity_at_init_and_trainable_set(arch):
    pre = _net(arch, out_channels=3).eval()
    net = copy.deepcopy(pre)
    pre_keys = set(pre.state_dict())
    setup = prepare_finetune(net, "adapter")
    net.eval()
    x = _x()
    with torch.no_grad():
        assert torch.equal(net(x), pre(x))  # zero-initialised adapters: the pre-trained function
    adapters = adapter_module_names(net)
    assert adapters == [f"{s}.adapter" for s in decoder_stage_names(net)] == setup.summary.adapters
    assert pre_keys <= set(net.state_dict())  # pre-trained names unchanged: checkpoints still load by name
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    expected = {n for n, _ in net.named_parameters() if matches_prefix(n, adapters + head_module_names(net))}
    assert trainable == expected and any(".adapter." in n for n in trainable)
    assert {id(p) for p in setup.params} == {id(net.get_parameter(n)) for n in trainable}
    s = setup.summary
    assert s.trainable == s.adapter_params + s.head_params and s.frozen == sum(
        p.numel() for p in net.parameters() if not p.requires_grad) and s.trainable < 0.05 * s.frozen
    # the adapters are in the forward path: perturbing one changes the output
    with torch.no_grad():
        net.get_submodule(adapters[-1]).up.weight.fill_(0.1)
        assert not torch.allclose(net(x), pre(x))
    # idempotent: no second adapter
    prepare_finetune(net, "adapter")
    assert adapter_module_names(net) == adapters


def test_adapter_mode_training_step_only_moves_adapters_and_head():
    net = _net("segresnet")
    setup = prepare_finetune(net, "adapter")
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(setup.params, lr=0.5)
    net.train()
    loss = net(_x()).square().mean()
    loss.backward()
    opt.step()
    moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    assert "conv_final.2.conv.weight" in moved and any(n.endswith("adapter.up.weight") for n in moved)
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


def test_adapter_is_scriptable():
    net = _net("segresnet")
    add_adapters(net)
    net.eval()
    scripted = torch.jit.script(net)
    x = _x()
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x))


def test_residual_adapter_zero_init():
    a = ResidualAdapter(2, 16, reduction=4)
    x = torch.randn(1, 16, 4, 4)
    assert a.down.out_channels == 4 and torch.equal(a(x), x)


def test_frozen_batchnorm_keeps_running_stats():
    net = _net("unet", norm="batch", channels=(8, 16, 32), strides=(2, 2))
    setup = prepare_finetune(net, "adapter")
    assert setup.summary.frozen > 0
    bn = [m for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith("model.0")][0]
    mean = bn.running_mean.clone()
    net.train()
    net(_x() * 3 + 1)
    assert torch.equal(bn.running_mean, mean)
    set_trainable(net, True)
    assert bn.momentum == 0.1
    net(_x() * 3 + 1)
    assert not torch.equal(bn.running_mean, mean)


# ---------------------------------------------------------------------------------------------------------------------
# warm-up handler with a real ignite engine
# ---------------------------------------------------------------------------------------------------------------------
def test_warmup_handler_freezes_then_unfreezes(caplog):
    from ignite.engine import Engine, Events

    net = _net("segresnet")
    setup = prepare_finetune(net, "warmup", warmup_epochs=2)
    assert isinstance(setup.handler, EncoderWarmupHandler) and setup.handlers == [setup.handler]
    assert all(p.requires_grad for p in net.parameters())  # frozen by the handler at STARTED, not before
    assert setup.summary.frozen_during_warmup == sum(net.get_parameter(n).numel() for n in encoder_parameter_names(net))
    opt = torch.optim.SGD(setup.params, lr=0.1)
    enc_name, dec_name = "convInit.conv.weight", "up_layers.0.0.conv1.conv.weight"
    x = _x(16, 16, b=1)

    def step(engine, batch):
        opt.zero_grad(set_to_none=True)
        net(x).mean().backward()
        opt.step()
        return {"enc": net.get_parameter(enc_name).requires_grad, "dec": net.get_parameter(dec_name).requires_grad}

    engine = Engine(step)
    setup.handler.attach(engine)
    setup.handler.attach(engine)  # idempotent
    assert engine.has_event_handler(setup.handler.started, Events.STARTED)
    seen: dict[int, tuple[bool, bool]] = {}
    weights: dict[int, torch.Tensor] = {0: net.get_parameter(enc_name).detach().clone()}

    @engine.on(Events.ITERATION_COMPLETED)
    def record(e):
        seen[e.state.epoch] = (e.state.output["enc"], e.state.output["dec"])

    @engine.on(Events.EPOCH_COMPLETED)
    def snapshot(e):
        weights[e.state.epoch] = net.get_parameter(enc_name).detach().clone()

    with caplog.at_level("INFO", logger="bundle.networks.finetune"):
        engine.run([0, 1], max_epochs=4)
    assert seen == {1: (False, True), 2: (False, True), 3: (True, True), 4: (True, True)}
    assert torch.equal(weights[2], weights[0])  # frozen encoder did not move during warm-up
    assert not torch.equal(weights[3], weights[2])  # ...and trains after it
    assert not setup.handler.frozen
    assert "frozen until the end of epoch 2" in caplog.text and "unfrozen" in caplog.text


def test_warmup_handler_resumed_past_warmup_and_validation():
    net = _net("segresnet")
    handler = EncoderWarmupHandler(net, warmup_epochs=2)
    handler.started(SimpleNamespace(state=SimpleNamespace(epoch=3)))  # resumed after the warm-up
    assert not handler.frozen and all(p.requires_grad for p in net.parameters())
    handler.started(SimpleNamespace(state=SimpleNamespace(epoch=1)))  # resumed inside the warm-up
    assert handler.frozen and not net.get_parameter("convInit.conv.weight").requires_grad
    assert net.get_parameter("conv_final.2.conv.weight").requires_grad
    with pytest.raises(ValueError, match="no parameter"):
        EncoderWarmupHandler(net, 1, encoder_names=["encoder"])
    with pytest.raises(ValueError):
        EncoderWarmupHandler(net, -1)
