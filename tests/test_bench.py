"""The benchmark is a script, not a test; this only keeps it from rotting."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_quick_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=280, cwd=ROOT, env={**os.environ, "CI": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for figure in ("baseline", "worker", "ratios", "added_ttft_ms", "gateway", "scale_out_stream50_jobs_per_s", "memory",
                   "startup_to_first_job_s"):
        assert figure in results
    assert results["worker"]["stream200_tokens_per_s"] > 0
    assert "tokens/s (200-tok streams)" in done.stdout
