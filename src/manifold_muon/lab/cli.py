"""``manifold-muon prepare | train | sweep | report | compare | bench | pack | results`` (also
``python -m manifold_muon``)."""
from __future__ import annotations

import argparse
import os
import sys

from ..optim.allocation import PAPER_ALLOCATIONS, PRESETS

def _train_epilog() -> str:
    """The override help, listing the config's own fields so that it cannot go stale."""
    import dataclasses
    import textwrap

    from .config import TrainConfig
    from .model import ModelConfig
    skipped = {"model", "preset", "allocation", "inject_nonfinite_at", "fail_at_iter"}  # options / test hooks
    model = " ".join(f.name for f in dataclasses.fields(ModelConfig))
    train = " ".join(f.name for f in dataclasses.fields(TrainConfig) if f.name not in skipped)
    return f"""
Overrides are --key=value (or --key value) for any config field; a bare --flag sets a
true/false field to true. E.g.
  manifold-muon train --preset tiny-cpu --allocation hetero --max_iters=300 --n_layer=4 --mode=fast
{textwrap.fill("Model fields: " + model + ".", 95)}
{textwrap.fill("Training fields: " + train + ".", 95)}
A run directory that holds ckpt.pt is resumed, if its settings are the ones asked for (a
larger max_iters extends it); a finished run is not trained again; --restart starts anew.
Under torchrun the same command trains on every rank (DDP; nccl on GPUs, gloo on CPUs).
"""


