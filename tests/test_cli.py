"""The command line's override parsing: the forms people type, and the errors they get."""
import pytest

from manifold_muon.cli import _split_overrides, build_parser
from manifold_muon.config import make_config


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
