"""A sweep resumes after a kill; a report is built from small real runs."""
import csv
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import stats as scipy_stats
import pytest
from PIL import Image

from manifold_muon.lab.compare import build_comparison, code_versions, compare_rows, differing_settings, run_config
from manifold_muon.lab.config import config_to_dict, make_config
from manifold_muon.lab.analysis import sigma_max_curve
from manifold_muon import resolve, save_allocation
from manifold_muon.lab.report import _constraint, build_report, gap_rows
from manifold_muon.lab.diagnostics import SpectralRecorder, read_spectral
from manifold_muon.lab.runio import PACKED_LOGS, pack_run, read_jsonl, unpack_run
from manifold_muon.lab import sweep
from manifold_muon.lab.sweep import _gpu_slots, pack_finished_runs, run_sweep
from conftest import VOCAB, TinyGPT

ALLOCS = ["unconstrained", "hetero"]
JOBS = 2   # runs side by side, a core each: a tiny model's run uses one thread as well as two


def overrides(data, **extra):
    base = {"data_dir": str(data), "vocab_size": VOCAB, "n_embd": 32, "n_head": 2, "n_layer": 2, "block_size": 16,
            "batch_size": 4, "max_iters": 12, "warmup_iters": 2, "lr_decay_iters": 12, "eval_interval": 4,
            "eval_iters": 2, "dual_steps": 8}
    base.update(extra)
    return {k: str(v) for k, v in base.items()}


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_killed_sweep_resumes_and_skips_finished_runs(data_dir, tmp_path):
    straight = tmp_path / "straight"
    run_sweep("tiny-cpu", ALLOCS, [1], straight, overrides=overrides(data_dir), quiet=True, jobs=JOBS)
    crashy = tmp_path / "crashy"
    with pytest.raises(RuntimeError, match="failed; see their train.log"):  # every run "killed" at iteration 7
        run_sweep("tiny-cpu", ALLOCS, [1], crashy, overrides=overrides(data_dir, fail_at_iter=7), quiet=True, jobs=JOBS)
    assert not (crashy / "hetero-s1" / "summary.json").exists()
    results = run_sweep("tiny-cpu", ALLOCS, [1], crashy, overrides=overrides(data_dir), quiet=True, jobs=JOBS)
    for alloc in ALLOCS:
        assert losses(crashy / f"{alloc}-s1") == losses(straight / f"{alloc}-s1")
    assert {r["allocation"] for r in results} == set(ALLOCS)
    stamp = (crashy / "hetero-s1" / "summary.json").stat().st_mtime_ns
    data_dir.rename(tmp_path / "data-elsewhere")   # nothing left to run, so the data is not needed
    run_sweep("tiny-cpu", ALLOCS, [1], crashy, overrides=overrides(data_dir), quiet=True)
    assert (crashy / "hetero-s1" / "summary.json").stat().st_mtime_ns == stamp
    rows = read_jsonl(crashy / "results.jsonl")
    assert [r["run"] for r in rows] == ["hetero-s1", "unconstrained-s1"] and all("verdict" in r for r in rows)