PRESET_HELP = ("gpt2-small (the paper: 124M, 65k tokens/step, 50k steps), gpt2-reduced (6 layers, d=384, one "
               "epoch of data/local-corpus on a GPU), cpu-small (4 layers, d=64, on data/local-corpus, sized for a "
               "CPU) or tiny-cpu (default; the demo's)")


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """``--key=value`` or ``--key value``; a bare ``--flag`` means ``--flag=true``, as argparse's
    own flags do (a non-boolean key given no value is refused by the config's typing)."""
    out, i = {}, 0
    while i < len(extra):
        item = extra[i]
        if not item.startswith("--") or item == "--":
            raise SystemExit(f"error: expected --key=value, got {item!r}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
            i += 1
        elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            key, value = item[2:], extra[i + 1]
            i += 2
        else:
            key, value = item[2:], "true"
            i += 1
        out[key.replace("-", "_")] = value
    return out


def _prepare(args) -> None:
    from . import prepare
    if args.corpus == "shakespeare":
        meta = prepare.prepare_shakespeare(args.out or "data/shakespeare", val_fraction=args.val_fraction or 0.05,
                                           quiet=args.quiet)
    elif args.corpus == "text":
        if not args.files:
            raise SystemExit("error: `prepare text` needs FILE_OR_GLOB arguments")
        meta = prepare.prepare_text_files(args.files, args.out or "data/text", val_fraction=args.val_fraction or 0.05,
                                          quiet=args.quiet, decode_errors=args.decode_errors)
    else:
        meta = prepare.prepare_hf_dataset(args.dataset, args.out or "data/openwebtext",
                                          val_fraction=args.val_fraction or 0.0005, quiet=args.quiet)
    print(f"train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens ({meta['split']})")


def _train(args, extra) -> None:
    from .config import make_config
    from .train import train
    overrides = _split_overrides(extra)
    overrides.setdefault("allocation", args.allocation)
    cfg = make_config(args.preset, overrides)   # refuses, by name, an allocation, mode or value no run can use
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(f"run folder: {cfg.run_dir()}", flush=True)
    _set_cpu_threads(cfg, args.threads, quiet=cfg.quiet or not main_rank)
    summary = train(cfg, restart=args.restart)
    if summary.get("already_finished"):
        print(f"already finished: {summary['iters']} iterations, final val loss {summary['final_val_loss']}; "
              "pass --restart to train it anew, or a larger --max_iters to extend it")
    elif main_rank:
        print(f"{summary['status']}: {summary['iters']} iterations, final val loss {summary['final_val_loss']}, "
              f"run folder {cfg.run_dir()}")


def _set_cpu_threads(cfg, threads: int | None, *, quiet: bool) -> None:
    """On a CPU, give this process its share of the cores: ``--threads``, else OMP_NUM_THREADS
    (as sweeps set it for their runs), else the cores divided among the processes torchrun
    started on this machine.  Two processes each using every core slow each other several
    times over."""
    import torch
    if cfg.torch_device().type != "cpu":
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    chosen = threads or int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(chosen)
    if not quiet:
        print(f"CPU threads: {chosen} (--threads to change)", flush=True)


def _csv(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x]


def _sweep(args, extra) -> None:
    from .sweep import run_sweep
    out = args.out or f"runs/sweep-{args.preset}"
    modes = _csv(args.modes) if args.modes else None
    # run_sweep makes every run's config, refusing an unknown allocation or mode by name, before any runs
    results = run_sweep(args.preset, _csv(args.allocations), _csv(args.seeds, int), out, overrides=_split_overrides(extra),
                        modes=modes, jobs=args.jobs, quiet=args.quiet)
    stable = sum(r["stable"] for r in results)
    print(f"{len(results)} runs, {stable} stable; results: {out}/results.jsonl (`manifold-muon report {out}` for Table 1)")


def _report(args) -> None:
    from .report import build_report
    path = build_report(args.dir)
    print((path.parent / "table1.md").read_text())
    print(f"report: {path}")


def _compare(args) -> None:
    from .compare import build_comparison
    path = build_comparison(args.dirs, args.out, _csv(args.allocations) or None)
    print(path.read_text())
    print(f"comparison: {path}")


def _pack(args) -> None:
    from .sweep import pack_finished_runs
    for path in args.dirs:
        done = pack_finished_runs(path, spectral_summary=args.spectral_summary)
        mib = 1 << 20
        print(f"{path}: {len(done['packed'])} runs packed, {done['bytes_before'] / mib:.1f} MiB -> "
              f"{done['bytes_after'] / mib:.1f} MiB of logs"
              + ("; their spectra summarized" if args.spectral_summary else "")
              + (f"; unfinished, left as they are: {', '.join(done['unfinished'])}" if done["unfinished"] else ""))


def _results(args) -> None:
    from .archive import list_studies, read_manifest, restore_study
    if args.action == "list":
        for study in list_studies():
            manifest = read_manifest(study)
            print(f"{study}: {len(manifest['files'])} raw files at commit {manifest['commit'][:12]}")
        return
    for study in args.studies or list_studies():
        manifest = restore_study(study)
        print(f"results/{study}: {len(manifest['files'])} files restored from {manifest['commit'][:12]}, sha256 checked")


def _bench(args, extra) -> None:
    from .bench import format_bench, run_bench, save_bench
    result = run_bench(args.preset, allocations=_csv(args.allocations), modes=_csv(args.modes), rounds=args.rounds,
                       overrides=_split_overrides(extra), profile_top=args.profile)
    path = save_bench(result, args.out)
    print(format_bench(result))
    print(f"saved: {path}")
    if result["stopped"]:   # saved, but cut short: exit as timeout(1) reports a timed-out command
        raise SystemExit(124)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="manifold-muon", description="Muon and Manifold Muon with module-wise manifolds.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize a corpus into train.bin/val.bin (GPT-2 BPE, offline)",
                       description="Write nanoGPT-compatible train.bin/val.bin and meta.json.")
    p.add_argument("corpus", choices=["shakespeare", "text", "openwebtext"],
                   help="shakespeare: the embedded corpus; text: your files; openwebtext: HF datasets (online)")
    p.add_argument("files", nargs="*", help="for `text`: files or globs (each file is one document)")
    p.add_argument("--out", help="output folder (default data/<corpus>)")
    p.add_argument("--val-fraction", type=float, help="share of documents held out (default 0.05; openwebtext 0.0005)")
    p.add_argument("--dataset", default="Skylion007/openwebtext", help="for `openwebtext`: the HF dataset name")
    p.add_argument("--decode-errors", choices=["strict", "replace"], default="strict",
                   help="for `text`: refuse files that are not valid UTF-8 (strict, default) or replace their bad "
                        "bytes with U+FFFD")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    t = sub.add_parser("train", help="train one run (resumes a run dir that holds ckpt.pt)", epilog=_train_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train GPT-2 (or the Llama variant) with one allocation.")
    t.add_argument("--preset", default="tiny-cpu", help="config preset: " + PRESET_HELP)
    t.add_argument("--allocation", default="hetero", help="allocation preset: " + ", ".join(PRESETS))
    t.add_argument("--restart", action="store_true",
                   help="start anew: move an existing run folder aside (to <name>.oldN) instead of resuming it "
                        "(a resume under other settings is refused; a finished run is not trained again)")
    t.add_argument("--threads", type=int, help="CPU threads for this run (default: OMP_NUM_THREADS, else the "
                                                "cores divided among this machine's torchrun processes)")
    w = sub.add_parser("sweep", help="run allocations x seeds with everything else identical (resumable)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Run every allocation x seed; a killed sweep, run again, skips finished runs "
                                   "and resumes the others from their checkpoints. Extra --key=value (or --key value) "
                                   "are config overrides applied to every run, e.g. --muon_lr=0.16.")
    w.add_argument("--preset", default="tiny-cpu", help="config preset: " + PRESET_HELP)
    w.add_argument("--allocations", default=",".join(PAPER_ALLOCATIONS),
                   help="comma-separated allocation presets (default: the paper's five), from: " + ", ".join(PRESETS))
    w.add_argument("--seeds", default="1", help="comma-separated seeds (default 1)")
    w.add_argument("--modes", help="direction-solver modes to compare, e.g. paper,improved: every allocation x seed "
                                   "runs once per mode, in <allocation>-<mode>-s<seed>/ (default: the preset's "
                                   "mode, improved, in <allocation>-s<seed>/)")
    w.add_argument("--out", help="sweep directory (default runs/sweep-<preset>)")
    w.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (default 1), CPU threads split between them; with GPUs at least one per "
                        "GPU, more share them round-robin (e.g. --jobs 4 on one GPU: 4 small runs side by side)")
    w.add_argument("--quiet", action="store_true", help="no progress bar")
    r = sub.add_parser("report", help="Table 1, figures and report.md from a sweep directory",
                       description="Write DIR/report/{report.md,table1.md,table1.csv,fig*.png}.")
    r.add_argument("dir", help="a sweep directory (holds <allocation>-s<seed>/ runs)")
    c = sub.add_parser("compare", help="sweeps that differ in one setting (e.g. muon_lr), side by side",
                       description="Per allocation and mode, each sweep's final val loss, verdict and mechanism "
                                   "peaks (attention sigma_max, logit, entropy), with the settings that differ "
                                   "between the sweeps named. Writes OUT/{compare.md,compare.csv,fig_compare.png}.")
    c.add_argument("dirs", nargs="+", help="two or more sweep directories, in the order to show them")
    c.add_argument("--out", required=True, help="folder for the comparison")
    c.add_argument("--allocations", default="", help="comma-separated allocations to show (default: every "
                   "allocation of any sweep), e.g. all-dgram-wd,hetero-wd when one sweep holds far more than another")
    b = sub.add_parser("bench", help="optimizer and whole-step time of AdamW, torch Muon, our Muon and Manifold Muon",
                       description="Time every optimizer configuration side by side (interleaved rounds) on the "
                                   "present device; print a table with ratios to AdamW and direction quality, "
                                   "and save it as JSON. Extra --key=value are config overrides, e.g. --compile "
                                   "(torch.compile the forward, as the paper), --compile_optimizer (add a twin "
                                   "of our Muon and of each fast-mode row whose direction is torch.compiled; the "
                                   "first steps compile, some seconds per matrix shape) or --matmul_precision=high "
                                   "(TF32 for the optimizer's float32 matmuls on GPUs).")
    b.add_argument("--preset", default="tiny-cpu", help="config preset (gpt2-small on a GPU is the paper's model)")
    b.add_argument("--allocations", default=",".join(PAPER_ALLOCATIONS),
                   help="comma-separated allocation presets to time (default: the paper's five), from: "
                        + ", ".join(PRESETS))
    b.add_argument("--modes", default="paper,fast,improved",
                   help="Manifold Muon solver modes to time per allocation (improved is slow at GPT-2 scale)")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds after 2 warm-up rounds (default 5)")
    b.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one more optimizer step of each configuration (torch.profiler) and keep its N "
                        "costliest kernels on a GPU, with how much of the step's wall time the kernels fill "
                        "(low: launch-bound), or operations on a CPU (default 0: no profile)")
    b.add_argument("--out", default="benchmarks/results", help="where the JSON goes")
    k = sub.add_parser("pack", help="xz-compress finished runs' bulky logs in place (for committing results)",
                       description="Compress spectral.bin (or its summary), metrics.jsonl and diagnostics.jsonl of every finished "
                                   "run in each sweep directory (or of a run directory) to .xz, in place. report, "
                                   "compare and the analysis read packed runs as they are; training a packed run "
                                   "again unpacks it first. Unfinished runs are left alone. JSONL logs written before logs kept "
                                   "floats at float32 precision are brought to it, packed ones too.")
    k.add_argument("dirs", nargs="+", help="sweep or run directories")
    k.add_argument("--spectral-summary", action="store_true",
                   help="also replace each run's full spectra (every singular value of every matrix at every "
                        "record) by a summary: the largest, quartile and smallest singular values and Gram "
                        "diagonal entries. Lossy, and what the reports need (they plot sigma_max, kept exact); "
                        "for committed results, whose full spectra stay in git history. A summarized run cannot "
                        "be trained further")
    a = sub.add_parser("results", help="list the committed studies, or bring back their raw runs from git history",
                       description="The studies of docs/results keep their raw runs (logs, spectra, diagnostics) in "
                                   "git history. `restore` checks them out into results/<study> from the commit "
                                   "the study's manifest names and verifies every sha256; then `report` and "
                                   "`compare` rebuild the study's pages.")
    a.add_argument("action", choices=["list", "restore"])
    a.add_argument("studies", nargs="*", help="for restore: study names (default: all)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    with_overrides = {"train": _train, "sweep": _sweep, "bench": _bench}
    if extra and args.command not in with_overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command in with_overrides:
            with_overrides[args.command](args, extra)
        else:
            {"prepare": _prepare, "report": _report, "compare": _compare, "pack": _pack,
             "results": _results}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
