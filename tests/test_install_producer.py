"""A producer-only install: the wheel without extras, in a fresh virtualenv, against a real
redis-server and a real worker (from the development environment) that finishes its jobs.

The producer side must work with none of the worker's libraries: the check runs inside the
process that ran every command, after they ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.services import REPO, worker_env
from tests.images import jpeg_bytes

pytestmark = pytest.mark.timeout(900)
SOURCES = ["dualstream", "control", "producer", "schemas", "worker", "pyproject.toml",
           "README.md"]
HEAVY = ["torch", "torchvision", "transformers", "open_clip", "numpy", "PIL", "pyarrow"]

# Runs in the fresh virtualenv: every producer command through the CLI, in one process.
DRIVER = r"""
import contextlib, io, json, sys, time
from dualstream.cli import cli

def run(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(list(args), standalone_mode=False)
    return out.getvalue().strip()

folder, image = sys.argv[1], sys.argv[2]
report = {
    "text": run("submit", "--text", "a photo of a cat"),
    "image": run("submit", "--image", image, "--labels", "cat,dog"),
    "bulk": run("bulk", folder, "--per-message", "2"),
}
run_id = report["bulk"].split(":")[0].removeprefix("run ")
deadline = time.monotonic() + 120
while json.loads(run("status", run_id)).get("done", 0) < 3 and time.monotonic() < deadline:
    time.sleep(0.2)
report["status"] = json.loads(run("status", run_id))
report["results"] = [json.loads(line) for line in run("results", run_id).splitlines()]
report["waited"] = json.loads(run("submit", "--text", "a dog", "--wait", "60"))
report["text_status"] = run("status", report["text"])
report["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in %(heavy)r)
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def producer_venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, a virtualenv with it installed without extras)."""
    root = tmp_path_factory.mktemp("producer-install")
    source = root / "src"
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)  # type: ignore[operator]
    shutil.copytree(REPO / "tests", source / "tests")  # present, and must stay out of the wheel
    shutil.copytree(REPO / "bench", source / "bench")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(root / "dist"), str(source)], check=True)
    [wheel] = (root / "dist").glob("dualstream-*.whl")
    env_dir = root / "venv"
    venv.create(env_dir, with_pip=True)
    subprocess.run([str(env_dir / "bin" / "pip"), "install", "-q", str(wheel)], check=True)
    return wheel, env_dir


def test_the_wheel_holds_the_packages_and_no_tests_or_benchmark(
        producer_venv: tuple[Path, Path]) -> None:
    wheel, _ = producer_venv
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    packages = {top for top in tops if not top.endswith((".dist-info", ".data"))}
    assert packages == {"dualstream", "control", "producer", "schemas", "worker"}


def test_the_base_install_has_no_model_libraries(producer_venv: tuple[Path, Path]) -> None:
    _, env_dir = producer_venv
    probe = ("import importlib.util, json; print(json.dumps([m for m in "
             f"{HEAVY!r} if importlib.util.find_spec(m)]))")
    found = subprocess.run([str(env_dir / "bin" / "python"), "-c", probe], check=True,
                           capture_output=True, text=True).stdout
    assert json.loads(found) == []


@pytest.mark.parametrize("install", ["producer-only", "development"])
def test_producer_commands_work_and_import_no_model_library(
        install: str, producer_venv: tuple[Path, Path], redis_url: str, tmp_path: Path,
        tiny_model_dirs: dict[str, str], start_worker: Any) -> None:
    """In the base install, and in the development one, where the model libraries are
    installed, so that an import of one by the producer side would show."""
    _, env_dir = producer_venv
    model = tiny_model_dirs["openclip"]
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    image = tmp_path / "single.jpg"
    image.write_bytes(jpeg_bytes(7))
    start_worker(redis_url=redis_url, model=model, local_root=str(tmp_path),
                 output_uri=(tmp_path / "out").as_uri(), health_dir=str(tmp_path / "health"))

    env = worker_env(redis_url=redis_url, model=model)
    python = sys.executable
    if install == "producer-only":
        del env["PYTHONPATH"]  # only what the wheel installed
        python = str(env_dir / "bin" / "python")
        version = subprocess.run([str(env_dir / "bin" / "dualstream"), "--version"], env=env,
                                 capture_output=True, text=True, check=True, cwd=tmp_path)
        assert version.stdout.startswith("dualstream, version ")
    finished = subprocess.run(
        [python, "-c", DRIVER % {"heavy": HEAVY}, str(folder), str(image)], env=env,
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])

    assert report["heavy"] == [], "the producer imported a model library"
    assert ": 3 jobs listed, 3 newly queued, 3 in all" in report["bulk"], report["bulk"]
    assert report["status"]["queued"] == 3 and report["status"]["done"] == 3
    assert report["status"]["finished"] and report["status"]["failed"] == 0
    assert report["results"] == [report["status"]]  # the counters, then no failed job
    assert report["waited"]["status"] == "done" and len(report["waited"]["embedding"]) > 0
    assert report["text_status"] in ("queued", "running", "done")


def test_a_worker_command_without_the_worker_extra_says_so_in_one_line(
        producer_venv: tuple[Path, Path], tmp_path: Path) -> None:
    _, env_dir = producer_venv
    env = worker_env(model="some/model")
    del env["PYTHONPATH"]
    for command in (["worker"], ["tiny-model", "--family", "openclip", "--out", "x"]):
        finished = subprocess.run([str(env_dir / "bin" / "dualstream"), *command], env=env,
                                  capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert finished.returncode == 1
        [line] = finished.stderr.strip().splitlines()
        assert line.startswith("dualstream: this needs the worker extra (")
        assert line.endswith("pip install 'dualstream[worker]'")


def test_the_api_without_the_search_extra_has_no_searcher_and_keeps_the_route(
        producer_venv: tuple[Path, Path], tmp_path: Path) -> None:
    """`dualstream api` in the base install: no numpy or pyarrow, so no searcher, and the
    search route is there to answer 501 (tests/test_api_search.py checks the answer)."""
    _, env_dir = producer_venv
    env = worker_env(redis_url="redis://127.0.0.1:1/0")  # never connected to
    del env["PYTHONPATH"]
    probe = ("import json, sys; from dualstream.serve import searcher; "
             "from producer.api import create_app; from producer.client import Client; "
             "from schemas.settings import Settings; s = Settings(); c = Client(s); "
             "print(json.dumps([searcher(s, c) is None, '/v1/search' in "
             "create_app(s, c).openapi()['paths'], sorted(m for m in sys.modules if "
             f"m.split('.')[0] in {HEAVY!r})]))")
    found = subprocess.run([str(env_dir / "bin" / "python"), "-c", probe], env=env,
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert json.loads(found) == [True, True, []]
