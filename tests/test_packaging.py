"""`pip install .` (not editable) ships what a user needs away from the checkout: the JSON Schemas, the example jobs,
every room of the pipeline and the runtimes' own-code modules; a job runs from the installed package."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import tiny_job

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, unpacked where an installed package would be."""
    source = tmp_path_factory.mktemp("source") / "bitalloc"  # a copy: setuptools builds in the source tree
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "runs", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".hypothesis"))
    wheels = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "would be ignored" not in done.stderr  # every data folder is declared: no setuptools warnings
    (wheel,) = wheels.glob("bitalloc-*.whl")
    site = tmp_path_factory.mktemp("site")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_the_wheel_ships_schemas_examples_and_every_room(installed):
    pkg = installed / "bitalloc"
    assert {p.name for p in (pkg / "schemas").glob("*.json")} == {"front.schema.json", "config.schema.json"}
    assert {p.name for p in (pkg / "jobs" / "examples").glob("*.yaml")} >= {"smollm2.yaml", "smollm2-llamacpp.yaml"}
    for room in ("quantizers", "quantizers/gguf", "runtimes", "search", "sensitivity", "kernels", "dashboards", "jobs"):
        assert (pkg / room / "__init__.py").is_file(), room
    for runtime in ("llamacpp", "gptqmodel", "llmcompressor", "hqq"):
        assert (pkg / "runtimes" / runtime / "venv.py").is_file(), runtime
    assert (pkg / "runtimes" / "venv.py").is_file()


def test_no_folder_or_script_of_the_checkout_shadows_an_installed_package():
    """The checkout's root is on sys.path under `python -m` and `-c` and in Ray workers started there, a script's folder
    when it runs: a folder or script named like an installed distribution's package would be imported in its place
    (a root `kernels/` once broke every transformers model once transformers began importing Hugging Face's)."""
    installed = set(importlib.metadata.packages_distributions()) - {"bitalloc"}
    names = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for folder in ("benchmarks", "tests") for p in (ROOT / folder).glob("*.py")}
    assert not names & installed, sorted(names & installed)


def test_a_job_runs_from_the_installed_package(installed, tiny_llama, text_dir, tmp_path):
    """Run from a folder outside the checkout with the installed copy first on the path: the job runs, its results
    validate against the shipped schemas, and `bitalloc schema` prints them."""
    out = tmp_path / "out"
    spec = tiny_job(tiny_llama, text_dir, out, search={"budgets": [4.0], "points": 1}, tracking={"enabled": False})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = dict(os.environ, PYTHONPATH=str(installed))
    where = subprocess.run([sys.executable, "-c", "import bitalloc, bitalloc.runtimes; print(bitalloc.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    done = subprocess.run([sys.executable, "-m", "bitalloc.cli", "run", "job.yaml", "--workers", "0"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "front.json").is_file() and list((out / "configs").glob("*.json"))
    schema = subprocess.run([sys.executable, "-m", "bitalloc.cli", "schema", "front"], capture_output=True, text=True,
                            env=env, cwd=tmp_path)
    assert schema.returncode == 0 and '"bitalloc.front/2"' in schema.stdout
