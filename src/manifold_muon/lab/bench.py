"""``manifold-muon bench``: optimizer and whole-step time, side by side in one process.

For one model and batch it times AdamW everywhere (ours, and torch's fused AdamW, its fastest),
``torch.optim.Muon`` (+ AdamW for the rest), our Muon, and our Manifold Muon in paper, fast and
improved mode for each allocation.  Configurations are interleaved round by round (A B C ... A B C ...), medians are reported,
and every ratio is against AdamW's whole step measured in the same rounds (ours, and in a second
column torch's fused one).  Quality columns:
the mean alignment ``<G, A> / ||G||_*`` and the largest tangent violation of the last step,
overall and per matrix group (attention / MLP), where it also gives the alignment of the
direction made feasible (tangent, spectral norm 1): the fair comparison for paper mode.
Absolute times mean something only on a GPU; on a CPU read the ratios.  "opt ops" counts the
optimizer step's ATen operations other than views: on a GPU, kernel launches, whose host time
(microseconds each) sets a floor under the step where it is not hidden behind device work.

With the config's ``compile`` (``--compile``; the paper's setup) every configuration's forward goes through
``torch.compile``: the models share one compiled graph, so it compiles once.  If compiling fails
the bench says why and times the eager model instead, rather than losing the call.  Stopped by
SIGTERM during its rounds (``timeout``), it returns the rounds measured so far, without the
operation counts and quality columns, and the result says so (``stopped``).

With ``compile_optimizer`` (``--compile_optimizer``) our Muon and every fast-mode configuration
get a twin whose direction goes through ``torch.compile`` (the ``compile`` group key), timed in
the same rounds.  The first steps compile (the warm-up rounds absorb it); the quality columns
come from a statistics step, which runs eager and the compiled graph beside it: the table ends
with how far compiling moved the alignment (a miscompiled graph shows there).

With ``profile_top`` (``--profile N``) one more optimizer step of each configuration runs under
``torch.profiler``: on a GPU its kernels (how many, their summed time, the N costliest), and how
much of the optimizer's median wall time they fill (``device_busy``: near 1, the step is bound
by the GPU's work; far below, by launching it, which compiling or fewer, larger kernels
answer); on a CPU its costliest operations.  A SIGTERM while counting, profiling or measuring
quality keeps the configurations done so far.
"""
from __future__ import annotations

import contextlib
import json
import platform
import signal
import statistics
import threading
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters   # graphs compiled, to tell the forward's from the optimizer's
from torch.autograd import DeviceType
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from .config import make_config
from .diagnostics import summarize_health
from .model import GPT
from ..optim import PAPER_ALLOCATIONS, ManifoldMuon, resolve
from ..optim.dual import DIRECTION_MODES

__all__ = ["run_bench", "format_bench", "save_bench", "synchronize", "write_result"]

ALLOCATIONS = PAPER_ALLOCATIONS


def _configs(allocations, modes, compiled_twins: bool):
    """(label, allocation, group overrides) per configuration; with ``compiled_twins`` each
    configuration whose direction can compile (our Muon, fast mode) is followed by its twin
    with ``compile=True``, so the two are timed in the same rounds."""
    yield "adamw", "baseline", {}
    yield "torch.optim.AdamW (fused)", "torch-adamw-fused", {}
    yield "torch.optim.Muon", "torch-muon", {}
    # Our Muon with torch's math (Newton-Schulz 5, bf16), then with the paper's (Polar Express 10, bf16).
    yield "muon (ours, newton-schulz)", "unconstrained", {"msign_method": "newton_schulz"}
    yield "muon (ours, polar express)", "unconstrained", {}
    if compiled_twins:
        yield "muon (ours, polar express, compiled)", "unconstrained", {"compile": True}
    for alloc in allocations:
        if alloc != "unconstrained":
            for mode in modes:
                yield f"{alloc} [{mode}]", alloc, {"mode": mode}
                if compiled_twins and mode == "fast":
                    yield f"{alloc} [fast, compiled]", alloc, {"mode": mode, "compile": True}


