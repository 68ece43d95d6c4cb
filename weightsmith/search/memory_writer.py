"""The engine's writer, in memory: merged tensors go into a live model's tensors, not shards.

``engine.executor.execute(plan, writer)`` calls ``writer.write(name, tensor, rows)`` for each
merged tensor (or row block of one), already cast to the planned output dtype: exactly the
bytes ``ShardWriter`` would put on disk. Here they are copied into ``targets`` (a model's
state-dict tensors, keyed by output name) when dtype and shape agree, so a candidate recipe is
scored without writing and reloading a checkpoint; any other tensor is kept in a buffer of its
own (``tensors`` holds every output, either way).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from weightsmith.engine.tasks import MergePlan


class MemoryWriter:
    names = ["memory"]  # ShardWriter's shard names; only read when a journal is kept (never here)

    def __init__(self, plan: MergePlan, targets: Mapping[str, torch.Tensor] | None = None) -> None:
        targets = targets or {}
        self.tensors: dict[str, torch.Tensor] = {}
        self.live: set[str] = set()  # outputs written straight into a target tensor
        for task in plan.tasks:
            shape = tuple(task.shape)
            target = targets.get(task.name)
            if target is not None and target.dtype == task.out_dtype and tuple(target.shape) == shape:
                self.tensors[task.name] = target
                self.live.add(task.name)
            else:
                self.tensors[task.name] = torch.empty(shape, dtype=task.out_dtype)

    @torch.no_grad()
    def write(
        self, name: str, tensor: torch.Tensor, rows: tuple[int, int] | None = None, *, checksum: bool = False
    ) -> int:
        dest = self.tensors[name]
        if rows is not None:
            dest = dest[rows[0] : rows[1]]
        dest.copy_(tensor.detach().reshape(dest.shape))
        return 0  # no crc: nothing is journaled in memory

    def span(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int, int]:
        return 0, 0, self.tensors[name].numel() * self.tensors[name].element_size()

    def close(self) -> None:
        return None
