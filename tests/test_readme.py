"""The README's commands, run as a newcomer copies them (on the demo model, built once per session)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _env(demo_model: str) -> dict:
    return {**os.environ, "NANOSLG_CACHE": os.path.dirname(demo_model), "HF_HUB_OFFLINE": "1"}


def test_python_example_runs_as_written(demo_model, tmp_path):
    code = README.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(demo_model), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.rstrip().endswith(("stop", "length")), res.stdout[-500:]


def test_generate_command_runs_as_written(demo_model):
    line = next(ln for ln in README.splitlines() if ln.startswith("python run.py mode=generate"))
    args = shlex.split(line.split("#", 1)[0])[2:]
    res = subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO, env=_env(demo_model), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() and not re.search(r"Traceback|error:", res.stderr)
