"""bfloat16 CPU autocast for training (bundle.networks.precision): the inferer against torch.autocast by hand, the
float32 path bit for bit, float32 gradients and the configs' wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer

from bundle.networks import AutocastInferer, build_segmenter, cpu_bf16_supported

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = build_segmenter("segresnet", out_channels=3).train()
    return net, torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


def test_disabled_is_monai_simple_inferer_bit_for_bit() -> None:
    net, x = _net_and_input()
    out = AutocastInferer(enabled=False)(x, net)
    assert torch.equal(out, SimpleInferer()(x, net))
    assert out.dtype == torch.float32


def test_enabled_matches_torch_autocast_and_returns_float32() -> None:
    net, x = _net_and_input()
    conv_dtypes: list[torch.dtype] = []
    hook = net.convInit.conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    out = AutocastInferer(enabled=True, dtype="bfloat16")(x, net)
    hook.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = net(x)
    assert out.dtype == torch.float32 and ref.dtype == torch.bfloat16
    assert conv_dtypes == [torch.bfloat16]  # the convolutions really ran in bfloat16
    assert torch.equal(out, ref.float())
    full = net(x).detach()
    # bfloat16 has an 8-bit mantissa: close to float32, but not equal (else nothing was cast)
    assert not torch.equal(out, full)
    assert torch.allclose(out, full, rtol=0.05, atol=0.05 * float(full.abs().max()))


def test_gradients_and_weights_stay_float32() -> None:
    net, x = _net_and_input()
    out = AutocastInferer(enabled=True)(x, net)
    out.square().mean().backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_structured_outputs_are_cast_back() -> None:
    class Two(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            y = torch.nn.functional.linear(x, torch.ones(2, x.shape[-1]))
            return {"a": y, "b": (y, torch.arange(3))}

    out = AutocastInferer()(torch.ones(1, 4), Two())
    assert out["a"].dtype == torch.float32 and out["b"][0].dtype == torch.float32
    assert out["b"][1].dtype == torch.int64  # integer outputs are left alone


def test_bad_dtype_is_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        AutocastInferer(dtype="Tensor")  # an attribute of torch that is not a dtype


@pytest.mark.parametrize("config", ["train.yaml", "pretrain.yaml"])
def test_configs_train_under_bf16_where_the_cpu_has_it(config: str) -> None:
    """Fine-tuning autocasts where the CPU has native bfloat16; the pre-training stays float32 by default (its DoLL
    fit was lower in bfloat16 on 2 of 3 seeds) and can be switched on."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    inferer = parser.get_parsed_content("train#inferer")
    assert isinstance(inferer, AutocastInferer)
    assert inferer.enabled == (cpu_bf16_supported() if config == "train.yaml" else False)
    parser["cpu_bf16"] = False
    parser.parse(True)
    assert parser.get_parsed_content("train#inferer").enabled is False
    # validation stays float32
    assert not isinstance(parser.get_parsed_content("validate#inferer"), AutocastInferer)


@pytest.mark.parametrize("text, expected", [("false", False), ("False", False), ("0", False), ("no", False),
                                            ("true", True), ("TRUE", True), ("1", True), ("yes", True)])
def test_command_line_flags_are_read_as_booleans(text: str, expected: bool) -> None:
    """``--cpu_bf16 false`` reaches the config as the string ``'false'``: it must switch autocast off."""
    assert AutocastInferer(enabled=text).enabled is expected
    net, x = _net_and_input()
    if not expected:
        assert AutocastInferer(enabled=text)(x, net).dtype == torch.float32
        assert torch.equal(AutocastInferer(enabled=text)(x, net), net(x))


def test_command_line_override_reaches_the_config() -> None:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.yaml"))
    parser["cpu_bf16"] = "false"  # what `python -m monai.bundle run ... --cpu_bf16 false` sets
    assert parser.get_parsed_content("train#inferer").enabled is False


def test_not_a_flag_is_rejected() -> None:
    with pytest.raises(ValueError, match="enabled must be a boolean, got 'maybe'"):
        AutocastInferer(enabled="maybe")
