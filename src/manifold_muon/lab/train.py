"""One training loop for CPU, one GPU and torchrun (DDP), the paper's recipe.

Under ``torchrun`` every rank draws the same global batch offsets and trains on its own rows;
DDP averages gradients, so N processes take the step one process takes on the same global
batch.  There is no separate single-device path: one process is world size 1.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .config import TrainConfig, config_to_dict
from .data import BatchSampler, TokenData
from .diagnostics import MAX_RECORDS, SpectralRecorder, attention_mechanics, module_group, summarize_health
from .model import GPT
from ..optim import ManifoldMuon, format_allocation, resolve, save_allocation
from .checkpoints import load_checkpoint, save_checkpoint
from .resume import RunMismatch, check_resumable, finished_summary, move_aside
from .runio import JsonlLog, environment, read_jsonl, unpack_run, write_json

__all__ = ["train", "lr_factor", "PEAK_FLOPS", "check_resumable", "RunMismatch", "finished_summary"]

EVAL_SEED = 1_000_003  # the fixed evaluation set (see Trainer.evaluate)

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; other devices report MFU as null.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def lr_factor(it: int, cfg: TrainConfig) -> float:
    """nanoGPT's schedule as a fraction of the peak: linear warmup, cosine to min_lr/adamw_lr.
    Muon shares it (``muon_lr(t) = muon_lr * factor(t)``), as the paper's reference code."""
    floor = cfg.min_lr / cfg.adamw_lr
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return floor
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1 - floor)


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))) if world > 1 else (0, 1, 0)


def _mean_across_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    """The allocation's groups with the run's learning rates and decay; ``base_lr`` is the peak."""
    groups = resolve(model, cfg.allocation, mode=cfg.mode, momentum=cfg.muon_momentum,
                     dual_steps=cfg.dual_steps_for(cfg.mode), compile=cfg.compile_optimizer,
                     **cfg.numerics_options())
    for g in groups:
        g["base_lr"] = g["lr"] = cfg.muon_lr if g["algorithm"] == "muon" else cfg.adamw_lr
        g["weight_decay"] = cfg.decay_for(g["algorithm"]) if g.get("weight_decay", 0) > 0 else 0.0
    return groups