class _TorchOptimizers:
    """torch's own optimizers as one step(): ``torch.optim.Muon`` on the Muon-managed matrices
    and AdamW on the rest, or (``muon=False``) fused AdamW on everything: torch's fastest AdamW,
    the strictest baseline for the ratios."""

    def __init__(self, model, *, muon: bool):
        groups = resolve(model, "unconstrained" if muon else "baseline")
        rest = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups if g["algorithm"] == "adamw"]
        self.opts = [torch.optim.AdamW(rest, lr=6e-4, betas=(0.9, 0.95), fused=not muon)]
        if muon:
            matrices = [p for g in groups if g["algorithm"] == "muon" for p in g["params"]]
            self.opts.insert(0, torch.optim.Muon(matrices, lr=0.02, momentum=0.95, weight_decay=0.1))
        self.stats, self.collect_stats = {}, False

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


class _OpCounter(TorchDispatchMode):
    """Counts the ATen operations that do work (views launch nothing): on a GPU each is a kernel
    launch, some microseconds of host time that only overlapping with device work hides."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func is not torch.ops.aten._unsafe_view.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


class _Stopped(Exception):
    """A SIGTERM during the rounds (what ``timeout`` and job schedulers send)."""


@contextlib.contextmanager
def _sigterm_stops_the_rounds():
    """Turn SIGTERM into :class:`_Stopped`, so a bench cut short keeps the rounds it measured
    (on a lent GPU an unfinished table is worth more than none).  Main thread only: signal
    handlers cannot be set elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise _Stopped(f"stopped by signal {signum}")
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summarize_profile(events, top: int) -> dict:
    """The profiled events of one step: device kernels (and copies) where there are any, as
    torch's profiler table totals them, else CPU operations by their own time."""
    kernels = [e for e in events if e.device_type != DeviceType.CPU]
    timed, attr, of = ((kernels, "self_device_time_total", "device kernels") if kernels
                       else (list(events), "self_cpu_time_total", "cpu operations"))
    ranked = sorted(timed, key=lambda e: getattr(e, attr), reverse=True)
    return {"of": of, "calls": sum(e.count for e in timed), "total_ms": sum(getattr(e, attr) for e in timed) / 1e3,
            "top": [{"name": e.key[:160], "calls": e.count, "ms": getattr(e, attr) / 1e3} for e in ranked[:top]]}


