"""The lab under faults and bad input: it refuses, naming the file or setting and what to do,
and never trains on, reports or overwrites what it cannot trust."""
from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from manifold_muon.lab import checkpoints, cli
from manifold_muon.lab.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from manifold_muon.lab.data import DataError, TokenData
from manifold_muon.lab.prepare import prepare_text_files
from manifold_muon.lab.train import RunMismatch, train

from test_train import tiny


def test_a_resume_under_other_settings_is_refused_naming_each_key(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_dir, run, max_iters=4, lr_decay_iters=4))
    with pytest.raises(RunMismatch, match=r"allocation: 'hetero' in the run, 'unconstrained' asked.*muon_lr: 0\.02 "
                                          r"in the run, 0\.5 asked.*--restart"):
        train(tiny(data_dir, run, max_iters=8, lr_decay_iters=4, allocation="unconstrained", muon_lr=0.5))
    with pytest.raises(RunMismatch, match="seed"):
        train(tiny(data_dir, run, max_iters=8, lr_decay_iters=4, seed=2))
    assert json.loads((run / "config.json").read_text())["allocation"] == "hetero"   # nothing rewritten
    extended = train(tiny(data_dir, run, max_iters=8, lr_decay_iters=4))   # more iterations: allowed
    assert extended["status"] == "completed" and extended["iters"] == 8


def test_a_finished_run_is_not_trained_again_and_restart_moves_it_aside(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(tiny(data_dir, run, max_iters=4, lr_decay_iters=4))
    again = train(tiny(data_dir, run, max_iters=4, lr_decay_iters=4))
    assert again["already_finished"] and again["final_val_loss"] == first["final_val_loss"]
    anew = train(tiny(data_dir, run, max_iters=4, lr_decay_iters=4, allocation="unconstrained"), restart=True)
    assert anew["allocation"] == "unconstrained" and (tmp_path / "run.old1" / "ckpt.pt").exists()
    assert json.loads((tmp_path / "run.old1" / "config.json").read_text())["allocation"] == "hetero"


def test_train_names_its_run_folder_first_and_says_when_it_is_already_finished(data_dir, tmp_path, capsys):
    args = ["train", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", "--vocab_size=96", "--n_embd=32",
            "--n_head=2", "--n_layer=1", "--block_size=16", "--batch_size=2", "--max_iters=2", "--warmup_iters=1",
            "--lr_decay_iters=2", "--eval_interval=2", "--eval_iters=1", "--quiet", "--threads=1"]
    threads = torch.get_num_threads()
    try:
        cli.main(args)
        first = capsys.readouterr().out.splitlines()
        cli.main(args)
        second = capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
    assert first[0] == f"run folder: {tmp_path / 'run'}" and first[-1].startswith("completed: 2 iterations")
    assert "already finished: 2 iterations" in second and "--restart" in second


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_a_damaged_checkpoint_is_refused_with_its_name_and_left_as_it_is(data_dir, tmp_path, damage):
    run = tmp_path / "run"
    train(tiny(data_dir, run, max_iters=4, lr_decay_iters=4, fail_at_iter=6, eval_interval=2))
    path = run / "ckpt.pt"
    data = bytearray(path.read_bytes())
    if damage == "garbage":
        data[len(data) // 2: len(data) // 2 + 4096] = np.random.default_rng(0).bytes(4096)
    elif damage == "empty":
        data = bytearray()
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    expected = {"garbage": "does not match its sha256", "empty": "is empty", "truncated": "does not match"}[damage]
    with pytest.raises(CheckpointError, match=rf"{path}.*{expected}.*--restart"):
        train(tiny(data_dir, run, max_iters=8, lr_decay_iters=4, eval_interval=2))
    assert path.read_bytes() == bytes(data)   # the run did not go on to overwrite it


def test_an_unchecked_truncated_checkpoint_names_its_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"iter": 4, "w": torch.ones(1000)}, path)
    checkpoints.digest_path(path).unlink()   # as an older version wrote them
    path.write_bytes(path.read_bytes()[:300])
    with pytest.warns(RuntimeWarning, match="no ckpt.pt.sha256"), pytest.raises(CheckpointError, match=f"{path}.*truncated"):
        load_checkpoint(path)


def test_a_crash_between_the_digest_and_the_checkpoint_leaves_either_loadable(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"iter": 4}, path)
    real = checkpoints.replace_file

    def crash_on_the_checkpoint(target, data):
        if target == path:
            raise KeyboardInterrupt
        real(target, data)

    monkeypatch.setattr(checkpoints, "replace_file", crash_on_the_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iter": 8}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"iter": 4}   # the digest file lists both; the old one is whole


def test_a_full_disk_says_so_with_the_path(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"

    def no_space(target, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "replace_file", no_space)
    with pytest.raises(CheckpointError, match=rf"could not write {path}: the disk is full \(.* bytes free"):
        save_checkpoint({"iter": 4}, path)


def test_tokens_beyond_the_declared_vocabulary_are_refused(data_dir):
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, "vocab_size": 50}))
    with pytest.raises(DataError, match=r"train.bin contains token id 9\d >= the vocab_size 50 its meta.json declares"):
        TokenData.load(data_dir, block_size=16, vocab_size=96)


def test_text_that_is_not_utf8_is_refused_unless_replacement_is_asked(tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Ça va très bien, merci. ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match=rf"{latin} is not valid UTF-8 \(byte 0xc7 at offset 0\).*--decode-errors=replace"):
        prepare_text_files([str(latin)], tmp_path / "out", quiet=True)
    assert not list((tmp_path / "out").glob("*.tmp"))   # the refused preparation left no temporaries
    meta = prepare_text_files([str(latin)], tmp_path / "out", quiet=True, decode_errors="replace")
    assert meta["train_tokens"] > 0


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(data_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tiny(data_dir, run, fail_at_iter=1))
    assert not run.exists()


def test_stale_temporaries_of_a_killed_writer_are_removed_on_resume(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_dir, run, max_iters=4, lr_decay_iters=4))
    (run / "ckpt.pt.12345.678.tmp").write_bytes(b"half")
    train(tiny(data_dir, run, max_iters=6, lr_decay_iters=4))
    assert not list(run.glob("*.tmp"))