class Trainer:
    """Holds what a step needs; ``run()`` is the loop.  Built by :func:`train`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.world, local_rank = _distributed()
        self.device = cfg.torch_device(local_rank)
        self.main = self.rank == 0
        self.dir = Path(cfg.run_dir())
        torch.manual_seed(cfg.seed)  # identical init on every rank
        self.model = GPT(cfg.model).to(self.device)
        self.data = TokenData.load(cfg.data_dir, block_size=cfg.model.block_size, vocab_size=cfg.model.vocab_size)
        self.groups = _param_groups(self.model, cfg)
        self.opt = ManifoldMuon(self.groups)
        self.net = self.model
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.sampler = BatchSampler(self.data, block_size=cfg.model.block_size, seed=cfg.seed)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.start_iter, self.best_val, self.nonfinite_streak = 0, float("inf"), 0
        self.resumed = self._maybe_resume()
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else ""
        self.peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)

    # ---- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self, it: int) -> None:
        if not self.main:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint({"iter": it, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                     "sampler": self.sampler.state_dict(), "rng": rng, "best_val": self.best_val,
                     "nonfinite_streak": self.nonfinite_streak, "config": config_to_dict(self.cfg)},
                        self.dir / "ckpt.pt")

    def _maybe_resume(self) -> bool:
        path = self.dir / "ckpt.pt"
        if not path.is_file():
            return False
        # Loaded to CPU: the sampler's generator and the RNG states must stay CPU tensors; the
        # model's and the optimizer's load_state_dict move their tensors to the parameters' device.
        ckpt = load_checkpoint(path)   # refuses, naming the file, one that is empty or corrupt
        check_resumable(ckpt.get("config"), config_to_dict(self.cfg), path)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.start_iter, self.best_val = ckpt["iter"], ckpt["best_val"]
        self.nonfinite_streak = ckpt["nonfinite_streak"]
        return True

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, it: int) -> dict:
        """Mean loss over ``eval_iters`` batches per split, and the validation loss of each batch.
        The batches are a fixed set, the same at every evaluation of every run (whatever its
        seed), drawn from their own generator: curves
        and runs then differ by the model alone, not by which tokens were scored (random batches
        per evaluation made a 4k-token val loss jump by 0.2 nats), and evaluation never consumes
        or depends on the training stream."""
        self.net.eval()
        out = {"iter": it}
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(EVAL_SEED)
            losses = []
            for _ in range(self.cfg.eval_iters):
                offsets = self.sampler.global_offsets(split, self.cfg.batch_size * self.world, gen)
                x, y = self.sampler.windows(split, offsets[self.rank:: self.world])
                with self.autocast:
                    _, loss = self.net(x.to(self.device), y.to(self.device))
                losses.append(loss.float())
            per_batch = _mean_across_ranks(torch.stack(losses), self.world)
            out[f"{split}_loss"] = per_batch.mean().item()
            if split == "val":   # the fixed subset's own sampling noise, which seeds do not show
                out["val_batch_losses"] = per_batch.tolist()
        out["val_ppl"] = math.exp(min(out["val_loss"], 50.0))
        self.net.train()
        return out

    # ---- one optimizer step ------------------------------------------------------------------------
    def step(self, it: int, collect: bool = False) -> dict:
        """Forward/backward over the micro-batches, then clip and step, unless non-finite.
        ``collect``: also measure gradient norms per module group and the optimizer's health."""
        cfg, world = self.cfg, self.world
        offsets = self.sampler.global_offsets("train", cfg.batch_size * cfg.grad_accum * world)
        mine = offsets.view(cfg.grad_accum, world, cfg.batch_size)[:, self.rank]
        factor = lr_factor(it, cfg)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, y = self.sampler.windows("train", mine[micro])
            sync = micro == cfg.grad_accum - 1 or world == 1
            with (contextlib.nullcontext() if sync else self.net.no_sync()), self.autocast:
                _, loss = self.net(x.to(self.device), y.to(self.device))
            if it in cfg.inject_nonfinite_at:
                loss = loss * float("nan")
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss = _mean_across_ranks(loss_sum / cfg.grad_accum, world)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        extra = {}
        if collect:
            sq: dict[str, torch.Tensor] = {}
            for name, p in self.model.named_parameters():
                if p.grad is not None:
                    sq[module_group(name)] = sq.get(module_group(name), 0.0) + p.grad.float().pow(2).sum()
            norms = torch.stack(list(sq.values())).sqrt().tolist()   # one device sync, not one per parameter
            extra["group_grad_norm"] = dict(zip(sq, norms))
            self.opt.collect_stats = True
        if finite:
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.grad_clip, grad_norm)
            self.opt.step()
            self.nonfinite_streak = 0
        else:  # skip: weights and optimizer state stay as they were
            self.nonfinite_streak += 1
        self.opt.zero_grad(set_to_none=True)
        if collect:
            self.opt.collect_stats = False
            extra["health"] = summarize_health(self.opt.stats) if finite else {}
        lrs = {g["algorithm"]: g["lr"] for g in self.opt.param_groups}
        return {"iter": it, "loss": loss.item(), "grad_norm": grad_norm.item(), "skipped": not finite,
                "lr_adamw": lrs.get("adamw"), "lr_muon": lrs.get("muon"), **extra}

    # ---- diagnostics -------------------------------------------------------------------------------
    def _managed(self) -> dict[str, torch.Tensor]:
        return {n: p for g in self.opt.param_groups if g["algorithm"] == "muon" for n, p in zip(g["names"], g["params"])}

    def _mechanics_batch(self) -> torch.Tensor:
        """A fixed validation batch (same for every run of a seed), so mechanism curves compare."""
        gen = torch.Generator().manual_seed(self.cfg.seed + 7)
        offsets = self.sampler.global_offsets("val", min(4, self.cfg.batch_size), gen)
        return self.sampler.windows("val", offsets)[0].to(self.device)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``max_iters`` (or until too many non-finite steps in a row), writing the run
        folder as it goes: evaluations, checkpoints, spectra and diagnostics at their intervals."""
        self._write_run_files()
        logs = _RunLogs.open(self)
        status, it = "completed", self.start_iter
        started = time.time()
        try:
            while True:
                self._at_boundary(it, logs)
                if it >= self.cfg.max_iters:
                    break
                if it == self.cfg.fail_at_iter:
                    raise RuntimeError(f"injected failure at iteration {it} (fail_at_iter)")
                row = self._timed_step(it, logs)
                it += 1
                if row["skipped"] and self._too_many_nonfinite(row, logs):
                    status = "early_termination"
                    self._checkpoint(it)
                    break
        finally:
            logs.close()
        summary = self._summary(status, it, time.time() - started)
        if self.main:
            write_json(self.dir / "summary.json", summary)
        return summary

    def _write_run_files(self) -> None:
        """The run's configuration, environment and allocation, written before the first step."""
        if not self.main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):   # a killed writer's temporary: its target is whole
            stale.unlink(missing_ok=True)
        unpack_run(self.dir)   # a packed run trained again appends to plain logs
        write_json(self.dir / "config.json", config_to_dict(self.cfg))
        # which corpus: the token files' checksums from its meta.json (a rebuilt corpus differs)
        write_json(self.dir / "env.json", {**environment(self.device, self.world),
                                           "data_sha256": self.data.meta.get("sha256")})
        save_allocation(self.groups, self.dir / "allocation.json")
        if not self.cfg.quiet and not self.resumed:
            print(f"model: {self.model.num_params() / 1e6:.2f}M parameters ({self.cfg.model.arch}, tied embedding)")
            print(format_allocation(self.groups))

    def _at_boundary(self, it: int, logs: "_RunLogs") -> None:
        """Before step ``it``: evaluate, checkpoint and record spectra where their intervals fall
        (and at the end), never twice for the iteration a resumed run starts at."""
        cfg, last = self.cfg, it == self.cfg.max_iters
        if (it % cfg.eval_interval == 0 or last) and not (self.resumed and it == self.start_iter):
            row = self.evaluate(it)
            self.best_val = min(self.best_val, row["val_loss"])
            logs.evals.write(row)
            if logs.board:
                logs.board.add_scalars("loss", {"train": row["train_loss"], "val": row["val_loss"]}, it)
        if it > self.start_iter and (it % (cfg.ckpt_interval or cfg.eval_interval) == 0 or last):
            self._checkpoint(it)
        if logs.spectra and (it % logs.spectral_every == 0 or last):
            logs.spectra.record(it, logs.managed)

    def _timed_step(self, it: int, logs: "_RunLogs") -> dict:
        """One optimizer step with its timing, throughput and, every ``diag_every`` steps, the
        diagnostics; logged, and shown on the progress bar."""
        collect = it % logs.diag_every == 0
        mechanics = attention_mechanics(self.model, logs.mech_batch) if collect and self.main else None
        t0 = time.perf_counter()
        row = self.step(it, collect=collect)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        tokens = logs.tokens_per_step
        row.update(step_ms=dt * 1e3, tokens_per_s=tokens / dt,
                   mfu=logs.flops_per_token * tokens / dt / (self.peak * self.world) if self.peak else None)
        if collect:
            logs.diags.write({"iter": it, "mechanics": mechanics, "grad_norm": row.pop("group_grad_norm"),
                              "health": row.pop("health")})
        logs.metrics.write(row)
        if logs.board:
            logs.board.add_scalar("train/loss", row["loss"], it)
        logs.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False)
        logs.bar.update()
        return row

    def _too_many_nonfinite(self, row: dict, logs: "_RunLogs") -> bool:
        """Log a skipped non-finite step; whether the streak reached ``max_nonfinite``."""
        logs.events.write({"iter": row["iter"], "event": "nonfinite", "loss": row["loss"],
                           "grad_norm": row["grad_norm"], "streak": self.nonfinite_streak})
        return self.nonfinite_streak >= self.cfg.max_nonfinite

    def _summary(self, status: str, it: int, seconds: float) -> dict:
        evals = read_jsonl(self.dir / "eval.jsonl") if self.main else []
        return {"status": status, "iters": it, "max_iters": self.cfg.max_iters, "seconds": seconds,
                "final_val_loss": evals[-1]["val_loss"] if evals else None,
                "best_val_loss": min((e["val_loss"] for e in evals), default=None),
                "allocation": self.cfg.allocation, "mode": self.cfg.mode, "seed": self.cfg.seed,
                # what decides how many runs share one GPU (sweep --jobs); of this process's part of the run
                "peak_gpu_gib": (torch.cuda.max_memory_allocated(self.device) / 2**30
                                 if self.device.type == "cuda" else None)}


