"""The network of the tensor-decomposition sample.

``conv1`` (1 -> 128 channels, 3x3) is too thin to be worth decomposing; ``conv2``
(128 -> 128, 3x3) is the layer that ``auto_decomposition`` splits into ``conv2.0`` (3x1) and
``conv2.1`` (1x3). A 2x2 max-pool after each convolution keeps training quick on a CPU.
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10


class Net(nn.Module):
    """MNIST convnet: conv1 -> pool -> ReLU -> conv2 -> pool -> ReLU -> flatten -> fc.

    Max-pooling before the ReLU gives the same result as after it (both are monotonic) and
    applies the ReLU to a quarter of the elements.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 128, 3)     # 28x28 -> 26x26, pooled to 13x13
        self.conv2 = nn.Conv2d(128, 128, 3)   # 13x13 -> 11x11, pooled to 5x5
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128 * 5 * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.pool(self.conv1(x)))
        x = self.relu(self.pool(self.conv2(x)))
        return self.fc(self.flatten(x))
