"""The library's boundary: it imports and steps with torch alone, and declares nothing else."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAB_ONLY = ("numpy", "scipy", "tiktoken", "tqdm", "matplotlib", "datasets", "transformers")

# A finder that refuses the lab's dependencies: what a venv holding only torch would do.
# torch imports numpy lazily where present, so numpy is refused only to code outside torch.
BLOCKER = f"""
import importlib.abc, sys, traceback
BLOCKED = {LAB_ONLY!r}
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            caller = "".join(traceback.format_stack(limit=8))
            if "manifold_muon" in caller:
                raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Refuse())
"""

STEP = """
import torch
from manifold_muon import ManifoldMuon, resolve
model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), num_layers=1)
opt = ManifoldMuon(resolve(model, "hetero", mode="fast"))
model(torch.randn(2, 8, 32)).pow(2).mean().backward()
opt.step()
assert not any(m.startswith("manifold_muon.lab") for m in sys.modules), sorted(sys.modules)
print("stepped")
"""


def test_the_library_declares_torch_alone():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch"]
    assert set(LAB_ONLY[:5]) <= {d.split("=")[0].split(">")[0] for d in project["optional-dependencies"]["lab"]}


def test_the_library_imports_and_steps_without_the_labs_dependencies():
    done = subprocess.run([sys.executable, "-c", BLOCKER + STEP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "stepped" in done.stdout, done.stderr[-2000:]


def test_the_lab_without_its_dependencies_names_the_extra():
    code = BLOCKER + "import manifold_muon.lab"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and 'pip install "manifold-muon[lab]"' in done.stderr, done.stderr[-2000:]
