"""Sweeps: every allocation x seed (x direction-solver mode) with all other settings identical.

Each run is ``manifold-muon train`` in its own process (a crash or a leak in one run cannot
take the sweep down), in ``OUT/<allocation>-s<seed>/`` (``OUT/<allocation>-<mode>-s<seed>/`` when the sweep is
given modes) with its output in ``train.log``.
Runs go ``jobs`` at a time, their CPU threads split between them; on GPUs, at least one per
GPU and the rest shared round-robin (a small model leaves a large GPU idle between launches,
which other runs fill: ``_gpu_slots``).  A killed sweep, run again, skips finished runs and
resumes unfinished ones from their checkpoints.  ``results.jsonl`` gets one line per run with its summary and the
instability classifier's verdict.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import make_config
from .data import TokenData
from .diagnostics import summarize_spectra
from .runio import pack_run, read_jsonl, replace_file, write_json
from .stability import classify_stability

try:
    import fcntl
except ImportError:  # Windows: no flock, so sweeps there should not share a folder at once
    fcntl = None

__all__ = ["run_sweep", "plan_runs", "collect_results", "run_name", "pack_finished_runs"]

FINISHED = ("completed", "early_termination")
#: Overrides that change how runs are operated, not what they compute: a sweep directory may mix them.
OPERATIONAL = frozenset({"fail_at_iter", "max_nonfinite", "quiet", "tensorboard", "device", "compile", "compile_optimizer",
                         "ckpt_interval"})


def run_name(allocation: str, seed: int, mode: str | None = None) -> str:
    """``<allocation>-s<seed>``, or ``<allocation>-<mode>-s<seed>`` when the sweep is given modes."""
    return f"{allocation}-{mode}-s{seed}" if mode else f"{allocation}-s{seed}"


def plan_runs(allocations: list[str], seeds: list[int], out_dir, *, overrides: dict[str, str] | None = None,
              modes: list[str] | None = None) -> list[dict[str, str]]:
    """Each run's config overrides, allocation x mode x seed in launch order, its ``out_dir``
    named by :func:`run_name` under ``out_dir``."""
    runs = []
    for allocation in allocations:
        for mode in modes or [None]:
            for seed in seeds:
                run = {**(overrides or {}), "allocation": allocation, "seed": str(seed),
                       "out_dir": str(Path(out_dir) / run_name(allocation, seed, mode)), "quiet": "true"}
                if mode:
                    run["mode"] = mode
                runs.append(run)
    return runs


def _is_finished(run_dir: Path, max_iters: int | None = None) -> bool:
    """Whether the run finished (of ``max_iters`` iterations, when given)."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return False
    summary = json.loads(path.read_text())
    return summary.get("status") in FINISHED and max_iters in (None, summary.get("max_iters"))


def _gpu_slots(gpus: int, jobs: int) -> list[int]:
    """The GPU of each of the sweep's concurrent slots: ``max(jobs, gpus)`` slots, round-robin,
    so every GPU gets a run and ``jobs`` above the GPU count share them evenly."""
    return [slot % gpus for slot in range(max(jobs, gpus))] if gpus else []


def _command(preset: str, overrides: dict[str, str]) -> list[str]:
    return [sys.executable, "-m", "manifold_muon", "train", "--preset", preset,
            *(f"--{k}={v}" for k, v in overrides.items())]


