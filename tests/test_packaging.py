"""What each kind of user installs: an orchestrator gets the client without litellm; a worker gets
no development tools and no web framework."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"matplotlib", "aiohttp", "pyinstrument", "fastapi", "uvicorn", "pytest"}


def test_a_worker_installs_no_development_tool_and_no_web_framework() -> None:
    required = importlib.metadata.requires("llm-pool-worker") or []
    always = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower()
              for r in required if "extra ==" not in r}
    assert "litellm" in always and not always & TOOLS


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_client_distribution_brings_no_litellm(tmp_path: Path) -> None:
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    project = ROOT / "packaging" / "llm-pool-client"
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(project)], check=True, cwd=ROOT)
    finally:  # setuptools builds in the tree; a build/ left there would carry stale files into a later wheel
        shutil.rmtree(project / "build", ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    [wheel] = wheels.glob("llm_pool_client-*.whl")
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True)
    probe = ("import importlib.util as u, client, contracts; "
             "print(client.LLMClient.__name__, [m for m in ('litellm', 'worker', 'gateway') if u.find_spec(m)])")
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.split() == ["LLMClient", "[]"]
