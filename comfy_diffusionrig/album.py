"""A personal album: one person's aligned photos with their rendered buffers, ready for stage 2."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .training import TrainingData


@dataclass
class Album:
    """images [N, 3, S, S] in [-1, 1]; buffers [N, 9, S, S] rendered|normal|albedo (the mean shape's).

    names: where each photo came from; warnings: photos left out or doubtful, for the user.
    codes: the DECA codes of every photo (shape replaced by the album's mean shape).
    """

    images: torch.Tensor
    buffers: torch.Tensor
    names: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    codes: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.images.shape[0]

    def training_data(self) -> TrainingData:
        return TrainingData(self.images, self.buffers)
