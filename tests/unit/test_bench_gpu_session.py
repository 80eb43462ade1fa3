"""bench/gpu_session.sh runs its stages in the order named (each its own function), as a dry run
with `echo` for Python: no GPU, no benchmark runs, only the script's own control flow."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_session.sh"


def _dry_run(tmp_path: Path, *stages: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": "echo", "BUDGET_S": "580"}
    return subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out"), *stages],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip


def _started(out: str) -> list[str]:
    return re.findall(r"^== (\w+)[ :]", out, re.M)


def test_stages_run_in_the_order_named(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path, "mlm_head", "env", "attention", "rtd_512")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _started(proc.stdout) == ["mlm_head", "env", "attention", "rtd_512"]


def test_the_default_list_names_only_stages_that_exist(tmp_path: Path) -> None:
    default = re.search(r"^stages=\$\{\*:-([^}]*)\}$", SCRIPT.read_text(), re.M)
    assert default is not None
    proc = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _started(proc.stdout) == default.group(1).split()


def test_an_unknown_stage_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path, "env", "rtd_521")
    assert proc.returncode == 1
    assert "== rtd_521: no such stage" in proc.stdout
    assert "not clean: rtd_521(unknown)" in proc.stdout


def test_a_stage_named_twice_runs_once(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path, "env", "attention", "env")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.findall(r"^== (\w+) \(limit", proc.stdout, re.M) == ["env", "attention"]
    assert "== env: named again, not rerun" in proc.stdout