def verdict_for(run_dir: Path) -> dict:
    """Classify a finished run from its eval log and summary."""
    cfg = json.loads((run_dir / "config.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [(e["iter"], e["val_loss"]) for e in read_jsonl(run_dir / "eval.jsonl")]
    stopped = summary["iters"] if summary["status"] == "early_termination" else None
    v = classify_stability(evals, warmup_iters=cfg["warmup_iters"], max_iters=cfg["max_iters"], stopped_at=stopped)
    return {"stable": v.stable, "criterion": v.criterion, "criterion_iter": v.iteration, "verdict": v.describe()}


def pack_finished_runs(path, *, spectral_summary: bool = False) -> dict:
    """Pack (``runio.pack_run``) every finished run in a sweep directory, or the run ``path``
    itself.  Runs without a finished summary are left alone: they may still be appending.
    ``spectral_summary``: first replace their full spectra by a summary
    (``diagnostics.summarize_spectra``; lossy, keeps sigma_max exact)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no such sweep or run directory: {path}")
    runs = [path] if (path / "config.json").is_file() else sorted(p for p in path.iterdir() if (p / "config.json").is_file())
    if not runs:
        raise FileNotFoundError(f"{path} holds no run directories (folders with a config.json)")
    packed, unfinished, before, after = [], [], 0, 0
    for run_dir in runs:
        if not _is_finished(run_dir):
            unfinished.append(run_dir.name)
            continue
        if spectral_summary:
            summarize_spectra(run_dir)
        b, a = pack_run(run_dir)
        packed.append(run_dir.name)
        before, after = before + b, after + a
    return {"packed": packed, "unfinished": unfinished, "bytes_before": before, "bytes_after": after}


def collect_results(out_dir, *, write: bool = True) -> list[dict]:
    """One row per finished run (summary + verdict), written to ``results.jsonl`` if ``write``
    (readers of a sweep that may still be running pass False)."""
    out_dir = Path(out_dir)
    rows = []
    for run_dir in sorted(p for p in out_dir.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"run": run_dir.name, **summary, **verdict_for(run_dir)})
    if write:  # whole or not at all: a sweep beside this one may be reading or writing it too
        replace_file(out_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


def _record_sweep(path: Path, spec: dict) -> None:
    """Write the sweep's spec; lists (allocations, seeds, modes) merge with an earlier spec's.
    A different preset or different overrides would make the runs incomparable: refused
    (settings that change how a run is operated, not what it computes, may differ).  Sweeps run
    side by side into one folder take turns here (a lock on the folder, which leaves no file
    behind), so neither loses the other's lists."""
    if fcntl is None:
        return _merge_sweep_spec(path, spec)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        _merge_sweep_spec(path, spec)
    finally:
        os.close(folder)  # releases the lock


def _merge_sweep_spec(path: Path, spec: dict) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        experiment = lambda o: {k: v for k, v in (o or {}).items() if k not in OPERATIONAL}  # noqa: E731
        for key, norm in (("preset", lambda x: x), ("overrides", experiment)):
            if norm(old.get(key)) != norm(spec[key]):
                raise ValueError(f"{path.parent} holds a sweep with {key} {old.get(key)!r}, not {spec[key]!r}; "
                                 "runs in one sweep directory must share every setting but the allocation, "
                                 "seed and mode: use another --out")
        for key in ("allocations", "seeds", "modes"):
            spec[key] = list(dict.fromkeys(old.get(key, []) + spec[key]))
    write_json(path, spec)


def _configs_or_every_problem(preset: str, planned: list[dict]) -> list:
    """Each planned run's config; if any is unusable (``--allocations hetero,foo --modes fast2``),
    one error naming every distinct problem of every run, before the sweep writes or runs anything."""
    configs, problems = [], {}
    for run_overrides in planned:
        try:
            configs.append(make_config(preset, run_overrides))
        except ValueError as e:   # the config's and the model's, one problem a line
            problems.update(dict.fromkeys(str(e).splitlines()))
    if problems:
        raise ValueError("\n".join(problems))
    return configs


def _check_data(configs) -> None:
    """Every data folder the runs to come read, opened and checked once (missing, truncated, wrong
    vocabulary: ``data.DataError``) before the sweep writes anything, rather than each run failing
    into its own train.log.  Finished runs need none, so a finished sweep reports without its data."""
    for data_dir, block_size, vocab_size in dict.fromkeys((c.data_dir, c.model.block_size, c.model.vocab_size)
                                                          for c in configs):
        TokenData.load(data_dir, block_size=block_size, vocab_size=vocab_size)


class _StepProgress:
    """One progress bar over every training step of a sweep's runs in flight, with its ETA: each
    poll reads how far each run's ``metrics.jsonl`` has grown (new lines only), so the bar moves
    with the steps, not once per finished run."""

    def __init__(self, max_iters: dict[str, int], bar):
        self.bar, self.runs = bar, {Path(d): [n, 0, 0] for d, n in max_iters.items()}   # [max_iters, offset, steps]
        self.done: list[str] = []

    def poll(self) -> None:
        moved = 0
        for run_dir, state in self.runs.items():
            log = run_dir / "metrics.jsonl"
            if not log.is_file():
                continue
            with open(log, "rb") as f:
                f.seek(state[1])
                chunk = f.read()
            state[1] += len(chunk)
            new = min(chunk.count(b"\n"), state[0] - state[2])
            state[2] += new
            moved += new
        if moved:
            self.bar.update(moved)
        active = [d.name for d, (n, _, k) in self.runs.items() if 0 < k < n]
        self.bar.set_postfix_str(f"{len(self.done)}/{len(self.runs)} runs done; running: {', '.join(active[:3])}"
                                 + (" ..." if len(active) > 3 else ""), refresh=False)

    def finished(self, name: str, ok: bool) -> None:
        self.done.append(name if ok else f"{name} (failed)")
        for run_dir, state in self.runs.items():
            if run_dir.name == name and ok and state[2] < state[0]:   # resumed runs log only their remaining steps
                self.bar.update(state[0] - state[2])
                state[2] = state[0]


def _run_all(todo: list[dict], launch, jobs: int, max_iters: dict[str, int], quiet: bool) -> list[str]:
    """Launch every run, ``jobs`` at a time, with one progress bar over their training steps;
    the names of the runs that failed."""
    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool, \
            tqdm(total=sum(max_iters.values()), desc="sweep", unit="step", disable=quiet) as bar:
        progress = _StepProgress(max_iters, bar)
        pending = {pool.submit(launch, o) for o in todo}
        while pending:
            done, pending = wait(pending, timeout=2.0, return_when=FIRST_COMPLETED)
            progress.poll()
            for future in done:   # report in finishing order
                name, code = future.result()
                progress.finished(name, ok=code == 0)
                if code != 0:
                    failed.append(name)
        progress.poll()
    return failed


def run_sweep(preset: str, allocations: list[str], seeds: list[int], out_dir, *, overrides: dict[str, str] | None = None,
              modes: list[str] | None = None, jobs: int = 1, quiet: bool = False) -> list[dict]:
    """Run the sweep and return its results; raises if any run failed (after running the rest).

    ``modes``: direction-solver modes to compare (e.g. ``["paper", "improved"]``); every
    allocation x seed runs once per mode, and run names carry the mode.  None: the preset's
    (or ``overrides``') mode.  A sweep run again into the same directory with more
    allocations, seeds or modes adds those runs; ``sweep.json`` keeps the union."""
    out_dir = Path(out_dir)
    overrides = dict(overrides or {})
    if modes and "mode" in overrides:
        raise ValueError("give the mode either as --modes or as --mode=, not both")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    gpus = torch.cuda.device_count()
    slots = _gpu_slots(gpus, jobs)
    jobs = len(slots) or jobs
    threads = max(1, (os.cpu_count() or 1) // jobs)
    planned = plan_runs(allocations, seeds, out_dir, overrides=overrides, modes=modes)
    configs = _configs_or_every_problem(preset, planned)
    unfinished = [(run_overrides, cfg) for run_overrides, cfg in zip(planned, configs)
                  if not _is_finished(Path(cfg.out_dir), cfg.max_iters)]
    _check_data(cfg for _, cfg in unfinished)
    todo = [run_overrides for run_overrides, _ in unfinished]
    out_dir.mkdir(parents=True, exist_ok=True)
    _record_sweep(out_dir / "sweep.json", {"preset": preset, "allocations": allocations, "seeds": seeds,
                                           "modes": list(modes or []), "overrides": overrides, "jobs": jobs})
    skipped = len(planned) - len(todo)
    if skipped and not quiet:
        print(f"{skipped} finished run(s) skipped; {len(todo)} to run")

    free_gpus: queue.Queue = queue.Queue()
    for gpu in slots:
        free_gpus.put(gpu)

    def launch(run_overrides):
        # glibc returns large freed blocks to the OS and faults them back in on every step;
        # on CPU that doubled a tiny run's time (sys 32 s of 38 s).  Keeping them halves it.
        env = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32),
               **os.environ, "OMP_NUM_THREADS": str(threads)}
        gpu = free_gpus.get() if gpus else None  # a slot: its GPU is busy with at most its share of runs
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        run_dir = Path(run_overrides["out_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "train.log", "a") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(_command(preset, run_overrides))}\n")
            log.flush()
            try:
                code = subprocess.run(_command(preset, run_overrides), stdout=log, stderr=subprocess.STDOUT,
                                      env=env).returncode
            finally:
                if gpu is not None:
                    free_gpus.put(gpu)
        return run_dir.name, code

    failed = _run_all(todo, launch, jobs, {o["out_dir"]: cfg.max_iters for o, cfg in unfinished}, quiet)
    results = collect_results(out_dir)
    if failed:
        raise RuntimeError(f"run(s) {', '.join(failed)} failed; see their train.log. Run the same sweep again to "
                           "resume them from their checkpoints")
    return results
