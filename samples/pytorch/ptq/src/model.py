"""The two networks of the post-training quantization sample.

* ``cnn``: :class:`SmallCnn`, two 3x3 convolutions with max-pooling and two fully connected
  layers (about 0.2 M parameters). Its layers are two ``Conv`` and two ``Gemm`` nodes in ONNX.
* ``resnet``: :class:`MnistResNet`, a residual network in the style of ResNet-18: a 3x3 stem
  convolution, three stages of two :class:`BasicBlock` (32, 64 and 128 channels; the first
  block of each stage halves the resolution, 28 -> 14 -> 7 -> 4) with BatchNorm after every
  convolution, global average pooling and a fully connected classifier (about 0.7 M
  parameters, 16 convolutions). AMCT folds every BatchNorm into the convolution before it.

Both take normalized MNIST digits of shape ``(N, 1, 28, 28)`` and return 10 logits.
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class SmallCnn(nn.Module):
    """conv1 -> ReLU -> pool -> conv2 -> ReLU -> pool -> flatten -> fc1 -> ReLU -> fc2."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)    # 28x28, pooled to 14x14
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)   # 14x14, pooled to 7x7
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm with a shortcut: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s)``.

    The shortcut ``s`` is ``x``, or a strided 1x1 conv + BatchNorm (``downsample``) when the
    block changes the resolution or the number of channels.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class MnistResNet(nn.Module):
    """stem -> layer1 (32 ch, 14x14) -> layer2 (64 ch, 7x7) -> layer3 (128 ch, 4x4) -> fc."""

    def __init__(self, num_classes: int = NUM_CLASSES,
                 channels: tuple[int, int, int] = (32, 64, 128),
                 blocks_per_stage: int = 2) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU()
        stages = []
        in_channels = channels[0]
        for width in channels:
            blocks = [BasicBlock(in_channels, width, stride=2)]
            blocks += [BasicBlock(width, width) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


MODELS: dict[str, type[nn.Module]] = {"cnn": SmallCnn, "resnet": MnistResNet}


def build_model(name: str) -> nn.Module:
    """A new, untrained network: ``cnn`` or ``resnet``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]()
