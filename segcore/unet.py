"""A 2D / 2.5D U-Net in the Ronneberger shape, shared by training and inference.

Each level has two 3x3 conv + norm + ReLU blocks; down-sampling is 2x2 max-pooling, up-sampling a
2x2 transposed conv, and skips are concatenated. The input may be one axial slice or ``2k+1``
neighbouring slices stacked as channels (2.5D context). With ``block="residual"`` each encoder
level's two convs also get a shortcut, as in nnU-Net's residual-encoder U-Net; the decoder stays
plain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

M = TypeVar("M", bound=nn.Module)

NORMS = ("batch", "instance", "group", "none")
BLOCKS = ("plain", "residual")


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild the network; stored verbatim in every checkpoint.

    Attributes:
        in_slices: neighbouring axial slices fed as channels; 1, or 2k+1 for 2.5D context.
        num_classes: output logits, background included (3 for KiTS19, 4 with cyst).
        base_width: channels of the first level; each level down doubles it.
        depth: number of levels; the input is down-sampled ``depth - 1`` times.
        norm: one of ``batch``, ``instance``, ``group`` or ``none``.
        dropout: dropout probability in the bottleneck.
        block: the encoder levels' block, ``plain`` (two conv + norm + ReLU) or ``residual``
            (the same with a shortcut around both, a 1x1 conv + norm where the width changes,
            and the second ReLU after the sum).
    """

    in_slices: int = 1
    num_classes: int = 3
    base_width: int = 16
    depth: int = 4
    norm: str = "batch"
    dropout: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    block: str = "plain"

    def __post_init__(self) -> None:
        if self.in_slices < 1 or self.in_slices % 2 == 0:
            raise ValueError(f"in_slices must be 1 or an odd number 2k+1, got {self.in_slices}")
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (background + at least one class), got {self.num_classes}; "
                "a single output channel makes cross-entropy identically zero"
            )
        if self.base_width < 1:
            raise ValueError(f"base_width must be >= 1, got {self.base_width}")
        if not 2 <= self.depth <= 7:
            raise ValueError(f"depth must be between 2 and 7, got {self.depth}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.norm == "group" and self.base_width % 8:
            raise ValueError(f"norm='group' uses 8 groups and needs base_width divisible by 8, got {self.base_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")

    @property
    def context(self) -> int:
        """Slices of context on each side of the centre slice (k in 2k+1)."""
        return self.in_slices // 2

    @property
    def multiple(self) -> int:
        """H and W are padded internally to a multiple of this."""
        return int(2 ** (self.depth - 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["block"] == "plain":
            del d["block"]  # so plain checkpoints stay readable by kitseg before the option
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}; this checkpoint needs a newer kitseg")
        return cls(**d)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> ReLU) layers."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias),
            _norm(norm, c_out),
            nn.ReLU(inplace=True),
        )


