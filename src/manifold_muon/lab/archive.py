"""Committed studies whose raw runs live in git history: list them, bring them back, check them.

Each study's docs page folder (``docs/results/<study>/``) holds ``manifest.json``: the commit
that holds the raw files and the sha256 and size of each.  Restoring checks out those files
from that commit into ``results/<study>`` and verifies every hash, so a report can be rebuilt
from exactly the runs the page describes.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

__all__ = ["STUDIES_DIR", "list_studies", "read_manifest", "restore_study", "verify_study", "shell_lines"]

STUDIES_DIR = Path("docs/results")


def list_studies(root: Path = Path(".")) -> list[str]:
    """The studies that have a manifest, by name."""
    return sorted(p.parent.name for p in (root / STUDIES_DIR).glob("*/manifest.json"))


def read_manifest(study: str, root: Path = Path(".")) -> dict:
    path = root / STUDIES_DIR / study / "manifest.json"
    if not path.exists():
        raise ValueError(f"no study {study!r} (no {path}); valid choices: {', '.join(list_studies(root)) or 'none'}")
    return json.loads(path.read_text())


def verify_study(manifest: dict, root: Path = Path(".")) -> list[str]:
    """The files of the manifest that are missing or differ from their recorded sha256."""
    bad = []
    for name, expected in manifest["files"].items():
        path = root / name
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != expected["sha256"]:
            bad.append(name)
    return bad


def restore_study(study: str, root: Path = Path(".")) -> dict:
    """Check out the study's raw files from the commit that holds them, then verify them; raise
    naming the files that do not match."""
    manifest = read_manifest(study, root)
    done = subprocess.run(["git", "checkout", manifest["commit"], "--", f"results/{study}"], cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git could not restore results/{study} from commit {manifest['commit']}: "
                           f"{done.stderr.strip()} (a shallow clone lacks it: git fetch --unshallow)")
    # the files are not part of the current tree: unstage them, keep them in the work tree
    subprocess.run(["git", "reset", "-q", "--", f"results/{study}"], cwd=root, capture_output=True)
    bad = verify_study(manifest, root)
    if bad:
        raise RuntimeError(f"{len(bad)} restored file(s) do not match the manifest's sha256: {bad[:5]}")
    return manifest


def shell_lines(markdown: str) -> list[str]:
    """Every line of the Markdown's bash blocks, with the blocks' ``NAME="..."`` variables
    expanded (the study pages and docs write long sweep commands that way)."""
    lines = []
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M):
        variables: dict[str, str] = {}
        for line in block.splitlines():
            assignment = re.fullmatch(r'([A-Z0-9_]+)="(.*)"', line.strip())
            if assignment:
                variables[assignment[1]] = assignment[2]
                continue
            lines.append(re.sub(r"\$([A-Z0-9_]+)", lambda m: variables.get(m[1], m[0]), line))
    return lines
