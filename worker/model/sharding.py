"""BLOOM split across the ranks of a tensor-parallel group, and each rank loading only its own part.

How the weights are split (the Megatron layout TGI and vLLM use):

- ``self_attention.query_key_value`` by heads. BLOOM's fused projection is laid out per head (a head's
  query, key and value rows are next to each other: ``view(tokens, heads, 3, head_dim)``), so a contiguous
  block of rows holds whole heads with their q, k and v;
- ``self_attention.dense`` and ``mlp.dense_4h_to_h`` row-parallel: each rank holds the input columns of
  its heads (or of its part of the 4h activations), computes a partial sum, and the group adds them up
  (an all-reduce); their bias is added once, by rank 0;
- ``mlp.dense_h_to_4h`` column-parallel: each rank computes its slice of the 4h activations;
- the word embeddings (tied to the LM head) by vocabulary: each rank looks up the ids in its range (the
  sum over ranks is the embedding) and scores its range of the vocabulary (the logits are gathered);
- the LayerNorms whole on every rank.

Loading builds the model on the ``meta`` device (no memory) and reads each tensor's slice straight from
the safetensors files (``StoredTensor``: the file's header gives each tensor's offset; a row range is one
read, a column range is read a block of rows at a time), so a rank's resident memory grows by its share
only. (Memory-mapping the file, as ``safe_open`` does, would leave the tensors backed by the file's pages:
a rank's weights would then count the pages of every row its column slices cross, and be read from disk
lazily during the first passes.)
"""

from __future__ import annotations

import json
import math
import resource
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROW, COLUMN, FIRST_RANK, WHOLE = "row", "column", "first_rank", "whole"


class ShardingError(ValueError):
    """The model cannot be split the way it was asked to be."""


