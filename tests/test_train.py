"""The training loop: resume equivalence, crash safety, non-finite steps, DDP vs one process."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from manifold_muon.lab.config import apply_overrides, make_config
from manifold_muon.lab.model import GPT, ModelConfig
from manifold_muon.optim import PAPER_ALLOCATIONS, resolve
from manifold_muon.lab.checkpoints import load_checkpoint, save_checkpoint
from manifold_muon.lab.runio import read_jsonl
from manifold_muon.lab.train import Trainer, train
from conftest import VOCAB, free_port




def tiny(data_dir, out_dir, **overrides):
    base = {"data_dir": str(data_dir), "out_dir": str(out_dir), "vocab_size": str(VOCAB), "n_embd": "32",
            "n_head": "2", "n_layer": "2", "block_size": "16", "batch_size": "4", "max_iters": "12",
            "warmup_iters": "2", "lr_decay_iters": "12", "eval_interval": "4", "eval_iters": "2", "quiet": "true",
            "dual_steps": "8"}
    base.update({k: str(v) for k, v in overrides.items()})
    return make_config("tiny-cpu", base)


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_gpt2_small_is_124m_and_presets_resolve_on_both_architectures():
    assert round(GPT(ModelConfig()).num_params() / 1e6) == 124
    for arch in ("gpt2", "llama"):
        model = GPT(ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB))
        for alloc in PAPER_ALLOCATIONS:
            groups = resolve(model, alloc)
            assert {g["manifold"] for g in groups if g["algorithm"] == "muon"} >= ({"none"} if alloc == "unconstrained" else {"stiefel"} if "stiefel" in alloc else {"dgram"})


def test_run_writes_its_directory_and_learns(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path / "run", max_iters=60, eval_interval=30, adamw_lr=0.02, min_lr=0.002))
    run = tmp_path / "run"
    for name in ("config.json", "env.json", "allocation.json", "metrics.jsonl", "eval.jsonl", "ckpt.pt", "summary.json"):
        assert (run / name).is_file(), name
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3
    row = read_jsonl(run / "metrics.jsonl")[-1]
    assert {"loss", "lr_adamw", "lr_muon", "step_ms", "tokens_per_s", "mfu", "grad_norm"} <= set(row)
    assert row["lr_muon"] / row["lr_adamw"] == pytest.approx(0.02 / 0.02)
    env = json.loads((run / "env.json").read_text())
    assert summary["status"] == "completed" and env["torch"] == torch.__version__
    assert summary["peak_gpu_gib"] is None  # a CPU run; on a GPU the sweep sizes --jobs by it
    assert env["data_sha256"] == json.loads((data_dir / "meta.json").read_text())["sha256"]   # which corpus
    # per-group gradient norms on diagnostic steps add up (in squares) to the step's global norm
    total = {r["iter"]: r["grad_norm"] for r in read_jsonl(run / "metrics.jsonl")}
    diags = [d for d in read_jsonl(run / "diagnostics.jsonl") if d.get("grad_norm")]
    assert diags and {"attention", "mlp"} <= set(diags[0]["grad_norm"])
    for d in diags:
        assert sum(v * v for v in d["grad_norm"].values()) ** 0.5 == pytest.approx(total[d["iter"]], rel=1e-4)


def test_killed_run_resumes_with_bitwise_identical_losses(data_dir, tmp_path):
    train(tiny(data_dir, tmp_path / "straight"))
    with pytest.raises(RuntimeError, match="injected failure"):
        train(tiny(data_dir, tmp_path / "crashy", fail_at_iter=7))  # last checkpoint: iteration 4
    assert len(losses(tmp_path / "crashy")) == 7
    train(tiny(data_dir, tmp_path / "crashy"))
    assert losses(tmp_path / "crashy") == losses(tmp_path / "straight")
    assert read_jsonl(tmp_path / "crashy" / "eval.jsonl") == read_jsonl(tmp_path / "straight" / "eval.jsonl")


def test_crash_mid_checkpoint_write_leaves_the_last_good_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"iter": 4}, path)

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iter": 8}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"iter": 4} and not list(tmp_path.glob("*.tmp"))


def test_nonfinite_step_changes_nothing_and_is_logged(data_dir, tmp_path):
    cfg = tiny(data_dir, tmp_path / "nan", inject_nonfinite_at="3")
    trainer = Trainer(cfg)
    for it in range(3):
        trainer.step(it)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    opt_state = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in trainer.opt.state.items()}
    row = trainer.step(3)
    assert row["skipped"] and not np.isfinite(row["loss"])
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, s in trainer.opt.state.items():
        for n, t in opt_state[k].items():
            assert torch.equal(s[n], t)
    assert all(p.grad is None for p in trainer.model.parameters())
    summary = train(cfg)  # resumes nothing (no checkpoint yet): a full run with one skipped step
    assert summary["status"] == "completed"
    assert [e["iter"] for e in read_jsonl(tmp_path / "nan" / "events.jsonl")] == [3]


def test_consecutive_nonfinite_steps_stop_the_run_as_early_termination(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path / "dead", inject_nonfinite_at="5,6,7,8", max_nonfinite=3))
    assert summary["status"] == "early_termination" and summary["iters"] == 8
    saved = json.loads((tmp_path / "dead" / "summary.json").read_text())
    assert saved["status"] == "early_termination"


@pytest.mark.parametrize("allocation,weight_rtol", [("unconstrained", 1e-4), ("hetero", 1e-2)])
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(data_dir, tmp_path, allocation, weight_rtol):
    # Unconstrained Muon + AdamW is a fixed computation: DDP must match to float rounding (in
    # float32: a bf16 msign would turn rounding-level gradient differences into 4e-3 ones).
    # Under hetero the dual solver's line search branches on rounding-level differences in the
    # gradient, so the weights agree only to ~3e-3 after 6 steps; the losses still agree closely.
    # one set of settings for both runs; the global batch is 4 sequences in each
    settings = {"allocation": allocation, "data_dir": data_dir, "vocab_size": VOCAB, "n_embd": 32, "n_head": 2,
                "n_layer": 2, "block_size": 16, "max_iters": 6, "warmup_iters": 2, "lr_decay_iters": 6,
                "eval_interval": 3, "eval_iters": 2, "quiet": "true", "dual_steps": 8, "msign_dtype": "float32"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"   # in this process (a subprocess's imports cost ~5 s), on one thread as the ranks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(make_config("tiny-cpu", {k: str(v) for k, v in {**settings, "batch_size": 4, "out_dir": single}.items()}))
    finally:
        torch.set_num_threads(threads)
    ddp = tmp_path / "ddp"
    port = free_port()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    "-m", "manifold_muon", "train", "--preset", "tiny-cpu", *(f"--{k}={v}" for k, v in settings.items()),
                    "--batch_size=2", f"--out_dir={ddp}"], check=True, env=env, timeout=300)
    assert json.loads((ddp / "env.json").read_text())["world_size"] == 2
    np.testing.assert_allclose(losses(ddp), losses(single), rtol=2e-4)
    a, b = torch.load(single / "ckpt.pt", weights_only=True), torch.load(ddp / "ckpt.pt", weights_only=True)
    for k in a["model"]:
        assert (a["model"][k] - b["model"][k]).norm() <= weight_rtol * a["model"][k].norm(), k



def _ddp_rank_counting_live_wrappers(rank, port, cfg, counts):
    """One rank of a 2-process gloo run of ``train``, recording how many DDP wrappers are alive
    when the process group is destroyed."""
    import gc
    import torch.distributed as dist
    from manifold_muon.lab import train as train_module
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    destroy = dist.destroy_process_group

    def counting_destroy(*args, **kwargs):
        ddp = torch.nn.parallel.DistributedDataParallel
        counts[rank] = sum(isinstance(obj, ddp) for obj in gc.get_objects())
        return destroy(*args, **kwargs)

    train_module.dist.destroy_process_group = counting_destroy
    train_module.train(cfg)


def test_ddp_ranks_free_their_wrapper_before_the_process_group(data_dir, tmp_path):
    # The group's destructor, run from DDP's Reducer as its last holder, joined gloo's threads with
    # the GIL held and hung a rank at exit (pytorch/pytorch#56297); train frees DDP first.
    import torch.multiprocessing as mp
    port = free_port()
    counts = mp.get_context("spawn").Manager().dict()
    cfg = tiny(data_dir, tmp_path / "ddp", max_iters=2, eval_interval=2, batch_size=2, allocation="unconstrained")
    mp.spawn(_ddp_rank_counting_live_wrappers, args=(port, cfg, counts), nprocs=2, join=True)
    assert dict(counts) == {0: 0, 1: 0}

def test_config_overrides_are_typed_and_checked():
    cfg = apply_overrides(make_config("tiny-cpu"), {"n_layer": "3", "compile": "false", "inject_nonfinite_at": "1,2"})
    assert cfg.model.n_layer == 3 and cfg.compile is False and cfg.inject_nonfinite_at == (1, 2)
    with pytest.raises(ValueError, match="unknown config key 'n_layers'; valid keys"):
        apply_overrides(cfg, {"n_layers": "3"})
    with pytest.raises(ValueError, match="bad value for max_iters"):
        apply_overrides(cfg, {"max_iters": "many"})
    with pytest.raises(ValueError, match="valid choices: gpt2-small, gpt2-reduced, cpu-small, tiny-cpu"):
        make_config("gpt2-medium")
    assert make_config("gpt2-small").batch_size * make_config("gpt2-small").model.block_size == 65536


def test_dual_steps_caps_the_improved_solver_only():
    from manifold_muon.lab.train import _param_groups
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=VOCAB))
    improved = _param_groups(model, make_config("tiny-cpu", {"allocation": "hetero", "dual_steps": "8"}))
    paper = _param_groups(model, make_config("tiny-cpu", {"allocation": "hetero", "dual_steps": "8", "mode": "paper"}))
    assert {g.get("dual_steps") for g in improved if g["algorithm"] == "muon"} == {8}
    assert {g.get("dual_steps") for g in paper if g["algorithm"] == "muon"} == {None}  # the reference's 20
    assert {g["mode"] for g in paper} == {"paper"}


def test_muon_weight_decay_moves_muons_decayed_groups_and_leaves_adamw_and_undecayed_groups():
    from manifold_muon.lab.train import _param_groups
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=VOCAB))

    def decay(allocation, **overrides):
        cfg = make_config("tiny-cpu", {"allocation": allocation, **overrides})
        return {(g["algorithm"], g["manifold"], g["names"][0].split(".")[-2]): g["weight_decay"]
                for g in _param_groups(model, cfg) if g["params"][0].ndim == 2}

    assert decay("hetero-wd", weight_decay="0.2") == {
        ("muon", "stiefel", "c_attn"): 0.0, ("muon", "dgram", "c_fc"): 0.2, ("adamw", "none", "wte"): 0.2}
    assert decay("hetero-wd", weight_decay="0.2", muon_weight_decay="0.03") == {
        ("muon", "stiefel", "c_attn"): 0.0, ("muon", "dgram", "c_fc"): 0.03, ("adamw", "none", "wte"): 0.2}
    # the paper's undecayed manifold weights stay undecayed whatever the strength
    assert decay("hetero", muon_weight_decay="0.3")[("muon", "dgram", "c_fc")] == 0.0
    assert decay("unconstrained", muon_weight_decay="0.3")[("muon", "none", "c_attn")] == 0.3
    with pytest.raises(ValueError, match="bad value for muon_weight_decay: must be >= 0, or -1 .* got -0.5"):
        decay("unconstrained", muon_weight_decay="-0.5")


def test_evaluation_scores_one_fixed_set_whatever_the_iteration_or_seed(data_dir, tmp_path):
    a = Trainer(tiny(data_dir, tmp_path / "a", seed=1))
    b = Trainer(tiny(data_dir, tmp_path / "b", seed=2))
    b.model.load_state_dict(a.model.state_dict())
    first = a.evaluate(0)
    assert a.evaluate(40) | {"iter": 0} == first          # same batches at every evaluation ...
    assert b.evaluate(0) == first                          # ... and in every run, whatever its seed
