"""Every ```python block of README.md runs as written (on the CPU, or the GPU when present): each
in a fresh interpreter (same environment, so the same leankernels), so one block's imports or
settings cannot help another. Blocks that use transformers are skipped without it (it is an
optional dependency)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _label(i: int, code: str) -> str:
    first = next((ln for ln in code.splitlines() if ln.strip() and not ln.startswith("import")), "")
    return f"block{i}:" + re.sub(r"\W+", "_", first)[:40]


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 6


@pytest.mark.parametrize("code", BLOCKS, ids=[_label(i, c) for i, c in enumerate(BLOCKS)])
def test_readme_block_runs(code, tmp_path):
    if re.search(r"^\s*(from|import) transformers", code, flags=re.M):
        pytest.importorskip("transformers")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = dict(os.environ)
    if env.get("PYTHONPATH"):  # a relative PYTHONPATH=python (dev build) must survive the cwd change
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{r.stderr[-4000:]}"