def test_packed_runs_read_report_and_resume_as_plain_ones(data_dir, tmp_path):
    out = tmp_path / "sweep"
    # a finished run and, beside it, an unfinished one killed at iteration 7 (two sweeps at once, a core each)
    with ThreadPoolExecutor(2) as pool:
        finished = pool.submit(run_sweep, "tiny-cpu", ["hetero"], [1], out, overrides=overrides(data_dir),
                               quiet=True, jobs=JOBS)
        killed = pool.submit(run_sweep, "tiny-cpu", ["unconstrained"], [1], out,
                             overrides=overrides(data_dir, fail_at_iter=7), quiet=True, jobs=JOBS)
        finished.result()
        with pytest.raises(RuntimeError, match="failed"):
            killed.result()
    run = out / "hetero-s1"
    logs = {name: (run / name).read_bytes() for name in PACKED_LOGS if (run / name).is_file()}
    assert set(logs) == set(PACKED_LOGS) - {"spectral_summary.bin"}   # a run summarizes only when asked
    spectra, diagnostics = read_spectral(run)[1], read_jsonl(run / "diagnostics.jsonl")
    report = build_report(out).read_text()

    done = pack_finished_runs(out)
    assert done["packed"] == ["hetero-s1"] and done["unfinished"] == ["unconstrained-s1"]
    assert 0 < done["bytes_after"] < done["bytes_before"] == sum(map(len, logs.values()))
    assert not any((run / name).exists() for name in PACKED_LOGS)
    assert np.array_equal(read_spectral(run)[1], spectra) and read_jsonl(run / "diagnostics.jsonl") == diagnostics
    assert build_report(out).read_text() == report
    unpack_run(run)
    assert {name: (run / name).read_bytes() for name in PACKED_LOGS if (run / name).is_file()} == logs
    assert not list(run.glob("*.xz"))

    # a packed run trained again unpacks first, and resumes as if it had never been packed
    unfinished = out / "unconstrained-s1"
    pack_run(unfinished)
    straight = tmp_path / "straight"
    with ThreadPoolExecutor(2) as pool:
        sweeps = [pool.submit(run_sweep, "tiny-cpu", ["unconstrained"], [1], folder, overrides=overrides(data_dir),
                              quiet=True, jobs=JOBS) for folder in (out, straight)]
        for sweep_done in sweeps:
            sweep_done.result()
    assert losses(unfinished) == losses(straight / "unconstrained-s1") and not list(unfinished.glob("*.xz"))
    with pytest.raises(FileNotFoundError, match="holds no run directories"):
        pack_finished_runs(tmp_path)

    # the spectral summary: sigma_max, what the report plots, exact; a few ranks of the rest; far smaller
    sigma_attention = sigma_max_curve(run, "attention")
    pack_finished_runs(run, spectral_summary=True)
    header, summary = read_spectral(run)
    assert header["summary"]["ranks"][0] == [0, 8, 16, 23, 31]   # of 32 (n_embd)
    assert not (run / "spectral.json").exists() and not list(run.glob("spectral.bin*"))
    for i in range(len(header["names"])):
        assert np.array_equal(summary[f"sv{i}"], spectra[f"sv{i}"][:, header["summary"]["ranks"][i]])
        assert np.array_equal(summary[f"diag{i}"][:, [0, -1]], np.stack([spectra[f"diag{i}"].max(1), spectra[f"diag{i}"].min(1)], 1))
        assert np.array_equal(summary[f"fro{i}"], spectra[f"fro{i}"])
    assert all(np.array_equal(a, b) for a, b in zip(sigma_max_curve(run, "attention"), sigma_attention))
    assert not (run / "spectral_summary.bin").exists()   # packed too, and read back exact (above)
    assert (run / "spectral_summary.bin.xz").stat().st_size * 4 < len(logs["spectral.bin"])
    (run / "spectral.bin").write_bytes(logs["spectral.bin"])   # left by a crash after the header went
    pack_finished_runs(run, spectral_summary=True)   # again: removes it, and keeps the summary as it was
    assert not list(run.glob("spectral.bin*")) and np.array_equal(read_spectral(run)[1], summary)
    with pytest.raises(ValueError, match="summarized"):
        SpectralRecorder(run, {})


