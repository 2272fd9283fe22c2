"""What the tests read from docker/*.Dockerfile: the images, their user and their environment.

A Dockerfile is read as its instructions (continuation lines joined, comments dropped); no
Docker engine is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {
    "dualstream-worker": REPO / "docker" / "worker.Dockerfile",
    "dualstream-producer": REPO / "docker" / "producer.Dockerfile",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    text = "\n".join(line for line in path.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def final_user(path: Path) -> tuple[int, int]:
    """(uid, gid) of the last USER instruction, which must be numeric."""
    users = [args for word, args in instructions(path) if word == "USER"]
    uid, _, gid = users[-1].partition(":")
    return int(uid), int(gid or uid)


def final_env(path: Path) -> dict[str, str]:
    """The ENV of the last stage (KEY=value pairs)."""
    stages: list[list[tuple[str, str]]] = [[]]
    for word, args in instructions(path):
        if word == "FROM":
            stages.append([])
        stages[-1].append((word, args))
    env: dict[str, str] = {}
    for word, args in stages[-1]:
        if word == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
    return env


def base_images(path: Path) -> list[str]:
    """Every FROM image, with ARG defaults substituted; stage names are left out."""
    args = {}
    for word, rest in instructions(path):
        if word == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    stages: set[str] = set()
    images = []
    for word, rest in instructions(path):
        if word != "FROM":
            continue
        parts = [part for part in rest.split() if not part.startswith("--")]
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), parts[0])
        if image not in stages:
            images.append(image)
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    return images


def image_is_pinned(image: str) -> bool:
    """A digest, or an explicit tag other than `latest`."""
    if "@sha256:" in image:
        return True
    name = image.rsplit("/", 1)[-1]
    return ":" in name and name.split(":", 1)[1] not in ("", "latest")
