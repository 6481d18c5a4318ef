"""Token data for training: validated memmaps and a resumable, rank-aware batch sampler.

A data folder is nanoGPT's format: ``train.bin`` and ``val.bin`` of uint16 token ids.
``meta.json`` (written by ``manifold-muon prepare``) is optional, so an existing nanoGPT
OpenWebText folder loads as it is; when present its dtype, lengths and vocabulary are checked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = ["TokenData", "DataError", "BatchSampler"]

# Checked in full below this many tokens; above it (a 9B-token OpenWebText) a 1M-token
# sample is checked, because reading every token at start-up would take minutes.
_FULL_VOCAB_CHECK = 50_000_000


class DataError(ValueError):
    """A data folder that cannot be trained on; the message says why and what to do."""


def how_to_prepare(folder) -> str:
    """The command that writes ``folder``, by its name: the presets' folders each have their own."""
    folder = Path(folder)
    if folder.name == "local-corpus":
        return (f"`python scripts/build_local_corpus.py --out {folder}` in a clone of the manifold-muon "
                "repository (the script that builds the offline English corpus; see its README)")
    if folder.name == "openwebtext":
        return f"`manifold-muon prepare openwebtext --out {folder}` (needs the internet and HF datasets)"
    return (f"`manifold-muon prepare shakespeare --out {folder}` (the embedded corpus), or "
            f"`manifold-muon prepare text FILE ... --out {folder}` (your own text)")


@dataclass
class TokenData:
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @classmethod
    def load(cls, folder, *, block_size: int, vocab_size: int) -> "TokenData":
        """Open and validate ``folder``: every problem is raised before training starts."""
        folder = Path(folder)
        meta = {}
        if (folder / "meta.json").is_file():
            meta = json.loads((folder / "meta.json").read_text())
            if meta.get("dtype", "uint16") != "uint16":
                raise DataError(f"{folder}/meta.json says dtype {meta['dtype']!r}; only uint16 token files are supported")
        splits = {}
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            if not path.is_file():
                raise DataError(f"missing {path}; prepare data first: {how_to_prepare(folder)}")
            size = path.stat().st_size
            if size == 0:
                raise DataError(f"{path} is empty")
            if size % 2:
                raise DataError(f"{path} has {size} bytes, not a whole number of uint16 tokens (wrong dtype?)")
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            expected = meta.get(f"{split}_tokens")
            if expected is not None and expected != tokens.size:
                raise DataError(f"{path} holds {tokens.size} tokens but meta.json says {expected} (truncated or "
                                "replaced file?); prepare it again")
            if tokens.size < block_size + 1:
                raise DataError(f"{path} holds {tokens.size} tokens, fewer than block_size + 1 = {block_size + 1}; "
                                "use a shorter context (--block_size) or more data")
            splits[split] = tokens
        data_vocab = meta.get("vocab_size")
        if data_vocab is not None and data_vocab > vocab_size:
            raise DataError(f"the data's tokenizer has {data_vocab} tokens but the model's vocab_size is {vocab_size}")
        for split, tokens in splits.items():
            sample = tokens if tokens.size <= _FULL_VOCAB_CHECK else tokens[:: tokens.size // 1_000_000]
            top = int(sample.max())
            if data_vocab is not None and top >= data_vocab:
                raise DataError(f"{folder}/{split}.bin contains token id {top} >= the vocab_size {data_vocab} its "
                                "meta.json declares (a meta.json from another tokenizer?); prepare it again")
            if top >= vocab_size:
                raise DataError(f"{folder}/{split}.bin contains token id {top} >= the model's vocab_size {vocab_size} "
                                "(vocabulary mismatch: wrong tokenizer or model config)")
        return cls(splits["train"], splits["val"], meta)


class BatchSampler:
    """Random contiguous windows, nanoGPT-style, from a seeded generator.

    Every rank draws the *global* batch's offsets from the same generator and keeps its own
    rows (``rank::world_size``), so one process and N processes see the same global batch
    for the same seed, and the generator state in a checkpoint resumes the exact stream.
    """

    def __init__(self, data: TokenData, *, block_size: int, seed: int):
        self.data, self.block_size = data, block_size
        self.generator = torch.Generator().manual_seed(seed)

    def global_offsets(self, split: str, global_batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        tokens = self.data.train if split == "train" else self.data.val
        return torch.randint(len(tokens) - self.block_size, (global_batch,), generator=generator or self.generator)

    def windows(self, split: str, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, (B, T) int64 each."""
        tokens = self.data.train if split == "train" else self.data.val
        rows = np.stack([np.asarray(tokens[o: o + self.block_size + 1], dtype=np.int64) for o in offsets.tolist()])
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
