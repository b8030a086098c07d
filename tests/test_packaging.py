"""What each kind of user installs: an orchestrator gets the client without litellm; a worker gets
no development tools and no web framework; both get distinctive import names, and the old ones
until 0.3."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import textwrap
import zipfile
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
    probe = ("import importlib.util as u, llm_pool_client, llm_pool_contracts; print(llm_pool_client.LLMClient.__name__, "
             "[m for m in ('litellm', 'llm_pool_worker', 'worker', 'gateway') if u.find_spec(m)])")
    done = subprocess.run([python, "-W", "error", "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.split() == ["LLMClient", "[]"]
    old = "from client import LLMClient; import llm_pool_client, contracts; print(LLMClient is llm_pool_client.LLMClient)"
    done = subprocess.run([python, "-W", "default", "-c", old], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert done.stdout.strip() == "True"
    assert "'client' is now 'llm_pool_client'" in done.stderr and "'contracts' is now 'llm_pool_contracts'" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_worker_wheel_built_from_what_the_image_copies_holds_the_new_names_and_one_file_per_old_one(tmp_path: Path) -> None:
    source = tmp_path / "image"  # what deploy/Dockerfile's COPY lines put in the image, nothing more (no links)
    for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):  # `COPY a b ./` or `COPY folder ./folder`
            *names, target = line.split()[1:]
            for name in names:
                into = source / target if len(names) == 1 and not target.endswith("/") else source / target / name
                into.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, into)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)], check=True)
    [wheel] = tmp_path.glob("llm_pool_worker-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"llm_pool_worker/router.py", "llm_pool_worker/models.yaml", "llm_pool_contracts/messages.py",
            "llm_pool_client/enqueue.py", "llm_pool_gateway/app.py"} <= names
    old = {n for n in names if n.split("/")[0] in {"worker", "contracts", "client", "gateway"}}
    assert old == {f"{p}/__init__.py" for p in ("worker", "contracts", "client", "gateway")}  # no second copy of the code
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "llm-worker = llm_pool_worker.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], check=False, capture_output=True, text=True, cwd=cwd, timeout=60)


def test_the_old_import_names_are_the_new_packages_with_a_warning_at_the_importers_line(tmp_path: Path) -> None:
    done = run_python("""
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import worker.settings, contracts, gateway
            from client import LLMClient
        import llm_pool_worker.settings, llm_pool_contracts, llm_pool_client, llm_pool_gateway
        print(worker.settings.Settings is llm_pool_worker.settings.Settings, contracts.Job is llm_pool_contracts.Job,
              LLMClient is llm_pool_client.LLMClient, gateway is llm_pool_gateway)
        print(sorted((w.category.__name__, w.filename, w.lineno) for w in caught))
        print(llm_pool_worker.settings.__spec__.name)
    """, tmp_path)
    same, warned, spec = done.stdout.splitlines()
    assert same == "True True True True"
    assert warned == str([("DeprecationWarning", "<string>", 5)] * 3 + [("DeprecationWarning", "<string>", 6)])
    assert spec == "llm_pool_worker.settings"  # the module keeps its own name: reload and pickling work


def test_the_new_names_import_without_a_warning(tmp_path: Path) -> None:
    done = run_python("import llm_pool_worker.cli, llm_pool_worker.router, llm_pool_client, llm_pool_gateway.app", tmp_path,
                      "-W", "error")
    assert done.returncode == 0, done.stderr


def test_another_projects_package_of_an_old_name_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "__init__.py").write_text("")
    (tmp_path / "client" / "enqueue.py").write_text("MINE = True\n")
    done = run_python("import worker, client.enqueue; print(client.enqueue.MINE)", tmp_path)
    assert done.stdout.strip() == "True", done.stderr


def test_python_dash_m_worker_still_runs_with_a_warning(tmp_path: Path) -> None:
    done = run_python("import runpy, sys; sys.argv = ['worker', '--help']; runpy.run_module('worker', run_name='__main__')",
                      tmp_path, "-W", "default")
    assert done.stdout.startswith("usage: llm-worker run")
    assert "`python -m worker` is now `python -m llm_pool_worker`" in done.stderr
