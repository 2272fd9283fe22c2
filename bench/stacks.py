"""Where a worker's time goes: py-spy's raw (collapsed) stacks, summarised.

`python -m bench --profile gil` samples the worker with py-spy during the throughput phase,
recording only stacks that hold the GIL (`--gil`); `cpu` records every running stack. The
summary gives each thread's share of the samples (by thread name, numbers stripped) and the
functions with the largest inclusive share, which is enough to see which stage holds the
interpreter. py-spy is optional (`pip install py-spy`); without it the profile is skipped.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

_THREAD = re.compile(r"^thread \(\w+\): ?(.*)$")
_DIGITS = re.compile(r"[-_]?\d+")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


class Profiler:
    """py-spy attached to a process until `stop()`; a no-op when py-spy is missing."""

    def __init__(self, pid: int, output: Path, kind: str, rate: int = 250) -> None:
        self.output = output
        binary = shutil.which("py-spy")
        self.process: subprocess.Popen[bytes] | None = None
        if binary is None:
            return
        args = [binary, "record", "-p", str(pid), "-f", "raw", "-o", str(output),
                "-r", str(rate), "-t", "--nonblocking"]
        if kind == "gil":
            args.append("--gil")
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # let it attach before the measured phase starts

    def stop(self) -> dict[str, Any] | None:
        if self.process is None:
            return None
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return None
        return summarise(self.output) if self.output.is_file() else None


def _thread_name(raw: str) -> str:
    return _DIGITS.sub("", raw).strip() or "main"


def summarise(path: Path, top: int = 25) -> dict[str, Any]:
    """{samples, threads: {name: share}, inclusive: [(function, share)], self: [...]}."""
    threads: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        name = "?"
        if frames and (match := _THREAD.match(frames[0])):
            name = _thread_name(match.group(1))
            frames = frames[1:]
        functions = [_short(frame) for frame in frames]
        total += count
        threads[name] += count
        for function in set(functions):
            inclusive[function] += count
        if functions:
            own[functions[-1]] += count
    share = (lambda n: round(n / total, 4)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "threads": {name: share(n) for name, n in threads.most_common()},
        "inclusive": [(f, share(n)) for f, n in inclusive.most_common(top)],
        "self": [(f, share(n)) for f, n in own.most_common(top)],
    }


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    function, filename = match.groups()
    return f"{function} ({filename})"
