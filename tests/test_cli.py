"""The command line's override parsing and the config's checks: the forms people type, and the errors they get."""
import pytest
import torch

from manifold_muon.lab.bench import run_bench
from manifold_muon.lab.cli import _split_overrides, build_parser
from manifold_muon.lab.config import ConfigError, make_config
from manifold_muon.lab.data import DataError
from manifold_muon.optim.allocation import PRESETS
from manifold_muon.lab.sweep import run_sweep


def test_overrides_accept_equals_space_and_bare_flags():
    extra = ["--mode=fast", "--muon_lr", "0.16", "--quiet", "--fail_at_iter", "-1", "--n-layer=3", "--compile"]
    overrides = _split_overrides(extra)
    assert overrides == {"mode": "fast", "muon_lr": "0.16", "quiet": "true", "fail_at_iter": "-1",
                         "n_layer": "3", "compile": "true"}
    cfg = make_config("tiny-cpu", overrides)
    assert (cfg.mode, cfg.muon_lr, cfg.quiet, cfg.compile, cfg.model.n_layer) == ("fast", 0.16, True, True, 3)


def test_a_stray_word_is_refused_by_name():
    with pytest.raises(SystemExit, match="'fast'"):
        _split_overrides(["fast"])


@pytest.mark.parametrize("overrides, message", [
    ({"max_iters": "true"}, "max_iters: expected an integer, got 'true'"),
    ({"muon_lr": "big"}, "muon_lr: expected a number, got 'big'"),
    ({"quiet": "maybe"}, "quiet: expected true/false, got 'maybe'"),
    ({"inject_nonfinite_at": "3,x"}, "comma-separated integers"),
    ({"lr": "0.1"}, "unknown config key 'lr'; valid keys: .*muon_lr"),
])
def test_bad_override_values_name_the_key_the_value_and_what_is_valid(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("tiny-cpu", overrides)


def test_train_help_lists_every_config_field():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for field in ("diag_interval", "dual_form", "rope_theta", "max_nonfinite"):
        assert field in help_text


@pytest.mark.parametrize("overrides, message", [
    ({"max_iters": "-3"}, "bad value for max_iters: must be at least 1, got -3"),
    ({"eval_interval": "0"}, "bad value for eval_interval: must be at least 1, got 0"),
    ({"warmup_iters": "-1"}, "bad value for warmup_iters: must be at least 0"),
    ({"dual_steps": "-2"}, "bad value for dual_steps: must be at least 0, or -1"),
    ({"muon_lr": "nan"}, "bad value for muon_lr: must be a finite number >= 0, got nan"),
    ({"adamw_lr": "-0.001"}, "bad value for adamw_lr: must be a finite number >= 0"),
    ({"muon_momentum": "1"}, r"bad value for muon_momentum: must be in \[0, 1\), got 1.0"),
    ({"muon_weight_decay": "-0.5"}, "bad value for muon_weight_decay: must be >= 0, or -1"),
    ({"allocation": "herero"}, "bad value for allocation: 'herero'; valid choices: unconstrained, all-stiefel"),
    ({"mode": "exact"}, "bad value for mode: 'exact'; valid choices: paper, fast, improved"),
    ({"dual_form": "grams"}, "bad value for dual_form: 'grams'; valid choices: matrix, gram"),
    ({"msign_dtype": "fp16"}, "bad value for msign_dtype: 'fp16'; valid choices: '', bfloat16, float32"),
    ({"matmul_precision": "tf32"}, "bad value for matmul_precision: 'tf32'; valid choices: highest, high, medium"),
    ({"device": "tpu"}, "bad value for device: 'tpu' is no device torch knows; valid choices: auto, cpu, cuda"),
    ({"n_head": "0"}, "bad value for n_head: must be at least 1, got 0"),   # was a ZeroDivisionError
    ({"n_embd": "100", "n_head": "3"}, "bad value for n_embd: 100 must be divisible by n_head=3"),
    ({"arch": "llama", "n_embd": "96", "n_head": "32"}, "head size n_embd/n_head=3 must be even"),
    ({"dropout": "1.5"}, r"bad value for dropout: must be in \[0, 1\), got 1.5"),
    ({"arch": "gpt3"}, "bad value for arch: 'gpt3'; valid choices: gpt2, llama"),
])
def test_settings_no_run_could_use_are_refused_when_the_config_is_made(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config("tiny-cpu", overrides)


def test_every_bad_setting_is_named_at_once_and_the_usable_edges_pass():
    with pytest.raises(ConfigError) as refused:
        make_config("tiny-cpu", {"batch_size": "0", "grad_clip": "-1", "device": "gpu"})
    assert [p.split(":")[0] for p in refused.value.problems] == [
        "bad value for batch_size", "bad value for grad_clip", "bad value for device"]
    edges = {"warmup_iters": "0", "dual_steps": "0", "muon_lr": "0", "grad_clip": "0", "muon_momentum": "0",
             "muon_weight_decay": "-1", "msign_dtype": "float32", "device": "cpu", "max_iters": "1"}
    assert make_config("tiny-cpu", edges).torch_device() == torch.device("cpu")


def test_a_sweep_with_bad_settings_names_them_all_and_writes_nothing(tmp_path):
    out = tmp_path / "sweep"
    with pytest.raises(ValueError) as refused:
        run_sweep("tiny-cpu", ["hetero", "herero"], [1], out, modes=["fast", "exact"])
    assert str(refused.value).splitlines() == [
        "bad value for mode: 'exact'; valid choices: paper, fast, improved",
        f"bad value for allocation: 'herero'; valid choices: {', '.join(PRESETS)}"]
    assert not out.exists()   # no sweep.json naming runs that can never exist


@pytest.mark.parametrize("folder, hint", [("local-corpus", "python scripts/build_local_corpus.py --out"),
                                          ("openwebtext", "manifold-muon prepare openwebtext --out"),
                                          ("my-text", "manifold-muon prepare shakespeare --out")])
def test_a_sweep_without_its_data_says_how_to_make_it_and_writes_nothing(tmp_path, folder, hint):
    # before, each run failed into its own train.log and the sweep said only "see their train.log"
    out, data = tmp_path / "sweep", tmp_path / folder
    with pytest.raises(DataError) as refused:
        run_sweep("tiny-cpu", ["hetero", "unconstrained"], [1], out, overrides={"data_dir": str(data)}, quiet=True)
    assert str(refused.value).startswith(f"missing {data / 'train.bin'}; prepare data first: `{hint} {data}`")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_bench_times_the_device_asked_for_rather_than_falling_back():
    # before, the bench ignored --device and timed whatever 'auto' found
    with pytest.raises(RuntimeError, match="device 'cuda' was asked for, and torch .* sees no CUDA GPU"):
        run_bench("tiny-cpu", allocations=["unconstrained"], modes=["fast"], rounds=1, warmup=1, progress=False,
                  overrides={"device": "cuda", "n_layer": "1", "n_embd": "16", "n_head": "2", "block_size": "8",
                             "vocab_size": "64", "batch_size": "2"})
