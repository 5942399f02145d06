"""A small ResNet for 1x28x28 images (~1.2M parameters), and a 3x wider one (~11.0M): the built-in models of about 1M and 10M parameters.

Why it exists: the history store's costs (bytes, recording time, unlearning
memory) grow with the model, and the datasets' own CNNs have 40k-70k
parameters; cross-silo federations train models of millions. ``--model
resnet-small`` measures fedforget at that size on the same data.

Shape: a 3x3 stem, then four stages of one basic residual block each
(widths 32, 64, 128, 256; stages 2-4 halve the resolution, 28 -> 14 -> 7 ->
4), global average pooling and one linear layer (ResNet-10 style, He et al.
2016). GroupNorm instead of BatchNorm (as Hsieh et al. 2020 recommend for
non-IID federations): BatchNorm's running statistics are buffers, not
parameters, and averaging or subtracting them across clients has no clean
meaning; GroupNorm keeps every piece of state a trainable parameter, like the
other built-in models. Global pooling lets it run on 8x8 digits too.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WIDTHS = (32, 64, 128, 256)
WIDE_WIDTHS = (96, 192, 384, 768)
"""``resnet-wide``: every stage 3x as wide, so about 9x the parameters (~11.0M), the ~10M size of bench scaling."""
GROUPS = 8


class _Block(nn.Module):
    """conv-GN-ReLU-conv-GN plus the input (projected by a 1x1 conv when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(GROUPS, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(GROUPS, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(GROUPS, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """ResNet-10-style classifier with GroupNorm for one-channel images (see the module docstring)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.GroupNorm(GROUPS, widths[0]), nn.ReLU())
        blocks = []
        cin = widths[0]
        for i, width in enumerate(widths):
            blocks.append(_Block(cin, width, stride=1 if i == 0 else 2))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.classifier = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return unnormalised class logits of shape ``(batch, num_classes)``."""
        features = self.blocks(self.stem(x))
        logits: torch.Tensor = self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1))
        return logits


def resnet_small() -> nn.Module:
    """``--model resnet-small``."""
    return ResNetSmall()


resnet_small.training_defaults = {"lr": 0.01, "batch_size": 32, "local_epochs": 1}  # type: ignore[attr-defined]
"""Chosen on digits only (MNIST and Fashion-MNIST are held out), with the proxy of the LeNet's defaults: digits
drawn at 28x28, 60 SGD steps of batch 32 (momentum 0.9), seed 0 (``scripts/training_defaults_proxy.py --model
resnet-small --batch-sizes 32 --lrs 0.1,0.05,0.02,0.01,0.005,0.002 --seeds 0 --steps 60``; 60 steps because a
step of this model costs about 1 s on a busy 2-core machine). Test loss / accuracy: lr 0.1 1.99 / 0.375, 0.05
1.74 / 0.378, 0.02 0.72 / 0.753, 0.01 0.41 / 0.889, 0.005 0.47 / 0.911, 0.002 0.80 / 0.897. lr 0.01 had the
lowest loss (the LeNet's criterion), and is 2x below the rate where training slowed sharply (0.02) and 5x below
where it stalled (0.05). Batch 32 and one local epoch as the LeNet on MNIST."""


def resnet_wide() -> nn.Module:
    """``--model resnet-wide``: resnet-small with every stage 3x as wide (~11.0M parameters).

    Why: the scaling bench (``fedforget bench scaling``) needs a model of
    about ten million parameters to see how the store's bytes, recording and
    unlearning grow with the model; widening keeps the same depth, shapes
    and GroupNorm, so only the size changes.
    """
    return ResNetSmall(widths=WIDE_WIDTHS)


resnet_wide.training_defaults = dict(resnet_small.training_defaults)  # type: ignore[attr-defined]
"""resnet-small's defaults, NOT derived for this width: the proxy on digits
(``scripts/training_defaults_proxy.py --model resnet-wide``) was not run for it (a step costs about 9x
resnet-small's). Choose its own on digits before training it for accuracy; the scaling bench only uses its shapes."""
