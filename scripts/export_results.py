"""Turn committed study folders (``results/<study>``: raw runs, reports, comparisons) into small
docs pages (``docs/results/<study>/``), so the raw logs can leave the tracked tree.

Each page gets the commands that reproduce the study, its report (tables and figures), one row
per run (final and best validation loss, stability verdict) and a manifest: the sha256 and size
of every raw file, and the commit that holds them, so that
``git checkout COMMIT -- results/<study>`` brings them back (``manifold-muon results restore``
does it and checks every hash).

Usage: python scripts/export_results.py [STUDY ...]   (after `manifold-muon results restore`, `report`
and `compare` have rebuilt ``results/<study>``; a new study: from a checkout whose HEAD commit
holds its raw files, with ``--commands DOC`` naming the doc whose bash blocks hold its commands).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from manifold_muon.lab.archive import shell_lines  # noqa: E402
RUN_FIELDS = ("run", "allocation", "mode", "seed", "status", "iters", "max_iters", "final_val_loss", "best_val_loss",
              "verdict", "criterion", "criterion_iter")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def study_commands(doc: str, study: str) -> list[str]:
    """The ``manifold-muon`` lines of the doc's bash blocks that write ``results/<study>``."""
    found = []
    for line in shell_lines(doc):
        line = line.split("#")[0].strip()
        words = shlex.split(line) if "manifold-muon" in line else []
        if "--out" in words and words[words.index("--out") + 1].rstrip("/") == f"results/{study}":
            found.append(line)
    return found


def manifest(study: str, commit: str) -> dict:
    files = {}
    for path in sorted(git("ls-files", f"results/{study}").split()):
        data = (ROOT / path).read_bytes()
        files[path] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return {"study": study, "commit": commit, "restore": f"git checkout {commit} -- results/{study}",
            "files": files}


def run_rows(src: Path) -> list[dict]:
    """One summary per run: its results.jsonl line (a sweep) with the run's recorded config."""
    if not (src / "results.jsonl").exists():
        return []
    rows = []
    for line in (src / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        row = {key: record.get(key) for key in RUN_FIELDS}
        config = src / record["run"] / "config.json"
        if config.exists():
            row["config"] = json.loads(config.read_text())
        rows.append(row)
    return rows


def _loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def runs_table(rows: list[dict]) -> str:
    lines = ["| run | allocation | mode | seed | iterations | final val loss | best val loss | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = r["verdict"] or "-"
        if r.get("criterion"):
            verdict += f" ({r['criterion']} at {r['criterion_iter']})"
        lines.append(f"| {r['run']} | {r['allocation']} | {r['mode']} | {r['seed']} | {r['iters']}/{r['max_iters']} | "
                     f"{_loss(r['final_val_loss'])} | {_loss(r['best_val_loss'])} | {verdict} |")
    return "\n".join(lines)


def _body(markdown: str) -> str:
    """A report's text without its title, its headings one level down."""
    text = re.sub(r"\A# .*\n", "", markdown)
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)


def page(study: str, commands: list[str], src: Path, rows: list[dict], commit: str) -> str:
    parts = [f"# {study}", ""]
    if commands:
        parts += ["Reproduce (from the repository root, with the lab installed):", "", "```bash", *commands, "```", ""]
    for report in (src / "report" / "report.md", src / "compare.md"):
        if report.exists():
            parts += [_body(report.read_text()), ""]
    if rows:
        parts += ["## Runs", "", f"{len(rows)} runs; the configuration of each is in [runs.json](runs.json).", "",
                  runs_table(rows), ""]
    parts += ["## Raw files", "",
              f"Logs, spectra and diagnostics of every run are kept in git at commit `{commit}`; "
              "[manifest.json](manifest.json) lists each file with its sha256. Bring them back with", "",
              "```bash", f"manifold-muon results restore {study}", "```", "",
              f"(or `git checkout {commit} -- results/{study}`).", ""]
    return "\n".join(parts)


def export(study: str, doc: str, commit: str, out_root: Path) -> None:
    """Write the study's page folder.  A study exported before keeps its manifest (the raw files
    and the commit that holds them) and its commands: re-exporting regenerated reports from
    restored runs changes the page, not what the raw files are."""
    src, out = ROOT / "results" / study, out_root / study
    kept = {name: (out / name).read_text() for name in ("manifest.json",) if (out / name).exists()}
    if not doc and (out / "index.md").exists():
        doc = "\n".join(f"```bash\n{block}```" for block in
                        re.findall(r"^```bash\n(.*?)^```", (out / "index.md").read_text(), flags=re.S | re.M))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, text in kept.items():
        (out / name).write_text(text)
    for figure in [*src.glob("report/*.png"), *src.glob("*.png"), *src.glob("report/*.csv"), *src.glob("*.csv"),
                   *src.glob("report/table1.md")]:
        shutil.copy2(figure, out / figure.name)
    rows = run_rows(src)
    if rows:
        (out / "runs.json").write_text(json.dumps(rows, indent=1) + "\n")
    if (src / "sweep.json").exists():
        shutil.copy2(src / "sweep.json", out / "sweep.json")
    if "manifest.json" not in kept:
        (out / "manifest.json").write_text(json.dumps(manifest(study, commit), indent=1) + "\n")
    commit = json.loads((out / "manifest.json").read_text())["commit"]
    (out / "index.md").write_text(page(study, study_commands(doc, study), src, rows, commit))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="*", help="study folders under results/ (default: all)")
    parser.add_argument("--commands", default="", help="a doc whose bash blocks hold the studies' commands "
                        "(default: those of each study's existing page)")
    parser.add_argument("--out", default="docs/results", help="where the pages go")
    args = parser.parse_args()
    commit = git("rev-parse", "HEAD").strip()
    doc = (ROOT / args.commands).read_text() if args.commands else ""
    studies = args.studies or sorted(p.name for p in (ROOT / "results").iterdir() if p.is_dir())
    for study in studies:
        export(study, doc, commit, ROOT / args.out)
        print(f"{study}: docs page written")


if __name__ == "__main__":
    main()
