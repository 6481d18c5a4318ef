"""Run logs keep floats at float32 precision, and packing brings logs written before that rule to it;
files replaced whole stay whole when several processes replace one at once."""
import json
import lzma
import math

import numpy as np

from manifold_muon.lab.runio import JsonlLog, at_float32_precision, pack_run, read_jsonl, replace_file

LOSS32 = float(np.float32(5.735352516174316))  # what a float32 loss's .item() gives
LR = 0.0029563713774219224


def a_row(it: int) -> dict:
    return {"iter": it, "loss": LOSS32 / (it + 1), "lr": LR * it, "skipped": False, "mfu": None,
            "mechanics": [{"layer": 0, "entropy": 1 / 3}], "beyond": 1e300, "subnormal": 1e-310,
            "zero": 0.0, "nan": float("nan")}


def test_floats_keep_their_float32_value_in_fewer_digits():
    row = a_row(3)
    kept = at_float32_precision(row)
    assert np.float32(kept["loss"]) == np.float32(row["loss"]) and len(repr(kept["loss"])) < len(repr(row["loss"]))
    assert np.float32(kept["mechanics"][0]["entropy"]) == np.float32(1 / 3)
    assert kept["lr"] != row["lr"] and abs(kept["lr"] - row["lr"]) <= 6e-8 * row["lr"]
    assert (kept["beyond"], kept["subnormal"], kept["zero"]) == (1e300, 1e-310, 0.0)   # float32 cannot hold them
    assert math.isnan(kept["nan"]) and kept["skipped"] is False and kept["mfu"] is None and kept["iter"] == 3
    assert json.dumps(at_float32_precision(kept)) == json.dumps(kept)


def test_logs_are_written_at_float32_precision(tmp_path):
    log = JsonlLog(tmp_path / "metrics.jsonl")
    log.write(a_row(3))
    log.close()
    assert json.dumps(read_jsonl(tmp_path / "metrics.jsonl")[0]) == json.dumps(at_float32_precision(a_row(3)))


def test_pack_brings_old_logs_to_float32_precision_packed_or_not(tmp_path):
    rows = [a_row(i) for i in range(200)]
    old = "".join(json.dumps(r) + "\n" for r in rows).encode()   # as versions before the rule wrote them
    (tmp_path / "metrics.jsonl").write_bytes(old)
    (tmp_path / "diagnostics.jsonl.xz").write_bytes(lzma.compress(old))   # packed by such a version
    before, after = pack_run(tmp_path)
    assert before == len(old) + len(lzma.compress(old)) and 0 < after < before
    expected = json.dumps([at_float32_precision(r) for r in rows])
    for name in ("metrics.jsonl", "diagnostics.jsonl"):
        assert not (tmp_path / name).exists()
        assert json.dumps(read_jsonl(tmp_path / name)) == expected
    packed_once = (tmp_path / "diagnostics.jsonl.xz").stat().st_size
    assert packed_once < len(lzma.compress(old))
    assert pack_run(tmp_path) == (0, 0)   # a second pack finds nothing to do


def _replace_many(path, writer, rounds, start):
    start.wait()
    for i in range(rounds):
        replace_file(path, f"{writer} {i}\n".encode() * 1000)


def test_processes_replacing_one_file_at_once_each_rename_their_own_temporary(tmp_path):
    # results.jsonl is rewritten by every sweep sharing a folder, with no lock: one shared
    # temporary name let a writer rename another's file away (FileNotFoundError).
    import multiprocessing
    context = multiprocessing.get_context("fork")
    start = context.Barrier(6)
    path = tmp_path / "results.jsonl"
    writers = [context.Process(target=_replace_many, args=(path, w, 40, start)) for w in range(6)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0] * 6
    lines = path.read_text().splitlines()
    assert len(lines) == 1000 and len(set(lines)) == 1  # one writer's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.jsonl"]