def test_report_from_small_real_runs(data_dir, tmp_path):
    out = tmp_path / "sweep"
    run_sweep("tiny-cpu", ALLOCS, [1, 2], out, overrides=overrides(data_dir, inject_nonfinite_at="5,6,7",
                                                                    max_nonfinite=10), quiet=True, jobs=JOBS)
    # a third run that dies early: three consecutive non-finite steps with max_nonfinite=3
    run_sweep("tiny-cpu", ["all-dgram"], [1], out, overrides=overrides(data_dir, inject_nonfinite_at="5,6,7",
                                                                          max_nonfinite=3), quiet=True)
    path = build_report(out)
    text = path.read_text()
    for fig in ("fig1_val_loss.png", "fig2_sigma_max.png", "fig3_mechanism.png"):
        assert f"]({fig})" in text
        assert (path.parent / fig).read_bytes()[:4] == b"\x89PNG"
        with Image.open(path.parent / fig) as image:
            assert image.mode == "P"   # palette PNG: a third of the bytes of matplotlib's RGBA
    with open(path.parent / "table1.csv") as f:
        rows = {r["allocation"]: r for r in csv.DictReader(f)}
    assert rows["hetero"]["attention"] == "Stiefel" and rows["hetero"]["mlp"] == "DGram"
    assert rows["unconstrained"]["attention"] == "None (Muon)"
    finals = [json.loads((out / f"hetero-s{s}" / "summary.json").read_text())["final_val_loss"] for s in (1, 2)]
    half = scipy_stats.t.ppf(0.975, 1) * np.std(finals, ddof=1) / np.sqrt(2)   # the 95% t interval of two seeds
    mean = np.mean(finals)
    assert rows["hetero"]["final_val_loss"] == f"{mean:.4f} [{mean - half:.4f}, {mean + half:.4f}]"
    assert rows["hetero"]["result"] == "stable (2/2)"
    assert rows["all-dgram"]["result"] == "unstable (1/1; s1: early_termination @ 8)"
    # the mechanism column: Stiefel attention keeps sigma_max at 1 in both seeds; Muon's grows from its init
    assert rows["hetero"]["attention_mechanism"].startswith("σ 1, H ")
    sigma, entropy = rows["unconstrained"]["attention_mechanism"].split(", ")
    assert sigma != "σ 1" and 0 < float(entropy.split()[1].split("–")[0]) <= np.log(16)   # context 16
    assert "| hetero | Stiefel | DGram | 2 |" in (path.parent / "table1.md").read_text()
    # the comparison: hetero vs unconstrained, both with two seeds, Welch's interval as scipy gives it
    others = [json.loads((out / f"unconstrained-s{s}" / "summary.json").read_text())["final_val_loss"] for s in (1, 2)]
    welch = scipy_stats.ttest_ind(finals, others, equal_var=False)
    low, high = welch.confidence_interval(0.95)
    gap = np.mean(finals) - np.mean(others)
    verdict = "inconclusive" if low <= 0 <= high else ("a lower loss for a" if high < 0 else "a higher loss for a")
    cell = f"{gap:+.4f} [{low:+.4f}, {high:+.4f}]" + (", inconclusive" if verdict == "inconclusive" else "")
    assert f"| hetero − unconstrained | improved | 2 / 2 | {cell} | {verdict} | {welch.pvalue:.3f} |" in text
    assert "## Scale" in text and "share in manifold-managed matrices" in text
    assert "per-batch validation losses, the subset's standard error is" in text
    # the causal chain: every run has a row, the early-terminated one first with its divergence
    assert "## The causal chain" in text and "](fig5_causal_chain.png)" in text
    chain_lines = [line for line in text.splitlines() if line.startswith("| ") and "stages)" in line]
    assert len(chain_lines) == 5 and chain_lines[0].startswith("| all-dgram-s1 | early_termination |")
    assert "| 5 | yes" in chain_lines[0] or "| 5 | no" in chain_lines[0]  # divergence at the first NaN, iteration 5


