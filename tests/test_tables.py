"""Every Markdown table the project writes or commits must render: one cell count throughout,
pipes inside cells escaped."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from manifold_muon.lab.analysis import CHAIN, CHAIN_LABELS
from manifold_muon.lab.report import markdown_table
from manifold_muon.lab.stats import min_detectable_difference, welch_difference

ROOT = Path(__file__).resolve().parents[1]


def cells(line: str) -> list[str]:
    """A table row's cells, split on pipes that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))] if line.strip() != "|" else []


def malformed_tables(text: str) -> list[str]:
    """Each table (a header, a delimiter row, body rows) whose rows do not all have the header's
    cell count, described by its header."""
    bad, lines = [], re.sub(r"^```.*?^```", "", text, flags=re.S | re.M).splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("|") and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            width = len(cells(line))
            body = [l for l in _rows_after(lines, i + 2)]
            if len(cells(lines[i + 1])) != width or any(len(cells(row)) != width for row in body):
                bad.append(line[:80])
    return bad


def _rows_after(lines, start):
    for line in lines[start:]:
        if not line.startswith("|"):
            return
        yield line


def test_the_parser_catches_an_unescaped_pipe():
    broken = "| run | logit max|z| x2 |\n|---|---|\n| a | 1 |\n"
    assert malformed_tables(broken) == ["| run | logit max|z| x2 |"]
    assert malformed_tables(broken.replace("max|z|", "max\\|z\\|")) == []


def test_generated_tables_escape_pipes_and_keep_their_shape():
    columns = [("run", "Run")] + [(s, CHAIN_LABELS[s]) for s in CHAIN]
    rows = [{"run": "a|b", **{s: "x|y" for s in CHAIN}}]
    assert malformed_tables(markdown_table(rows, columns)) == []


@pytest.mark.parametrize("path", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_table_renders(path):
    assert malformed_tables(path.read_text()) == []


def test_welch_difference_matches_scipy():
    rng = np.random.default_rng(0)
    for n_a, n_b in ((2, 2), (2, 3), (5, 9)):
        a, b = rng.normal(0, 1, n_a), rng.normal(0.5, 2, n_b)
        ours = welch_difference(a, b)
        theirs = scipy_stats.ttest_ind(a, b, equal_var=False)
        low, high = theirs.confidence_interval(0.95)
        assert np.allclose([ours.low, ours.high, ours.p_value], [low, high, theirs.pvalue])
    assert welch_difference([1.0], [2.0, 3.0]).verdict.startswith("no interval")


def test_min_detectable_difference_has_the_power_it_claims():
    rng = np.random.default_rng(1)
    n, sd = 4, 1.0
    delta = min_detectable_difference(sd, n, n)
    a = rng.normal(0, sd, (20000, n))
    b = rng.normal(delta, sd, (20000, n))
    rejected = scipy_stats.ttest_ind(a, b, axis=1).pvalue < 0.05
    assert abs(rejected.mean() - 0.8) < 0.015
