"""Tokenizer, corpus preparation and every bad-input error, before training starts."""
import json

import numpy as np
import pytest

from manifold_muon.lab.data import DataError, TokenData
from manifold_muon.lab.prepare import prepare_documents, prepare_hf_dataset, prepare_text_files
from manifold_muon.lab.tokenizer import EOT, gpt2_encoding


def test_tokenizer_is_gpt2_bit_exact_and_offline():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    text = "To be, or not to be: that is the question.\n  Whether 'tis nobler ... 12345"
    assert enc.decode(enc.encode(text)) == text
    assert enc.n_vocab == 50257


def write_bins(folder, train, val, meta=None):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(folder / "train.bin")
    np.asarray(val, dtype=np.uint16).tofile(folder / "val.bin")
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))


def test_nanogpt_folder_without_meta_loads_as_is(tmp_path):
    write_bins(tmp_path, np.arange(500) % 100, np.arange(200) % 100)
    data = TokenData.load(tmp_path, block_size=16, vocab_size=128)
    assert data.train.size == 500 and data.val.size == 200 and data.meta == {}


def test_prepare_text_splits_by_document_and_records_meta(tmp_path):
    for i in range(6):
        (tmp_path / f"doc{i}.txt").write_text(f"Document number {i}. " * 50)
    meta = prepare_text_files([str(tmp_path / "doc*.txt")], tmp_path / "out", val_fraction=0.2, quiet=True)
    assert meta["documents"] == 6 and meta["val_documents"] == [str(tmp_path / "doc4.txt")]
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    assert train.size == meta["train_tokens"] and (train == EOT).sum() == 5
    saved = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert saved["tokenizer"] == "gpt2" and len(saved["sha256"]["train.bin"]) == 64
    TokenData.load(tmp_path / "out", block_size=32, vocab_size=50304)


def test_single_document_is_split_by_position(tmp_path):
    meta = prepare_documents([("only", "word " * 1000)], tmp_path, val_fraction=0.1, quiet=True)
    assert meta["val_tokens"] == pytest.approx(0.1 * (meta["train_tokens"] + meta["val_tokens"]), abs=2)


def test_hf_dataset_path_on_a_local_text_dataset(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    src = tmp_path / "corpus.txt"
    src.write_text("\n".join(f"line {i} of a small local corpus" for i in range(40)))
    meta = prepare_hf_dataset("text", tmp_path / "out", data_files=str(src), val_fraction=0.25, quiet=True)
    assert meta["documents"] == 40 and meta["val_tokens"] > 0
    TokenData.load(tmp_path / "out", block_size=8, vocab_size=50304)


@pytest.mark.parametrize("problem,match", [
    ("missing", "missing .*train.bin"),
    ("empty", "is empty"),
    ("odd_bytes", "not a whole number of uint16"),
    ("wrong_dtype_meta", "only uint16"),
    ("length_mismatch", "meta.json says"),
    ("short", "fewer than block_size"),
    ("vocab_meta", "the model's vocab_size is 64"),
    ("vocab_ids", "token id 99 >= the model's vocab_size 64"),
])
def test_bad_data_is_refused_with_a_clear_error(tmp_path, problem, match):
    train, val, meta = np.arange(300) % 50, np.arange(100) % 50, None
    if problem == "short":
        val = val[:10]
    if problem == "vocab_ids":
        train = np.append(train, 99)
    if problem == "wrong_dtype_meta":
        meta = {"dtype": "int32"}
    if problem == "length_mismatch":
        meta = {"train_tokens": 999}
    if problem == "vocab_meta":
        meta = {"vocab_size": 50257}
    write_bins(tmp_path, train, val, meta)
    if problem == "missing":
        (tmp_path / "train.bin").unlink()
    if problem == "empty":
        (tmp_path / "val.bin").write_bytes(b"")
    if problem == "odd_bytes":
        (tmp_path / "train.bin").write_bytes(b"\x00" * 301)
    with pytest.raises(DataError, match=match):
        TokenData.load(tmp_path, block_size=16, vocab_size=64)


def test_bad_text_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_text_files([str(tmp_path / "nope.txt")], tmp_path / "out", quiet=True)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_text_files([str(tmp_path / "*.md")], tmp_path / "out", quiet=True)
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        prepare_text_files([str(tmp_path / "blank.txt")], tmp_path / "out", quiet=True)


def test_a_missing_data_package_says_how_to_install_it():
    from manifold_muon.lab.resources import package_data
    with pytest.raises(RuntimeError, match="not installed; pip install thing==1.0"):
        package_data("no_such_package_xyz", "data", install="pip install thing==1.0")