@contextlib.contextmanager
def _profiled(device: torch.device, top: int, into: dict):
    """Profile what runs inside (one optimizer step) and put its summary in ``into``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
        synchronize(device)   # every kernel of the step ends inside the trace
    into.update(summarize_profile(prof.key_averages(), top))


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work, so a wall-clock timer measures it (a no-op on CPUs).
    The benchmark scripts time with it too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(preset: str = "tiny-cpu", *, allocations=ALLOCATIONS, modes=DIRECTION_MODES, rounds: int = 5,
              warmup: int = 2, overrides: dict[str, str] | None = None, progress: bool = True,
              profile_top: int = 0) -> dict:
    """Time every configuration side by side (interleaved rounds) and return the table as a
    dict (see the module docstring); :func:`format_bench` prints it, :func:`save_bench` saves it."""
    bad = [m for m in modes if m not in DIRECTION_MODES]
    if bad:
        raise ValueError(f"unknown direction mode(s) {bad}; valid choices: {', '.join(DIRECTION_MODES)}")
    if profile_top < 0:
        raise ValueError(f"profile_top (--profile) must be 0 (no profile) or more, got {profile_top}")
    bench = _Bench(make_config(preset, overrides or {}), allocations, modes, profile_top)
    graphs_before = counters["stats"]["unique_graphs"]
    compile_error = bench.compile_forward()
    stopped = bench.timed_rounds(warmup, rounds, progress)
    graphs = None
    if bench.cfg.compile and compile_error is None:   # more than the first model's graphs: some recompiled
        graphs = counters["stats"]["unique_graphs"] - graphs_before - bench.optimizer_graphs
    extras, extras_stopped = ({}, None) if stopped else bench.all_extras()
    rows = [bench.row(s, extras.get(s["label"], {})) for s in bench.setups if s["opt_ms"]]
    cfg, dev = bench.cfg, bench.dev
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or "cpu")
    return {"date": time.strftime("%Y-%m-%d"), "device": name, "device_type": dev.type, "torch": torch.__version__,
            "preset": preset, "overrides": dict(overrides or {}), "stopped": stopped, "extras_stopped": extras_stopped,
            "compiled": cfg.compile and compile_error is None, "compile_error": compile_error,
            "compiled_graphs": graphs, "compiled_optimizer": cfg.compile_optimizer,
            "optimizer_graphs": bench.optimizer_graphs,
            "optimizer_compile_errors": {s["label"]: s["opt"].compile_error for s in bench.setups
                                         if getattr(s["opt"], "compile_error", None)},
            "matmul_precision": cfg.matmul_precision,
            "tokens_per_step": cfg.batch_size * cfg.model.block_size, "rounds": len(bench.setups[0]["opt_ms"]),
            "rows": rows}


class _Bench:
    """The configurations of one bench, their shared batch, and the steps that time them."""

    def __init__(self, cfg, allocations, modes, profile_top: int):
        self.cfg, self.profile_top = cfg, profile_top
        self.dev = dev = cfg.torch_device()   # --device=cuda:1 picks the GPU
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda"
                         else torch.autocast("cpu", enabled=False))
        gen = torch.Generator().manual_seed(0)
        shape = (cfg.batch_size, cfg.model.block_size)
        self.x = torch.randint(cfg.model.vocab_size, shape, generator=gen).to(dev)
        self.y = torch.randint(cfg.model.vocab_size, shape, generator=gen).to(dev)
        self.setups = [self._setup(label, alloc, extra) for label, alloc, extra in
                       _configs(allocations, modes, cfg.compile_optimizer)]
        self.optimizer_graphs = 0   # compiled by the optimizer steps (compiled directions), not the forward

    def _setup(self, label: str, alloc: str, extra: dict) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = GPT(cfg.model).to(self.dev)
        steps = cfg.dual_steps_for(extra["mode"]) if "mode" in extra else None  # as in training
        if alloc in ("torch-muon", "torch-adamw-fused"):
            opt = _TorchOptimizers(model, muon=alloc == "torch-muon")
        else:
            opt = ManifoldMuon(resolve(model, alloc, dual_steps=steps, **cfg.numerics_options(), **extra))
        forward = torch.compile(model) if cfg.compile else model   # the optimizer keeps the plain names
        return {"label": label, "alloc": alloc, "model": model, "forward": forward, "opt": opt, "fb": [],
                "opt_ms": [], "compiled_optimizer": extra.get("compile", False)}

    def forward_backward(self, s) -> None:
        with self.autocast:
            _, loss = s["forward"](self.x, self.y)
        loss.backward()

    def one_step(self, s, timed: bool, around_optimizer=None) -> None:
        synchronize(self.dev)
        t0 = time.perf_counter()
        self.forward_backward(s)
        synchronize(self.dev)
        t1 = time.perf_counter()
        graphs = counters["stats"]["unique_graphs"]
        with around_optimizer or contextlib.nullcontext():
            s["opt"].step()
        self.optimizer_graphs += counters["stats"]["unique_graphs"] - graphs
        synchronize(self.dev)
        t2 = time.perf_counter()
        s["opt"].zero_grad(set_to_none=True)
        if timed:
            s["fb"].append((t1 - t0) * 1e3)
            s["opt_ms"].append((t2 - t1) * 1e3)

    def compile_forward(self) -> str | None:
        """Compile the forward once (the other models reuse its graph); on failure, why, and
        every configuration times the eager model instead."""
        if not self.cfg.compile:
            return None
        try:
            self.forward_backward(self.setups[0])
            self.setups[0]["opt"].zero_grad(set_to_none=True)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: time the eager model instead
            error = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"bench: torch.compile failed, timing the eager model ({error})", flush=True)
            for s in self.setups:
                s["forward"] = s["model"]
            return error
        return None

    def timed_rounds(self, warmup: int, rounds: int, progress: bool) -> str | None:
        """Interleaved rounds (drift in machine speed hits every configuration alike); a SIGTERM
        keeps what was measured and returns why it stopped."""
        with _sigterm_stops_the_rounds():
            try:
                for r in tqdm(range(warmup + rounds), desc="bench rounds", unit="round", disable=not progress):
                    for s in self.setups:
                        self.one_step(s, timed=r >= warmup)
            except _Stopped as e:
                print(f"bench: {e}; keeping the {len(self.setups[0]['fb'])} timed rounds measured", flush=True)
                return str(e)
        return None

    def extras(self, s) -> dict:
        """Untimed steps: one counts the optimizer's operations (a compiled direction runs fused
        kernels, not ATen operations, so it is not counted), one is profiled, one collects the
        quality statistics."""
        counter = None if s["compiled_optimizer"] else _OpCounter()
        self.one_step(s, timed=False, around_optimizer=counter)
        profile = {}
        if self.profile_top:
            try:
                self.one_step(s, timed=False, around_optimizer=_profiled(self.dev, self.profile_top, profile))
            except _Stopped:
                raise
            except Exception as e:  # noqa: BLE001 -- a failing profiler (no CUPTI, say) costs its column, not the table
                profile = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        s["opt"].collect_stats = True
        self.one_step(s, timed=False)
        return {"ops": counter.count if counter else None, "health": summarize_health(s["opt"].stats),
                "profile": profile or None}

    def all_extras(self) -> tuple[dict, str | None]:
        """Each measured configuration's extras; a SIGTERM keeps those done."""
        extras = {}
        with _sigterm_stops_the_rounds():
            try:
                for s in (s for s in self.setups if s["opt_ms"]):
                    extras[s["label"]] = self.extras(s)
            except _Stopped as e:
                print(f"bench: {e} after the extras of {len(extras)} configurations", flush=True)
                return extras, str(e)
        return extras, None

    def _rounds(self, s) -> list[float]:
        return [f + o for f, o in zip(s["fb"], s["opt_ms"])]

    def row(self, s, extra: dict) -> dict:
        """One configuration's medians, its ratios to our AdamW (the first) and to torch's fused
        AdamW round by round, and its direction quality."""
        base = self._rounds(self.setups[0])
        fused = self._rounds(next(x for x in self.setups if x["alloc"] == "torch-adamw-fused"))
        health, profile = extra.get("health", {}), extra.get("profile")
        managed = [h for h in health.values() if h["manifold"] != "none"]
        step, opt_ms = self._rounds(s), statistics.median(s["opt_ms"])
        return {"config": s["label"], "optimizer_ms": opt_ms, "step_ms": statistics.median(step),
                "step_ratio_vs_adamw": statistics.median(a / b for a, b in zip(step, base)),
                "step_ratio_vs_fused_adamw": statistics.median(a / b for a, b in zip(step, fused)) if fused else None,
                "optimizer_ops": extra.get("ops"), "profile": profile,
                "device_busy": (profile["total_ms"] / opt_ms
                                if profile and profile.get("of") == "device kernels" else None),
                "alignment": statistics.mean(h["alignment_mean"] for h in health.values()) if health else None,
                "violation_max": max((h["violation_end_max"] for h in managed), default=None),
                "compiled_alignment_gap_max": max((h["compiled_alignment_gap_max"] for h in health.values()
                                                   if "compiled_alignment_gap_max" in h), default=None),
                "by_group": {group: {"manifold": h["manifold"], "alignment": h["alignment_mean"],
                                     "alignment_repaired": h["alignment_repaired_mean"],
                                     "violation_max": h["violation_end_max"]} for group, h in health.items()}}