def test_sweep_compares_modes_with_everything_else_identical(data_dir, tmp_path):
    out = tmp_path / "modes"
    with pytest.raises(ValueError, match="either as --modes or as --mode="):
        run_sweep("tiny-cpu", ["hetero"], [1], out, modes=["paper", "improved"],
                  overrides=overrides(data_dir, mode="paper"), quiet=True)
    run_sweep("tiny-cpu", ["hetero"], [1], out, modes=["paper", "improved"], overrides=overrides(data_dir), quiet=True,
              jobs=JOBS)
    with pytest.raises(ValueError, match="must share every setting"):  # extending it with other settings
        run_sweep("tiny-cpu", ["all-stiefel"], [1], out, modes=["improved"], overrides=overrides(data_dir, max_iters=20),
                  quiet=True)
    configs = {m: json.loads((out / f"hetero-{m}-s1" / "config.json").read_text()) for m in ("paper", "improved")}
    assert configs["paper"]["mode"] == "paper" and configs["improved"]["mode"] == "improved"
    configs["paper"].pop("mode"), configs["improved"].pop("mode")
    configs["paper"].pop("out_dir"), configs["improved"].pop("out_dir")
    assert configs["paper"] == configs["improved"]
    assert losses(out / "hetero-paper-s1")[0] == losses(out / "hetero-improved-s1")[0]  # same init and batch
    assert losses(out / "hetero-paper-s1")[-1] != losses(out / "hetero-improved-s1")[-1]
    text = build_report(out).read_text()
    assert "| hetero | paper | Stiefel | DGram | 1 |" in text and "| hetero | improved | Stiefel | DGram | 1 |" in text
    assert "## Paper mode vs improved mode" in text and "](fig4_direction_quality.png)" in text
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| hetero | ")]
    cells = next(r for r in rows if len(r) == 10)  # the paper-vs-improved row
    # one seed per mode: the bare difference of the two final losses, marked as untested
    finals = {m: json.loads((out / f"hetero-{m}-s1" / "summary.json").read_text())["final_val_loss"]
              for m in ("paper", "improved")}
    assert cells[5] == f"{finals['improved'] - finals['paper']:+.4f} (no interval: fewer than 2 seeds a side)"
    paper_attn, improved_attn = cells[6], cells[7]
    # the improved directions are tangent (violation ~1e-7), the paper's are not
    assert float(improved_attn.split("/")[1]) < 1e-5 < float(paper_attn.split("/")[1])
    # "align (made feasible) / viol": feasible directions keep their alignment when made feasible
    as_returned, feasible = (float(x) for x in improved_attn.split("/")[0].replace("(", " ").replace(")", " ").split())
    assert abs(as_returned - feasible) < 5e-3


def test_gpu_slots_give_every_gpu_a_run_and_share_the_rest():
    assert _gpu_slots(0, 3) == []
    assert _gpu_slots(1, 1) == [0] and _gpu_slots(1, 4) == [0, 0, 0, 0]
    assert _gpu_slots(4, 1) == [0, 1, 2, 3]  # at least one run per GPU
    assert _gpu_slots(2, 5) == [0, 1, 0, 1, 0]