@dataclass(frozen=True)
class Shard:
    """Rank ``rank``'s part of a BLOOM with ``n_head`` heads, ``hidden`` width and ``vocab`` words, split
    ``world`` ways. ``world == 1`` is the whole model."""

    rank: int
    world: int
    n_head: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, config: Any, rank: int = 0, world: int = 1) -> Shard:
        """The shard of a ``BloomConfig`` for ``rank`` of ``world``; a clear error when it does not split."""
        if world < 1 or not 0 <= rank < world:
            raise ShardingError(f"rank {rank} of a tensor-parallel group of {world} does not exist")
        if config.n_head % world:
            raise ShardingError(
                f"this model has {config.n_head} attention heads, which do not divide into a tensor-parallel "
                f"size of {world}: choose a size that divides {config.n_head}")
        return cls(rank, world, config.n_head, config.hidden_size, config.vocab_size)

    @property
    def heads(self) -> int:
        """Attention heads on this rank."""
        return self.n_head // self.world

    @property
    def head_start(self) -> int:
        """The first of this rank's heads (they are consecutive)."""
        return self.rank * self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    @property
    def vocab_rows(self) -> int:
        """Rows of the embedding on every rank (the last rank's part is padded with zeros to this)."""
        return -(-self.vocab // self.world)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    def span(self, name: str) -> tuple[str, int, int]:
        """How parameter ``name`` is split: (``ROW``/``COLUMN``: the part of dim 0/1 this rank holds,
        ``FIRST_RANK``: whole on rank 0 and zeros elsewhere, ``WHOLE``: the same on every rank), start, stop."""
        if self.world == 1:
            return WHOLE, 0, 0
        if name.endswith("word_embeddings.weight") or name == "lm_head.weight":
            return ROW, self.vocab_start, self.vocab_start + self.vocab_rows
        per_head = 3 * self.head_dim
        if ".query_key_value." in name:
            return ROW, self.head_start * per_head, (self.head_start + self.heads) * per_head
        width = self.hidden // self.world
        four = 4 * self.hidden // self.world
        if name.endswith("self_attention.dense.weight"):
            return COLUMN, self.rank * width, (self.rank + 1) * width
        if name.endswith("mlp.dense_4h_to_h.weight"):
            return COLUMN, self.rank * four, (self.rank + 1) * four
        if name.endswith(("self_attention.dense.bias", "mlp.dense_4h_to_h.bias")):
            return FIRST_RANK, 0, 0
        if ".mlp.dense_h_to_4h." in name:
            return ROW, self.rank * four, (self.rank + 1) * four
        return WHOLE, 0, 0

    def take(self, name: str, full: Any) -> torch.Tensor:
        """This rank's part of parameter ``name``, from ``full`` (a tensor, or a ``StoredTensor``: only the
        part is read from the file)."""
        how, start, stop = self.span(name)
        if how == ROW:
            part = full[start : min(stop, full.shape[0])]
            if part.shape[0] < stop - start:  # the last vocabulary part, padded
                pad = torch.zeros((stop - start - part.shape[0], *part.shape[1:]), dtype=part.dtype)
                part = torch.cat([part, pad])
            return part
        if how == COLUMN:
            return full[:, start:stop]
        tensor = full[:]
        if how == FIRST_RANK and self.rank:
            tensor = torch.zeros_like(tensor)
        return tensor


def checkpoint_files(source: str | Path) -> list[Path]:
    """The safetensors files of a local checkpoint directory."""
    directory = Path(source)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ShardingError(f"{directory} holds no .safetensors file: sharded loading reads safetensors only")
    return files


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
COLUMN_BLOCK_BYTES = 32 * 2**20  # whole rows read at once while taking a column range (a bounded buffer)


class StoredTensor:
    """One tensor of a safetensors file, read on demand: ``stored[a:b]`` (rows), ``stored[:, a:b]``
    (columns, 2-D), ``stored[:]`` (all) read just those bytes into memory this process owns."""

    def __init__(self, handle: Any, base: int, entry: dict[str, Any]) -> None:
        self.handle = handle
        self.dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        self.shape = tuple(entry["shape"])
        self.offset = base + entry["data_offsets"][0]
        self.row_bytes = math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple):
            rows, columns = index
            assert rows == slice(None) and len(self.shape) == 2, "columns of a 2-D tensor only"
            return self._columns(columns.start, columns.stop)
        start, stop, _ = index.indices(self.shape[0] if self.shape else 1)
        if not self.shape:
            return self._read(self.offset, 1).reshape(())
        return self._read(self.offset + start * self.row_bytes, (stop - start) * self.row_bytes).reshape(
            stop - start, *self.shape[1:])

    def _columns(self, start: int, stop: int) -> torch.Tensor:
        rows, _ = self.shape
        out = torch.empty((rows, stop - start), dtype=self.dtype)
        block = max(1, COLUMN_BLOCK_BYTES // max(1, self.row_bytes))
        for first in range(0, rows, block):
            count = min(block, rows - first)
            whole = self._read(self.offset + first * self.row_bytes, count * self.row_bytes).reshape(count, -1)
            out[first : first + count] = whole[:, start:stop]
        return out

    def _read(self, offset: int, size: int) -> torch.Tensor:
        buffer = bytearray(size)
        if size:
            self.handle.seek(offset)
            if self.handle.readinto(buffer) != size:
                raise ShardingError(f"{self.handle.name}: the file ends before the tensor does")
        return torch.frombuffer(buffer, dtype=self.dtype) if size else torch.empty(0, dtype=self.dtype)


def stored_tensors(path: Path) -> Iterator[tuple[str, StoredTensor]]:
    """Every tensor of a safetensors file, by name, nothing read yet."""
    with open(path, "rb", buffering=0) as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            yield name, StoredTensor(handle, 8 + length, entry)


def _model_name(key: str) -> str:
    """A checkpoint key as the model names it (the hub's BLOOM files leave out ``transformer.``)."""
    if key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


def load_shard(source: str | Path, shard: Shard, dtype: torch.dtype, device: torch.device) -> Any:
    """``BloomForCausalLM`` holding only ``shard``'s part of the checkpoint in ``source`` (a directory),
    built without materialising the whole model. The tied LM head is the embedding's part. The rise in
    resident memory while the weights were read is left in ``bloomq_load_peak_bytes``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with PeakMemory() as peak:  # reading the weights (the code and the empty model are not counted)
        for path in checkpoint_files(source):
            for key, stored in stored_tensors(path):
                name = _model_name(key)
                if name == "lm_head.weight" or name not in params:
                    continue  # tied to the embedding / not a parameter of this architecture
                tensor = shard.take(name, stored).to(dtype=dtype)
                _set_parameter(model, name, tensor.to(device))
                loaded.add(name)
    missing = sorted(set(params) - loaded - {"lm_head.weight"})
    if missing:
        raise ShardingError(f"{source}: the checkpoint lacks {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model.lm_head.weight = model.transformer.word_embeddings.weight
    model.bloomq_shard = shard
    model.bloomq_load_peak_bytes = peak.peak_bytes
    return model.eval()


def _set_parameter(model: Any, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)


def shard_of(model: Any) -> Shard:
    """The part of the model this process holds (the whole model unless it was loaded as a shard)."""
    shard = getattr(model, "bloomq_shard", None)
    return shard if shard is not None else Shard.of(model.config)


class PeakMemory:
    """This process's peak resident memory while a block runs, above what it held when it began (Linux:
    the peak is reset through ``/proc/self/clear_refs``; elsewhere the lifetime peak is used)."""

    def __enter__(self) -> PeakMemory:
        self.start = _status_bytes("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        self.peak_bytes = 0
        return self

    def __exit__(self, *exc: object) -> None:
        peak = _status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self.start)


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