def format_bench(result: dict) -> str:
    forward = "compiled" if result.get("compiled") else "eager"
    head = (f"{result['preset']} on {result['device']} (torch {result['torch']}), {result['tokens_per_step']} tokens/step, "
            f"{forward} forward, float32 matmuls '{result.get('matmul_precision', 'highest')}', "
            f"median of {result['rounds']} interleaved rounds\n")
    if result.get("stopped"):
        head += f"cut short ({result['stopped']}): no operation counts or quality columns\n"
    elif result.get("extras_stopped"):
        head += f"cut short ({result['extras_stopped']}) after the rounds: some rows lack counts, profile and quality\n"
    cols = (f"{'config':36s} {'opt ms':>9s} {'opt ops':>8s} {'step ms':>9s} {'step/adamw':>11s} {'/fused':>7s} "
            f"{'align':>7s} {'viol max':>9s}\n")
    body = ""
    for r in result["rows"]:
        align = f"{r['alignment']:.3f}" if r["alignment"] is not None else "-"
        viol = f"{r['violation_max']:.1e}" if r["violation_max"] is not None else "-"
        ops = r.get("optimizer_ops")
        fused = r.get("step_ratio_vs_fused_adamw")
        fused = f"{fused:.3f}" if fused is not None else "-"
        body += (f"{r['config']:36s} {r['optimizer_ms']:9.1f} {ops if ops is not None else '-':>8} {r['step_ms']:9.1f} "
                 f"{r['step_ratio_vs_adamw']:11.3f} {fused:>7s} {align:>7s} {viol:>9s}\n")
    groups = ""  # the quality columns per matrix group, for the constrained configurations
    for r in result["rows"]:
        for group, q in sorted(r.get("by_group", {}).items()):
            if q["manifold"] != "none":
                groups += (f"{r['config']:36s} {group:10s} {q['manifold']:13s} {q['alignment']:7.3f} "
                           f"{q['alignment_repaired']:9.3f} {q['violation_max']:9.1e}\n")
    if groups:  # repaired: made tangent and rescaled to norm 1, the fair comparison for paper mode
        groups = (f"\n{'config':36s} {'group':10s} {'manifold':13s} {'align':>7s} {'repaired':>9s} "
                  f"{'viol max':>9s}\n" + groups)
    gaps = "".join(f"  {r['config']}: {r['compiled_alignment_gap_max']:.1e}\n" for r in result["rows"]
                   if r.get("compiled_alignment_gap_max") is not None)
    if gaps:  # rounding moves it by about 1e-3 or less; a miscompiled graph, by tenths
        gaps = "\ncompiled direction against eager, largest change of alignment over matrices:\n" + gaps
    return head + cols + body + groups + gaps + _format_profiles(result["rows"])


