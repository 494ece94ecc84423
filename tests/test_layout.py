"""The repository stands alone and its layout stays readable: no path outside the repo, no import
cycle, model code blind to quantization, docs citations that resolve, the README's table true."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402


def tracked_files() -> list[Path]:
    """Files of the repository: git's list in a clone; every file but build outputs otherwise."""
    if (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        return [ROOT / f for f in out.stdout.decode().split("\0") if f]
    skip = {".venv", "runs", "build", "__pycache__", ".pytest_cache"}
    return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (safetensors, gzip)
    return data.decode("utf-8", errors="replace")


def test_no_tracked_file_names_a_path_outside_the_repo():
    # Our machines keep reference material beside the checkout; a user's clone has none of it.
    # Spelled in pieces so that this file does not match itself.
    outside = [".." + "/shared", "/work" + "/shared", "/work" + "/main", str(ROOT.parent / "shared")]
    hits = []
    files = tracked_files()
    assert len(files) > 50  # the listing worked
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), start=1):
            if any(o in line for o in outside):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_config_paths_resolve_inside_the_repo(name):
    from dsv2_jax.training.config import load_config

    cfg = load_config(ROOT / "configs" / name)
    paths = [cfg.run_dir, *cfg.data.train]
    for value in (cfg.data.tokenizer, cfg.model.config_json, cfg.model.init_from):
        if value and value.startswith((".", "/")):
            paths.append(value)
    for p in paths:
        resolved = Path(p).resolve()
        assert resolved.is_relative_to(ROOT), f"configs/{name}: {p} resolves outside the repo"
    for pattern in cfg.data.train:  # the bundled configs' data is in the repo; users bring theirs
        if "shakespeare" in pattern:
            assert Path(pattern).is_file(), f"configs/{name}: {pattern} is missing"


def test_relative_paths_follow_the_config_file_not_the_cwd(tmp_path):
    """The rule: relative to the file that names them; overrides relative to the cwd."""
    from dsv2_jax.training.config import load_config

    sub = tmp_path / "exp"
    sub.mkdir()
    (sub / "text.txt").write_text("hello\n")
    (sub / "tok").mkdir()
    (sub / "cfg.yaml").write_text(
        "run_dir: runs/a\nmodel: {preset: deepseek-v2-lite}\n"
        "data: {train: [text.txt, '*.jsonl'], tokenizer: ./tok, seq_len: 8}\n"
        "schedule: {total_steps: 3, warmup_steps: 1}\n")
    cfg = load_config(sub / "cfg.yaml")
    assert cfg.run_dir == str(sub / "runs/a")
    assert cfg.data.train == (str(sub / "text.txt"), str(sub / "*.jsonl"))
    assert cfg.data.tokenizer == str(sub / "tok")
    cfg = load_config(sub / "cfg.yaml", ["data.tokenizer=bytes", "run_dir=elsewhere"])
    assert cfg.data.tokenizer == "bytes" and cfg.run_dir == "elsewhere"


def test_tiny_cpu_config_trains_from_another_directory(tmp_path):
    """configs/tiny-cpu.yaml finds its corpus (data/shakespeare.txt.gz, in the repo) wherever
    the program runs from."""
    run_dir = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "train.run", "--config", str(ROOT / "configs/tiny-cpu.yaml"),
                        "schedule.total_steps=2", "schedule.warmup_steps=1", "checkpoint.every=2",
                        f"run_dir={run_dir}", "logging.progress=false", "eval.every=0"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dir / "metrics.jsonl").is_file()
    assert "shakespeare.txt.gz" in (run_dir / "config.yaml").read_text()


def test_no_import_cycles():
    graph = import_graph.import_graph("dsv2_jax", ROOT)
    assert len(graph) > 30
    assert import_graph.find_cycles(graph) == []


def test_the_cycle_check_finds_cycles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b  # hidden in a function\n")
    (pkg / "b.py").write_text("from .sub import c\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import x\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\nx = 1\n")
    (pkg / "d.py").write_text("from pkg import a\n")  # a module importing its package: no cycle
    cycles = import_graph.find_cycles(import_graph.import_graph("pkg", tmp_path))
    assert cycles == [["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c"]]


def test_model_code_never_imports_quant_and_sharding_never_imports_the_model():
    graph = import_graph.import_graph("dsv2_jax", ROOT)
    for module in ("dsv2_jax.mla", "dsv2_jax.moe", "dsv2_jax.model"):
        assert not {d for d in graph[module] if d.startswith("dsv2_jax.quant")}, module
    assert not graph["dsv2_jax.sharding"] & {"dsv2_jax.moe", "dsv2_jax.model", "dsv2_jax.mla"}


def test_quantize_is_the_function_after_importing_every_submodule():
    code = ("import importlib, pkgutil, dsv2_jax\n"
            "for m in pkgutil.walk_packages(dsv2_jax.__path__, 'dsv2_jax.'):\n"
            "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
            "print(dsv2_jax.quantize)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("<function quantize at "), r.stdout


def test_docs_citations_resolve():
    """Every docs page (and heading anchor) named in the code or the README exists."""
    def anchors(md: Path) -> set[str]:
        heads = re.findall(r"^#+ (.+)$", md.read_text(), flags=re.M)
        return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in heads}

    cited = set()
    for path in tracked_files():
        if path.suffix in (".py", ".md", ".yaml", ".ipynb") and "docs" not in path.relative_to(ROOT).parts[:1]:
            cited |= set(re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", path.read_text()))
    assert len(cited) > 10
    missing = []
    for name, anchor in sorted(cited):
        md = ROOT / "docs" / name
        if not md.is_file() or (anchor and anchor not in anchors(md)):
            missing.append(f"docs/{name}#{anchor}")
    assert not missing, missing


def test_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in re.findall(r"^\| (`[^|]+`) \|", table, flags=re.M):
        paths = re.findall(r"`([^`]+)`", row)
        folder = Path(paths[0]).parent if "/" in paths[0].rstrip("/") else Path(".")
        for i, p in enumerate(paths):
            full = Path(p) if i == 0 or "/" in p.rstrip("/") else folder / p
            assert (ROOT / full).exists(), f"README table names {full}, which does not exist"
            named.add(str(full).rstrip("/"))
    # Every module and subpackage of the library, and every top-level folder, has a row.
    library = {f"dsv2_jax/{p.name}" for p in (ROOT / "dsv2_jax").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    top = {p.relative_to(ROOT).parts[0] for p in tracked_files() if len(p.relative_to(ROOT).parts) > 1}
    top = {t for t in top if not t.startswith(".") and t != "dsv2_jax"}
    assert library - named == set(), f"library modules missing from the README table: {library - named}"
    assert top - named == set(), f"top-level folders missing from the README table: {top - named}"
