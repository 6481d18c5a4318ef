"""The docs' commands and code, checked against the CLI, the library and the committed studies.

Docs that drift from the code are a bug a user meets first: these tests parse every
``manifold-muon`` command of the README and the docs site, run their Python examples and the
example script, check that the sweep commands each study page gives name exactly the runs that
page lists (``runs.json``) with the settings those runs recorded, that every study's manifest
is well formed, and that every file and section the docs link to exists.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from manifold_muon.lab.archive import shell_lines
from manifold_muon.lab.cli import _csv, _split_overrides, build_parser
from manifold_muon.lab.config import TrainConfig, make_config
from manifold_muon.optim.allocation import PRESETS
from manifold_muon.optim.dual import DIRECTION_MODES
from manifold_muon.optim.manifolds import get_manifold
from manifold_muon.lab.sweep import plan_runs

from conftest import refusal

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "docs" / "results"
DOC_PATHS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
DOCS = {path.relative_to(ROOT).as_posix(): path.read_text() for path in DOC_PATHS}
DOCS_TEXT = "\n".join(DOCS.values())   # the commands, code and file pointers of both, read as one
WITH_OVERRIDES = ("train", "sweep", "bench")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", DOCS_TEXT, flags=re.S | re.M)


def docs_commands() -> list[list[str]]:
    """Every ``manifold-muon`` (or ``-m manifold_muon``) command line of the docs' bash blocks,
    as the argv after the program name, with ``NAME="..."`` shell variables of a block expanded."""
    commands = []
    for line in shell_lines(DOCS_TEXT):
        words = shlex.split(line, comments=True)
        for start, word in enumerate(words):
            if (word == "manifold-muon" and words[start - 1:start] != ["install"]) or (
                    word == "manifold_muon" and words[start - 1] == "-m"):
                commands.append(words[start + 1:])
                break
    return commands


def parse(argv: list[str]):
    """The parsed command, or a test failure naming the docs line that does not parse."""
    try:
        args, extra = build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"docs command does not parse: manifold-muon {' '.join(argv)}")
    if extra and args.command not in WITH_OVERRIDES:
        pytest.fail(f"docs command has arguments {extra} that `{args.command}` does not take")
    return args, _split_overrides(extra) if extra else {}


def test_every_docs_command_parses_with_valid_settings():
    commands = docs_commands()
    assert len(commands) >= 40, f"found only {len(commands)} commands: is the block parser broken?"
    assert {argv[0] for argv in commands} >= {"prepare", "train", "sweep", "report", "compare", "bench", "pack"}
    for argv in commands:
        args, overrides = parse(argv)
        if args.command in WITH_OVERRIDES:
            make_config(args.preset, overrides)  # unknown keys and bad values raise, naming them
        for allocation in getattr(args, "allocations", "").split(",") + [getattr(args, "allocation", "hetero")]:
            assert not allocation or allocation in PRESETS, f"{allocation!r} in: {' '.join(argv)}"
        for mode in (getattr(args, "modes", None) or "").split(","):
            assert not mode or mode in DIRECTION_MODES, f"{mode!r} in: {' '.join(argv)}"


def documented_runs() -> dict[str, dict[str, tuple]]:
    """``results/<sweep>`` -> {run name: (preset, the run's overrides, the command's overrides)}
    for every docs sweep command whose ``--out`` is under ``results/``, planned as the sweep
    plans them."""
    runs: dict[str, dict[str, tuple]] = {}
    for argv in docs_commands():
        args, overrides = parse(argv)
        if args.command != "sweep" or not (args.out or "").startswith("results/"):
            continue
        planned = plan_runs(_csv(args.allocations), _csv(args.seeds, int), args.out, overrides=overrides,
                            modes=_csv(args.modes) if args.modes else None)
        for run in planned:
            runs.setdefault(args.out, {})[Path(run["out_dir"]).name] = (args.preset, run, overrides)
    return runs


def study_runs(study: str) -> dict[str, dict]:
    """The runs a study page lists: name -> its summary, with the config it recorded."""
    return {row["run"]: row for row in json.loads((STUDIES / study / "runs.json").read_text())}


def test_study_sweep_commands_name_exactly_the_committed_runs():
    documented = documented_runs()
    committed = {f"results/{p.parent.name}" for p in STUDIES.glob("*/runs.json")}
    assert len(committed) >= 13, "the committed studies' runs.json files are missing"
    assert committed <= set(documented), f"committed studies no command of the docs makes: {committed - set(documented)}"
    for sweep in sorted(committed):
        runs, listed = documented[sweep], study_runs(sweep.split("/", 1)[1])
        assert set(runs) == set(listed), (f"{sweep}: runs the docs' commands make but not listed "
                                          f"{sorted(set(runs) - set(listed))}; listed but no command {sorted(set(listed) - set(runs))}")
        for name, (preset, run, overrides) in runs.items():
            recorded = listed[name]["config"]
            expected = make_config(preset, run)
            for key in ("preset", "allocation", "seed", "mode", *overrides):
                model_field = key not in TRAIN_FIELDS   # make_config has refused keys of neither
                value = getattr(expected.model if model_field else expected, key)
                got = (recorded["model"] if model_field else recorded)[key]
                assert got == value, f"{sweep}/{name}: {key} is {got!r}, the docs' command gives {value!r}"


def test_every_study_has_a_manifest_of_its_raw_files_and_their_commit():
    for manifest_path in sorted(STUDIES.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        study = manifest_path.parent.name
        assert manifest["study"] == study and re.fullmatch(r"[0-9a-f]{40}", manifest["commit"])
        assert manifest["files"] and all(name.startswith(f"results/{study}/") for name in manifest["files"])
        assert all(re.fullmatch(r"[0-9a-f]{64}", f["sha256"]) and f["bytes"] >= 0 for f in manifest["files"].values())
        if (STUDIES / study / "runs.json").exists():   # every run listed has its raw summary in the manifest
            assert {f"results/{study}/{run}/summary.json" for run in study_runs(study)} <= set(manifest["files"])


def test_readme_python_examples_run_and_keep_weights_on_their_manifolds():
    snippets = [b for b in code_blocks("python") if "ManifoldMuon(" in b]
    assert len(snippets) >= 4   # README and own-model: rules; quickstart: a preset; own-model: a HF Llama
    for snippet in snippets:
        namespace: dict = {}
        torch.manual_seed(0)
        exec(compile(snippet, "docs example", "exec"), namespace)
        groups = namespace["opt"].param_groups
        assert {g["manifold"] for g in groups} >= {"stiefel", "dgram"}
        for group in (g for g in groups if g["manifold"] in ("stiefel", "dgram")):
            for p in group["params"]:
                assert float(get_manifold(group["manifold"]).residual(p.detach()).max()) < 1e-5


def test_example_script_trains_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, str(ROOT / "examples/demo_allocations.py"), "--steps", "4", "--mode",
                    "fast", "--allocations", "hetero,all-dgram", "--out", str(out)], check=True, capture_output=True, text=True,
                   timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # a toy model: threads only contend
    results = json.loads((out / "results.json").read_text())
    assert [r["allocation"] for r in results] == ["hetero", "all-dgram"]
    for r in results:
        assert math.isfinite(r["final_loss"]) and r["max_residual"] < 1e-5
    assert "| hetero |" in (out / "report.md").read_text() and "fast mode" in (out / "report.md").read_text()


def test_example_script_refuses_an_unknown_allocation(tmp_path):
    message = refusal(ROOT / "examples/demo_allocations.py", "--allocations", "hetero,bogus", "--out", tmp_path)
    assert "unknown allocation(s) ['bogus']; valid choices: " in message and "all-stiefel" in message


def expand_braces(pattern: str) -> list[str]:
    """``a{b,c}d`` -> ``abd``, ``acd`` (one level, as the docs write file families)."""
    found = re.search(r"\{([^{}]*)\}", pattern)
    if not found:
        return [pattern]
    return [p for choice in found[1].split(",") for p in expand_braces(pattern[:found.start()] + choice + pattern[found.end():])]


def test_every_file_the_docs_point_to_exists():
    paths = set(re.findall(r"[`(]((?:benchmarks|scripts|examples|tests|src)/[^`)\s]*)", DOCS_TEXT))
    assert len(paths) >= 10, f"found only {len(paths)} paths: is the pattern broken?"
    missing = [p for p in sorted(paths) for q in expand_braces(p) if not list(ROOT.glob(q.rstrip("/")))]
    assert not missing, f"the docs point to files that are not in the repository: {missing}"


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> set[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # a shell comment is no heading
    return {heading_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, flags=re.M)}


def test_every_link_of_the_docs_names_a_file_and_a_heading_that_exist():
    dangling, checked = [], 0
    for name, text in DOCS.items():
        prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            checked += 1
            file_part, _, anchor = target.partition("#")
            path = (ROOT / name).parent / file_part if file_part else ROOT / name
            if not path.exists():
                dangling.append(f"{name} -> {target} (no such file)")
            elif anchor and anchor not in headings(path.read_text()):
                dangling.append(f"{name} -> {target} (no such heading)")
    assert checked >= 20, f"found only {checked} links: is the pattern broken?"
    assert not dangling, f"links to files or sections that do not exist: {dangling}"
