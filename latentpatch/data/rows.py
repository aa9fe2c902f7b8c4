"""Rows of a latent store for training, read where they lie: memory-mapped shards, gathered row by row.

safetensors maps a shard's file into memory without copying it, so the processes of a node share one copy in
the page cache and each touches only the rows it draws (ImageNet at 256 px: about 20 GB of posterior mean and
std in fp16 would otherwise be held by every rank). `ShardedRows` indexes like a tensor: `rows[idx]` gathers.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


class ShardedRows:
    """One stored tensor across shards: row i of the store is shards[shard_of[i]][row_of[i]]."""

    def __init__(self, shards: Sequence[Tensor], shard_of: Tensor, row_of: Tensor) -> None:
        self.shards, self.shard_of, self.row_of = list(shards), shard_of.long(), row_of.long()
        first = self.shards[0]
        self.shape = torch.Size((len(self.shard_of), *first.shape[1:]))
        self.dtype, self.device = first.dtype, first.device

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Tensor) -> Tensor:
        """Rows `index` (a 1-D long tensor), gathered into a new tensor in the storage dtype."""
        index = torch.as_tensor(index, dtype=torch.long)
        shard, row = self.shard_of[index], self.row_of[index]
        if len(self.shards) == 1:
            return self.shards[0][row]
        out = torch.empty((len(index), *self.shape[1:]), dtype=self.dtype)
        for s in shard.unique().tolist():
            at = (shard == s).nonzero().flatten()
            out[at] = self.shards[s][row[at]]
        return out

    def subset(self, keep: Tensor) -> ShardedRows:
        """The rows `keep` (a bool mask or indices), without copying any shard."""
        return ShardedRows(self.shards, self.shard_of[keep], self.row_of[keep])

    def materialize(self) -> Tensor:
        return self[torch.arange(len(self))]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize
