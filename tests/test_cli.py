"""The command line: `info` reports the build, `demo --quick` runs the main job and passes its checks."""
from __future__ import annotations

import shutil
import subprocess
import sys

import leankernels


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "leankernels", *args], capture_output=True, text=True, timeout=timeout)


def test_info_reports_build_and_device():
    r = run("info", "--check")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert leankernels.__version__ in out
    assert "CUDA kernels" in out and "device" in out and "threads" in out
    if shutil.which("nvcc"):
        # CI builds the CUDA kernels whenever nvcc exists, Hopper included
        assert "built for" in out and "90a" in out


def test_demo_quick_passes_its_checks():
    r = run("demo", "--quick", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert "[quant]" in r.stdout


def test_bad_subcommand_is_an_error():
    r = run("frobnicate")
    assert r.returncode != 0
