"""Training, evaluation and weight files of the PyTorch quantization sample (torch)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from data_utils import MnistData, log, normalize
from model import build_model
from torch import nn

#: Training defaults: SGD with momentum on batches of 64 digits.
DEFAULT_STEPS = 400
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 0.05


def default_weights_path(model_name: str) -> str:
    """Where train.py saves the weights of ``model_name`` by default: ``model/<name>.pth``."""
    return os.path.join("model", f"{model_name}.pth")


def train(model: nn.Module, data: MnistData, steps: int = DEFAULT_STEPS,
          batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR, seed: int = 1,
          log_steps: int = 50) -> nn.Module:
    """Train ``model`` for ``steps`` SGD steps on the training digits; returns it in eval mode.

    Each epoch visits the training set in a new seeded random order; the learning rate
    follows a cosine schedule down to 0, so the last steps settle the weights.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(normalize(data.train_images))
    labels = torch.from_numpy(data.train_labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    model.train()
    order, position, epoch = rng.permutation(len(labels)), 0, 0
    for step in range(1, steps + 1):
        if position + batch_size > len(order):
            order, position, epoch = rng.permutation(len(labels)), 0, epoch + 1
        index = torch.from_numpy(order[position:position + batch_size])
        position += batch_size
        loss = nn.functional.cross_entropy(model(images[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_steps == 0 or step == steps:
            log(f"[Train] Step: {step}/{steps}, Epoch: {epoch}, Loss: {loss.item():.6f}")
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The logits of ``images`` (normalized numpy, ``(N, 1, 28, 28)``), in eval mode."""
    model.eval()
    return torch.cat([model(torch.from_numpy(images[start:start + batch_size]))
                      for start in range(0, len(images), batch_size)]).numpy()


def save_weights(model: nn.Module, path: str) -> None:
    """Save ``model.state_dict()`` to ``path`` (temporary file, then rename)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp_path = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save({key: value.detach().cpu() for key, value in model.state_dict().items()},
                   tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def load_weights(model_name: str, path: str) -> nn.Module:
    """A ``model_name`` network with the weights of ``path`` (a state dict saved by train.py),
    in eval mode. Exits with a message naming the file when it does not fit the network."""
    model = build_model(model_name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(
            f"{path} does not hold weights of the '{model_name}' network ({error}).\n"
            f"Pass the --model the weights were trained for, or train them with: "
            f"python src/train.py --model {model_name} --save-path {path}") from error
    return model.eval()