@dataclass
class _RunLogs:
    """The open logs, recorders and per-run constants of one ``Trainer.run``."""

    metrics: JsonlLog
    evals: JsonlLog
    events: JsonlLog
    diags: JsonlLog
    board: object | None
    spectra: SpectralRecorder | None
    managed: dict
    bar: tqdm
    mech_batch: torch.Tensor
    diag_every: int
    spectral_every: int
    tokens_per_step: int
    flops_per_token: float

    @classmethod
    def open(cls, trainer: "Trainer") -> "_RunLogs":
        cfg, main = trainer.cfg, trainer.main
        keep = trainer.start_iter if trainer.resumed else 0

        def log(name, keep_below):
            return JsonlLog(trainer.dir / name, keep_below_iter=keep_below, enabled=main)

        managed = trainer._managed()  # live parameter references: one dict serves the whole run
        spectra = SpectralRecorder(trainer.dir, managed) if main and managed else None
        if spectra and trainer.resumed:
            spectra.truncate(keep)
        diag_every = cfg.diag_interval or cfg.eval_interval
        return cls(metrics=log("metrics.jsonl", keep), evals=log("eval.jsonl", keep + 1 if trainer.resumed else 0),
                   events=log("events.jsonl", keep), diags=log("diagnostics.jsonl", keep),
                   board=_tensorboard(trainer.dir) if cfg.tensorboard and main else None,
                   spectra=spectra, managed=managed,
                   bar=tqdm(total=cfg.max_iters, initial=trainer.start_iter, desc=f"{cfg.allocation}", unit="it",
                            disable=cfg.quiet or not main),
                   mech_batch=trainer._mechanics_batch(), diag_every=diag_every,
                   spectral_every=max(diag_every, math.ceil(cfg.max_iters / MAX_RECORDS)),
                   tokens_per_step=cfg.batch_size * cfg.grad_accum * trainer.world * cfg.model.block_size,
                   flops_per_token=trainer.model.flops_per_token())

    def close(self) -> None:
        self.bar.close()
        for log in (self.metrics, self.evals, self.events, self.diags):
            log.close()
        if self.board:
            self.board.close()


