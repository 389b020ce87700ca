"""DCP planners that write and read some tensors as row blocks of their full ``[E, ...]`` layout.

Legend: E rows of the full tensor (logical experts), n rows of one block.

``RowBlocks`` maps a checkpoint key to ``(size, [(e0, block_n...), ...])``: ``block`` holds rows
``[e0, e0 + n)`` of the key's full tensor of ``size``. The save planner writes each block as a
DCP chunk of that tensor (the chunks of all ranks together must cover it once); the load planner
reads the checkpoint's chunks into the blocks, whatever chunks the save wrote (DCP resharding).
Every other key goes through DCP's default planners. A separate module because importing
``torch.distributed.checkpoint`` takes seconds: ``moekit.parallel`` imports it on first use only.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import (LoadPlan, ReadItem, SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

RowBlocks = dict[str, tuple[torch.Size, list[tuple[int, torch.Tensor]]]]


def _chunk(e0: int, block: torch.Tensor) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size([e0] + [0] * (block.dim() - 1)), sizes=block.size())


class RowBlockSavePlanner(DefaultSavePlanner):
    """Default planner plus one shard write item per row block."""

    def __init__(self, blocks: RowBlocks):
        super().__init__()
        self.blocks = blocks
        self._block_at: dict[tuple[str, torch.Size], torch.Tensor] = {}

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        items = []
        for key, (size, blocks) in self.blocks.items():
            self.mappings[key] = (key,)  # the key is top level, as for the flat entries
            for e0, block in blocks:
                chunk = _chunk(e0, block)
                self._block_at[(key, chunk.offsets)] = block
                items.append(WriteItem(index=MetadataIndex(key, chunk.offsets), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(
                                           chunk=chunk, properties=TensorProperties.create_from_tensor(block),
                                           size=size)))
        self.plan = dataclasses.replace(plan, items=plan.items + items, planner_data=self.mappings)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        block = self._block_at.get((write_item.index.fqn, write_item.index.offset))
        return block if block is not None else super().resolve_data(write_item)


class RowBlockLoadPlanner(DefaultLoadPlanner):
    """Default planner plus reads of the saved chunks that overlap each row block."""

    def __init__(self, blocks: RowBlocks):
        super().__init__()
        self.blocks = blocks

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = []
        for key, (_, blocks) in self.blocks.items():
            md = self.metadata.state_dict_metadata[key]  # presence and size checked by the caller
            items += create_read_items_for_chunk_list(key, md, [_chunk(e0, b) for e0, b in blocks])
        return dataclasses.replace(plan, items=plan.items + items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        entry = self.blocks.get(read_item.dest_index.fqn)
        if entry is None:
            return super().resolve_tensor(read_item)
        out = entry[1][read_item.dest_index.index][1]  # index: the block's place in the chunk list
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, offset, length)
        return out
