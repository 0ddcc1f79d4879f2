"""The command line: `info` reports the build, `demo --quick` runs the main job and passes its checks."""
from __future__ import annotations

import json
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


def test_demo_quick_passes_its_checks(tmp_path):
    out = tmp_path / "demo.json"
    r = run("demo", "--quick", "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert "[block]" in r.stdout and "decode time per token" in r.stdout
    assert "decode [" in r.stderr                      # the progress bar
    figures = json.loads(out.read_text())
    block = figures["block"]
    assert block["check"]["passed"]
    assert block["kv_bytes_per_token"]["mla_fp8"] == 656 and block["kv_bytes_per_token"]["mla_bf16"] == 1152
    assert block["decode_ms_per_token"]["leankernels"] > 0 and block["decode_ms_per_token"]["plain"] > 0
    assert 0 < block["params"]["active_fraction"] < 1


def test_demo_op_sections():
    r = run("demo", "--quick", "--device", "cpu", "--ops", "--no-block")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all checks passed" in r.stdout
    assert "[quant]" in r.stdout and "[block]" not in r.stdout


def test_demo_plot_needs_matplotlib_or_draws(tmp_path):
    png = tmp_path / "demo.png"
    r = run("demo", "--quick", "--device", "cpu", "--steps", "3", "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode != 0 and "matplotlib" in (r.stdout + r.stderr)
    else:
        assert r.returncode == 0, r.stdout + r.stderr
        assert png.stat().st_size > 0


def test_bad_subcommand_is_an_error():
    r = run("frobnicate")
    assert r.returncode != 0
