import copy

import pytest
import torch

from segcore.unet import UNet, UNetConfig, flops_per_pixel, fold_batch_norm


@pytest.mark.parametrize("hw", [(1, 1), (7, 13), (37, 53), (64, 64), (100, 159)])
@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(base_width=4, depth=3),
        UNetConfig(in_slices=3, base_width=4, depth=4, norm="instance"),
        UNetConfig(in_slices=5, num_classes=4, base_width=8, depth=5, norm="group"),
        UNetConfig(in_slices=3, base_width=4, depth=4, block="residual"),
        UNetConfig(in_slices=1, base_width=8, depth=3, norm="instance", block="residual"),
    ],
)
def test_any_size_in_same_size_out(cfg: UNetConfig, hw: tuple[int, int]) -> None:
    model = UNet(cfg).eval()
    with torch.no_grad():
        y = model(torch.randn(2, cfg.in_slices, *hw))
    assert y.shape == (2, cfg.num_classes, *hw)
    assert torch.isfinite(y).all()


def test_kits_case_160_width() -> None:
    # The seed's model crashed on KiTS case 160 (512x796); check a scaled version of that aspect ratio.
    model = UNet(UNetConfig(base_width=2, depth=4)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 99)).shape == (1, 3, 64, 99)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"in_slices": 2}, "in_slices"),
        ({"depth": 1}, "depth"),
        ({"norm": "layer"}, "norm"),
        ({"base_width": 0}, "base_width"),
        ({"norm": "group", "base_width": 12}, "group"),
        ({"dropout": 1.0}, "dropout"),
        ({"block": "dense"}, "block"),
    ],
)
def test_bad_config_fails_at_build_time(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        UNetConfig(**kwargs)


def test_wrong_input_channels_is_a_clear_error() -> None:
    model = UNet(UNetConfig(in_slices=3, base_width=4, depth=3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 16, 16))


def test_flops_match_measured_anchor() -> None:
    # ANCHORS.md: base 16 -> 18.4 GFLOP and base 32 -> 73.5 GFLOP per 512x512 slice.
    assert flops_per_pixel(UNetConfig(base_width=16)) * 512 * 512 / 1e9 == pytest.approx(18.4, rel=0.01)
    assert flops_per_pixel(UNetConfig(base_width=32)) * 512 * 512 / 1e9 == pytest.approx(73.5, rel=0.01)


def test_config_roundtrip_and_unknown_field() -> None:
    cfg = UNetConfig(in_slices=3, base_width=8)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        UNetConfig.from_dict({**cfg.to_dict(), "attention": True})


def test_residual_config_roundtrip_and_plain_checkpoints_unchanged() -> None:
    res = UNetConfig(in_slices=3, base_width=8, block="residual")
    assert UNetConfig.from_dict(res.to_dict()) == res and res.to_dict()["block"] == "residual"
    # A plain network's config is written as before the option existed, so older kitseg reads it.
    plain = UNetConfig(in_slices=3, base_width=8)
    assert "block" not in plain.to_dict() and UNetConfig.from_dict(plain.to_dict()) == plain


def test_residual_encoder_adds_a_shortcut_around_each_level() -> None:
    torch.manual_seed(0)
    cfg = UNetConfig(in_slices=3, base_width=4, depth=3, block="residual")
    model = UNet(cfg).eval()
    level = model.down[1]  # 4 -> 8 channels: a 1x1 conv + norm shortcut
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        body, short = level.body(x), level.shortcut(x)
        torch.testing.assert_close(level(x), torch.relu(body + short))
        assert not torch.allclose(level(x), torch.relu(body))
        # With the body's last norm zeroed, only the shortcut is left.
        level.body[-1].weight.zero_()
        level.body[-1].bias.zero_()
        torch.testing.assert_close(level(x), torch.relu(short))
    # The decoder stays plain, and the 1x1 shortcuts are counted in the FLOPs.
    assert isinstance(model.up_blocks[0], torch.nn.Sequential)
    extra = flops_per_pixel(cfg) - flops_per_pixel(UNetConfig(in_slices=3, base_width=4, depth=3))
    assert extra == pytest.approx(2 * (3 * 4 + 4 * 8 / 4 + 8 * 16 / 16))


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_folding_batch_norm_keeps_the_outputs(block: str) -> None:
    torch.manual_seed(0)
    model = UNet(UNetConfig(in_slices=3, num_classes=3, base_width=8, depth=3, block=block))
    # Non-trivial running statistics and affine parameters, as after training.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ref = model(x)
        folded = fold_batch_norm(copy.deepcopy(model))
        out = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval"):
        fold_batch_norm(model.train())
