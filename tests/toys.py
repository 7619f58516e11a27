"""Small hand-made models shared by unit tests (real architectures live in the zoo tests)."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """Residual add, depthwise conv, grouped conv, concat, BatchNorm, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.gc = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.b2 = nn.Conv2d(8, 4, 1)
        self.fuse = nn.Conv2d(16, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        y = y + self.pw(self.dw(y))
        z = torch.cat([self.gc(y), self.b2(y)], dim=1)
        return self.fc(self.fuse(z).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


class NormedNet(nn.Module):
    """A LayerNorm over a residual width (`inp.out`, lossy) feeding an MLP (`fc1.out`, not lossy)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm = nn.Linear(4, 8), nn.LayerNorm(8)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(h + self.fc2(torch.relu(self.fc1(self.norm(h)))))