def _remove_if_empty_of_results(run_dir: Path, fresh: bool) -> None:
    """A run this call created that failed before its first checkpoint leaves no folder: it
    holds nothing to resume or report (a batch that does not fit, say)."""
    if fresh and run_dir.is_dir() and not (run_dir / "ckpt.pt").exists() and _distributed()[0] == 0:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RuntimeError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def train(cfg: TrainConfig, *, restart: bool = False) -> dict:
    """Train (or resume, if the run directory holds a checkpoint) and return the summary.

    ``restart``: move an existing run folder aside (to ``<name>.old<N>``) and start anew.  A run
    that already reached ``max_iters`` is not trained again: its summary is returned, with
    ``already_finished`` set."""
    run_dir = Path(cfg.run_dir())
    if restart and _distributed()[0] == 0:
        moved = move_aside(run_dir)
        if moved and not cfg.quiet:
            print(f"the previous run in {run_dir} was moved to {moved}")
    elif (done := finished_summary(cfg)) is not None:
        return {**done, "already_finished": True}
    fresh = not run_dir.exists()
    try:
        trainer = Trainer(cfg)
        summary = trainer.run()  # on an exception torchrun stops the other ranks; no barrier then
    except Exception:
        _remove_if_empty_of_results(run_dir, fresh)
        raise
    if trainer.world > 1 and dist.is_initialized():
        # Leave together: a rank that exits while a peer still talks to it makes gloo abort
        # the peer (seen as an intermittent SIGABRT at the end of CPU DDP runs).
        dist.barrier()
        # Free DDP (its Reducer) while the default group still holds the process group.  Were
        # the Reducer its last holder, gloo's destructor would join its worker threads with the
        # GIL held while one needs the GIL to free a tensor: the rank hangs at exit (seen in a
        # CPU DDP test under load, and reproduced; pytorch/pytorch#56297).
        # destroy_process_group drops it with the GIL released.
        del trainer
        gc.collect()
        dist.destroy_process_group()
    return summary
