"""The floor plan, enforced: the import contract of pyproject.toml (ARCHITECTURE.md draws it), small
files, registries that name exactly what their plugins register, and the linter's rules."""

from __future__ import annotations

import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nanoslg.core import registry

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


def _tool(name: str) -> list[str]:
    """The console script of a dev dependency, next to this interpreter or on PATH."""
    exe = Path(sys.executable).with_name(name)
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]'")
    return [found]


def test_import_contracts_are_kept():
    res = subprocess.run(_tool("lint-imports") + ["--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout


def test_every_module_is_small():
    big = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "nanoslg").rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not big, f"split these along their seams (at most {MAX_LINES} lines): {big}"


@pytest.mark.parametrize(
    "reg",
    [
        registry.CACHE_BACKENDS,
        registry.SCHEDULERS,
        registry.PARALLEL,
        registry.ARCHITECTURES,
        registry.BENCHMARKS,
        registry.QUANTIZATION,
        registry.TOOL_PARSERS,
    ],
    ids=lambda r: r.key,
)
def test_registry_names_are_what_the_plugins_register(reg):
    """Names are read from the sources without importing; importing every module of the package must
    register exactly those, so a config check at compose time and `get` can never disagree."""
    pkg = importlib.import_module(reg.package)
    for mod in pkgutil.iter_modules(pkg.__path__, reg.package + "."):
        importlib.import_module(mod.name)  # GPU-only dependencies are imported lazily, so this runs on a CPU
    assert sorted(reg._items) == reg.names()
    for name in reg.names():
        assert reg.get(name) is reg._items[name]


def test_an_unknown_name_lists_the_allowed_ones():
    from nanoslg.core.errors import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"scheduler.policy='lifo' is not a known scheduler policy; "
        r"allowed: dfs-weight, fcfs, lpm, random",
    ):
        registry.SCHEDULERS.get("lifo")


def test_config_check_imports_no_plugin():
    """Composing and validating a config reads plugin names from the sources and imports none."""
    code = (
        "import sys; from nanoslg.core.compose import compose_config; compose_config(['cache=paged', "
        "'scheduler=lpm']); bad = [m for m in ('torch', 'nanoslg.cache.paged_torch', 'nanoslg.scheduler"
        ".policies_cache', 'nanoslg.parallel.single') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff_lint_and_format():
    lint = subprocess.run(_tool("ruff") + ["check", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-4000:]
    fmt = subprocess.run(_tool("ruff") + ["format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout[-4000:]