def test_sweep_runs_jobs_side_by_side_on_one_gpu(data_dir, monkeypatch, tmp_path):
    """Four runs, --jobs 3, one (pretended) GPU: three at a time, all on GPU 0, threads split."""
    import threading
    import time
    running, peak, envs, lock = [0], [0], [], threading.Lock()

    def fake_run(cmd, stdout, stderr, env):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            envs.append((env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"]))
        time.sleep(1.0)   # long enough that the pool's first three overlap even on a loaded machine
        with lock:
            running[0] -= 1
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(sweep.torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 12)
    out = tmp_path / "sweep"
    run_sweep("tiny-cpu", ["hetero", "all-stiefel"], [1, 2], out, jobs=3, quiet=True,
              overrides={"data_dir": str(data_dir), "vocab_size": str(VOCAB)})
    assert peak[0] == 3 and len(envs) == 4
    assert set(envs) == {("0", "4")}
    assert json.loads((out / "sweep.json").read_text())["jobs"] == 3
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        run_sweep("tiny-cpu", ["hetero"], [1], out, jobs=0, quiet=True)


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report(tmp_path / "nope")
    with pytest.raises(ValueError, match="no finished run"):
        build_report(tmp_path)


def test_compare_puts_sweeps_that_differ_in_one_setting_side_by_side(data_dir, tmp_path):
    sweeps = [tmp_path / "lr-low", tmp_path / "lr-high"]
    for folder, lr in zip(sweeps, (0.02, 0.3)):  # diag_interval differs too, but only logs: not a treatment
        run_sweep("tiny-cpu", ["unconstrained", "all-dgram"], [1, 2], folder, quiet=True, jobs=JOBS,
                  overrides=overrides(data_dir, muon_lr=lr, diag_interval=2 if lr > 0.1 else 4))
    path = build_comparison(sweeps, tmp_path / "cmp")
    settings, labels, rows = compare_rows(sweeps)
    assert settings == ["muon_lr"] and labels == ["muon_lr=0.02", "muon_lr=0.3"]
    dgram = next(r for r in rows if r["allocation"] == "all-dgram")
    for folder, entry in zip(sweeps, dgram["sweeps"]):
        runs = [folder / f"all-dgram-s{s}" for s in (1, 2)]
        finals = [json.loads((run / "summary.json").read_text())["final_val_loss"] for run in runs]
        assert entry["final_val_loss"] == pytest.approx(np.mean(finals)) and entry["seeds"] == 2
        assert entry["final_val_std"] == pytest.approx(np.std(finals, ddof=1))
        entropy = [min(min(m["entropy"] for m in d["mechanics"]) for d in read_jsonl(run / "diagnostics.jsonl"))
                   for run in runs]
        assert entry["entropy"] == pytest.approx(np.mean(entropy))
    assert dgram["sweeps"][1]["sigma_max"] > dgram["sweeps"][0]["sigma_max"]  # DGram columns grow faster at 15x
    text = path.read_text()
    assert "All runs were made by the same code" in text
    (real,) = code_versions(sweeps[:1], [{"all-dgram-s1"}])[0]   # e.g. "006bdaf (torch 2.13.0+cpu, cpu)"
    env_path = sweeps[1] / "all-dgram-s2" / "env.json"
    env_path.write_text(json.dumps({**json.loads(env_path.read_text()), "git_sha": "0123456789abcdef"}))
    other = "0123456 " + real.split(" ", 1)[1]
    # sorted, so that the test holds whatever the commit's own hash (006bdaf sorts before 0123456)
    assert (f"`lr-low`: {real}; `lr-high`: {' + '.join(sorted([real, other]))}."
            in build_comparison(sweeps, tmp_path / "cmp").read_text())
    assert "more than one version of the code" in (tmp_path / "cmp" / "compare.md").read_text()
    assert "differ in `muon_lr`" in text and "| all-dgram | improved | " in text and "](fig_compare.png)" in text
    assert (path.parent / "fig_compare.png").read_bytes()[:4] == b"\x89PNG"
    with open(path.parent / "compare.csv") as f:
        assert len(list(csv.DictReader(f))) == 4  # 2 allocations x 2 sweeps
    with pytest.raises(ValueError, match="two or more sweep directories, got 1"):
        build_comparison(sweeps[:1], tmp_path / "cmp")
    only = build_comparison(sweeps, tmp_path / "only", ["all-dgram"]).read_text()
    assert "| all-dgram | improved | " in only and "| unconstrained |" not in only
    assert "more than one version of the code" in only   # the edited env.json is an all-dgram run's
    assert "All runs were made by the same code" in build_comparison(sweeps, tmp_path / "only", ["unconstrained"]).read_text()
    with pytest.raises(ValueError, match=r"\['hetero'\] are in none of the sweeps; valid choices: unconstrained, all-dgram"):
        compare_rows(sweeps, ["hetero"])
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        build_comparison([sweeps[0], tmp_path / "nope"], tmp_path / "cmp")


def test_compare_reads_muon_weight_decay_as_the_decay_it_stood_for(tmp_path):
    def run(name, **overrides):
        (tmp_path / name).mkdir()
        cfg = make_config("cpu-small", {k: str(v) for k, v in overrides.items()})
        (tmp_path / name / "config.json").write_text(json.dumps(config_to_dict(cfg)))
        return run_config(tmp_path / name)

    default, weaker, both = run("default"), run("weaker", muon_weight_decay=0.03), run("both", weight_decay=0.2)
    assert default["muon_weight_decay"] == 0.1 and weaker["muon_weight_decay"] == 0.03
    assert differing_settings([default, weaker]) == ["muon_weight_decay"]
    assert differing_settings([default, both]) == ["weight_decay", "muon_weight_decay"]


def test_every_allocation_keeps_its_own_colour_past_ten():
    from matplotlib.colors import to_hex
    from manifold_muon.lab.figures import allocation_colour
    for count in (5, 10, 11, 16):
        colours = [to_hex(allocation_colour(i, count)) for i in range(count)]
        assert len(set(colours)) == count, (count, colours)


def test_table_names_the_weight_decay_where_a_preset_departs_from_the_papers(tmp_path):
    for preset, attention, mlp in (("hetero-inv-wd", "DGram + weight decay 0.1", "Stiefel"),
                                   ("hetero-wd", "Stiefel", "DGram + weight decay 0.1"),
                                   ("hetero-inv", "DGram", "Stiefel"),
                                   ("unconstrained", "None (Muon)", "None (Muon)"),   # Muon's own decay goes unsaid
                                   ("unconstrained-no-wd", "None (Muon), no weight decay",
                                    "None (Muon), no weight decay")):
        save_allocation(resolve(TinyGPT(), preset), tmp_path / "allocation.json")
        assert (_constraint(tmp_path, "attention"), _constraint(tmp_path, "mlp")) == (attention, mlp)


def test_seed_gaps_pair_unconstrained_muon_run_in_one_mode_with_each_mode_of_the_other(tmp_path):
    # Unconstrained Muon has no direction solver, so a sweep runs it in one mode only.
    finals = {("unconstrained", "paper"): [5.60, 5.62], ("unconstrained-no-wd", "paper"): [6.40, 6.50],
              ("hetero-wd", "improved"): [5.55, 5.57], ("all-dgram", "improved"): [6.41, 6.47],
              ("all-dgram", "paper"): [6.70, 6.90], ("hetero", "improved"): [5.60, 5.61]}
    results = [{"allocation": a, "mode": m, "final_val_loss": v} for (a, m), vs in finals.items() for v in vs]
    rows = {(r["pair"], r["mode"]): r for r in gap_rows(tmp_path, results)}
    assert rows[("hetero-wd − unconstrained", "improved / paper")]["difference"].startswith(f"{5.56 - 5.61:+.4f} [")
    assert rows[("unconstrained-no-wd − unconstrained", "paper")]["seeds"] == "2 / 2"
    assert rows[("unconstrained-no-wd − all-dgram", "paper")]["difference"].startswith(f"{6.45 - 6.80:+.4f} [")
    assert rows[("unconstrained-no-wd − all-dgram", "paper / improved")]["difference"].startswith(f"{6.45 - 6.44:+.4f} [")
    # two seeds a side: a range that does not overlap is still no evidence of a difference
    assert rows[("hetero-wd − hetero", "improved")]["verdict"] == "inconclusive"
    assert rows[("unconstrained-no-wd − unconstrained", "paper")]["verdict"] == "a higher loss for a"
    # a constrained allocation never pairs across modes, and no pair is counted twice
    assert not any(r["pair"] == "hetero-wd − hetero" and r["mode"] != "improved" for r in rows.values())
    assert ("hetero − unconstrained", "improved / paper") in rows
    assert len(rows) == len(gap_rows(tmp_path, results)) == 6


def _record_many(out_dir, allocation, rounds, start):
    start.wait()
    for seed in range(rounds):
        sweep._record_sweep(out_dir / "sweep.json", {"preset": "tiny-cpu", "allocations": [allocation],
                                                      "seeds": [seed], "modes": [], "overrides": {}, "jobs": 1})


def test_sweeps_side_by_side_into_one_folder_keep_each_others_runs(tmp_path):
    # Sweeps started together into one folder could drop each other's allocations (an unlocked
    # read-merge-write); test_runio guards the temporary names that once made one of them fail.
    import multiprocessing
    context = multiprocessing.get_context("fork")
    start = context.Barrier(6)
    writers = [context.Process(target=_record_many, args=(tmp_path, f"alloc{i}", 30, start)) for i in range(6)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert [w.exitcode for w in writers] == [0] * 6
    spec = json.loads((tmp_path / "sweep.json").read_text())
    assert sorted(spec["allocations"]) == [f"alloc{i}" for i in range(6)]
    assert sorted(spec["seeds"]) == list(range(30))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json"]  # no temporary left behind