class ResBlock(nn.Module):
    """Two (3x3 conv -> norm) layers with a ReLU between them, plus a shortcut (identity, or a
    1x1 conv -> norm where the width changes), then ReLU: ``relu(body(x) + shortcut(x))``."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        self.body = nn.Sequential(*list(ConvBlock(c_in, c_out, norm))[:-1])  # the plain block, less its last ReLU
        self.shortcut: nn.Module = (
            nn.Identity() if c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=bias), _norm(norm, c_out))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class UNet(nn.Module):
    """2D U-Net over axial slices; accepts any H x W.

    Inputs whose H or W is not a multiple of ``2**(depth-1)`` are padded (replicate) internally and
    the logits are cropped back, so a 512x796 slice (KiTS case 160) works.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = [config.base_width * 2**i for i in range(config.depth)]
        self.down = nn.ModuleList()
        c_in = config.in_slices
        encoder_block = ResBlock if config.block == "residual" else ConvBlock
        for w in widths:
            self.down.append(encoder_block(c_in, w, config.norm))
            c_in = w
        self.pool = nn.MaxPool2d(2)
        self.dropout = nn.Dropout2d(config.dropout) if config.dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for w_hi, w_lo in zip(reversed(widths[1:]), reversed(widths[:-1]), strict=True):
            self.up.append(nn.ConvTranspose2d(w_hi, w_lo, 2, stride=2))
            self.up_blocks.append(ConvBlock(2 * w_lo, w_lo, config.norm))
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map slices to per-class logits.

        Args:
            x: ``(B, in_slices, H, W)`` normalised intensities.

        Returns:
            ``(B, num_classes, H, W)`` logits.
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_slices:
            raise ValueError(f"expected input (B, {self.config.in_slices}, H, W), got {tuple(x.shape)}")
        return padded_call(self.config, x, self.forward_padded)

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The network itself, on an input already padded by :func:`padding`. It has no
        shape-dependent Python, so it exports to ONNX with dynamic batch, height and width."""
        logits: torch.Tensor = self.head(self.decoder_features(x)[-1])
        return logits

    def decoder_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every decoder level, coarsest first, on an input already padded by
        :func:`padding`; the last one is what :attr:`head` maps to logits. Training uses the
        coarser ones for deep supervision (``training.train.DeepSupervision``)."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        x = self.dropout(x)
        feats = []
        for up, block in zip(self.up, self.up_blocks, strict=True):
            x = up(x)
            x = block(torch.cat([x, skips.pop()], dim=1))
            feats.append(x)
        return feats


def padding(config: UNetConfig, h: int, w: int) -> tuple[int, int]:
    """Rows and columns of replicate padding (bottom, right) that an ``h x w`` input needs before
    :meth:`UNet.forward_padded`."""
    m = config.multiple
    ph, pw = (-h) % m, (-w) % m
    if config.norm == "instance":
        # Instance norm needs > 1 element per channel at the bottleneck.
        ph, pw = max(ph, 2 * m - h), max(pw, 2 * m - w)
    return ph, pw


def padded_call(config: UNetConfig, x: torch.Tensor, net: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``net`` (the padded network, in torch or ONNX Runtime) on ``x``: pad by :func:`padding`,
    run, crop the logits back to ``x``'s height and width."""
    h, w = x.shape[-2:]
    ph, pw = padding(config, h, w)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return net(x)[..., :h, :w]


def build_unet(config: UNetConfig) -> UNet:
    return UNet(config)


def flops_per_pixel(config: UNetConfig) -> float:
    """Approximate multiply-add FLOPs (x2) per input pixel of one forward pass."""
    total = 0.0
    widths = [config.base_width * 2**i for i in range(config.depth)]
    c_in = config.in_slices
    for level, w in enumerate(widths):
        scale = 4.0**-level
        total += scale * 9 * (c_in * w + w * w)
        if config.block == "residual" and c_in != w:
            total += scale * c_in * w  # the 1x1 shortcut
        c_in = w
    for level in range(config.depth - 1, 0, -1):
        w_hi, w_lo = widths[level], widths[level - 1]
        scale = 4.0 ** -(level - 1)
        total += scale * (w_hi * w_lo)  # transposed 2x2 conv, stride 2
        total += scale * 9 * (2 * w_lo * w_lo + w_lo * w_lo)
    total += widths[0] * config.num_classes
    return float(2.0 * total)


def fold_batch_norm(model: M) -> M:
    """Fold every eval-mode BatchNorm that follows a conv in a Sequential into that conv (in place).

    ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is itself a conv with rescaled
    weights and a bias, so the separate normalisation pass over every activation disappears
    (about 15 % of the forward on CPU). Outputs match the unfolded model to float rounding.
    """
    if model.training:
        raise ValueError("fold_batch_norm is for inference: call model.eval() first")
    for block in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(block)
        for i in range(len(layers) - 1):
            conv, bn = layers[i], layers[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                block[i] = fuse_conv_bn_eval(conv, bn)
                block[i + 1] = nn.Identity()
    return model
