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
the safetensors files (``safe_open(...).get_slice``), so a rank's peak host memory is about its share.
"""

from __future__ import annotations

import json
import resource
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
        """This rank's part of parameter ``name``, from ``full`` (a tensor or a safetensors slice: only the
        part is read)."""
        how, start, stop = self.span(name)
        if how == ROW:
            rows = full.get_shape()[0] if hasattr(full, "get_shape") else full.shape[0]
            part = full[start : min(stop, rows)]
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


def _model_name(key: str) -> str:
    """A checkpoint key as the model names it (the hub's BLOOM files leave out ``transformer.``)."""
    if key.startswith(("transformer.", "lm_head.")):
        return key
    return "transformer." + key


def load_shard(source: str | Path, shard: Shard, dtype: torch.dtype, device: torch.device) -> Any:
    """``BloomForCausalLM`` holding only ``shard``'s part of the checkpoint in ``source`` (a directory),
    built without materialising the whole model. The tied LM head is the embedding's part."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in checkpoint_files(source):
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                name = _model_name(key)
                if name == "lm_head.weight" or name not in params:
                    continue  # tied to the embedding / not a parameter of this architecture
                tensor = shard.take(name, handle.get_slice(key)).to(dtype=dtype)
                _set_parameter(model, name, tensor.to(device))
                loaded.add(name)
    missing = sorted(set(params) - loaded - {"lm_head.weight"})
    if missing:
        raise ShardingError(f"{source}: the checkpoint lacks {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    model.lm_head.weight = model.transformer.word_embeddings.weight
    model.bloomq_shard = shard
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