def _format_profiles(rows, shown: int = 5) -> str:
    """Each profiled configuration's total and costliest entries; on a GPU, with how much of the
    optimizer's wall time its kernels fill (low: launch-bound)."""
    text = ""
    for r in (r for r in rows if r.get("profile")):
        p = r["profile"]
        if "error" in p:
            text += f"  {r['config']}: the profiler failed ({p['error']})\n"
            continue
        busy = f" = {r['device_busy']:.0%} of its {r['optimizer_ms']:.1f} ms" if r.get("device_busy") is not None else ""
        text += f"  {r['config']}: {p['calls']} {p['of']}, {p['total_ms']:.2f} ms{busy}\n"
        text += "".join(f"    {t['ms']:9.3f} ms {t['calls']:6d}x  {t['name'][:100]}\n" for t in p["top"][:shown])
    return "\nprofile of one optimizer step (costliest first):\n" + text if text else ""


def write_result(result: dict, out_dir, name: str) -> Path:
    """``result`` as indented JSON in ``out_dir/name`` (the folder made if missing): how the bench
    and every script in ``benchmarks/`` save their numbers."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path


def save_bench(result: dict, out_dir="benchmarks/results") -> Path:
    tag = "" if result.get("matmul_precision", "highest") == "highest" else f"_{result['matmul_precision']}"
    tag += "_compiled-optimizer" if result.get("compiled_optimizer") else ""
    return write_result(result, out_dir, f"bench_{result['date']}_{result['preset']}{tag}_{result['device_type']}.json")
