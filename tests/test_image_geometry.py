"""No image shape costs more than a bounded time and memory, for any family or decoder.

A 1×10,000 PNG passes the pixel and side limits, and OpenCLIP's (and AltCLIP's) shortest-side
resize would make a 224×2,240,000 intermediate of it: about 16 s and 2.2 GB. The aspect-ratio
limit (`ImageLimits.max_aspect_ratio`, 1:100) refuses it from the header as `bad_geometry`;
the thinnest images it accepts cost a 224×22,400 intermediate at most.

Time is the process's CPU time (every thread's), so that waiting for a core on a loaded
machine does not count. Memory is the process's resident set, sampled every few milliseconds
while one image is prepared and embedded, less what it was before: it sees Pillow's and
torch's C allocations, which tracemalloc does not. The bounds are loose enough for a loaded
2-core machine and an order of magnitude under the blow-up they guard against.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest
from PIL import Image

from schemas.errors import ErrorCode, ImageError
from schemas.settings import Settings
from tests.fixtures.bad_images import encode, gradient
from worker.decode import DEFAULT_LIMITS
from worker.prepare import ImagePreparer

FAMILIES = ("align", "openclip", "altclip")
REFUSED = [(1, 10_000), (10_000, 1), (1, 101)]
THINNEST_ACCEPTED = [(1, 100), (100, 1), (200, 20_000), (20_000, 200)]
MAX_SECONDS = 5.0
MAX_RSS_GROWTH_MB = 300


@contextmanager
def peak_rss_growth_mb() -> Iterator[Callable[[], float]]:
    """Yields a function that gives the peak RSS growth (MB) seen inside the block."""
    process = psutil.Process()
    baseline = process.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield lambda: (peak - baseline) / 2**20
    finally:
        done.set()
        sampler.join()
        peak = max(peak, process.memory_info().rss)


def image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    return encode(gradient(size), fmt)


def embed_one(encoder: Any, settings: Settings, data: bytes) -> ErrorCode | None:
    """Prepare and embed one image the worker's way; its error code, or None when done."""
    try:
        pixels = ImagePreparer(settings, encoder).pixels(data)
    except ImageError as error:
        return error.code
    assert encoder.encode_images(pixels[None]).shape == (1, encoder.embed_dim)
    return None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("decoder", "fmt"), [("pil", "PNG"), ("pil", "JPEG"), ("torch", "JPEG")])
@pytest.mark.parametrize("size", REFUSED + THINNEST_ACCEPTED, ids=lambda s: f"{s[0]}x{s[1]}")
def test_no_shape_costs_more_than_a_bounded_time_and_memory(
        tiny_encoders: dict[str, Any], family: str, decoder: str, fmt: str,
        size: tuple[int, int]) -> None:
    encoder = tiny_encoders[family]
    settings = Settings(image_decoder=decoder)  # type: ignore[arg-type]
    data = image_bytes(size, fmt)
    embed_one(encoder, settings, image_bytes((64, 48), fmt))  # warm: lazy imports, first calls
    # CPU time, not wall time: a loaded machine makes this process wait, not work more.
    started = time.process_time()
    with peak_rss_growth_mb() as growth:
        code = embed_one(encoder, settings, data)
    seconds = time.process_time() - started
    report = f"{family} {decoder} {fmt} {size}: {seconds:.2f} s CPU, +{growth():.0f} MB RSS"
    print(report)
    assert code == (ErrorCode.BAD_GEOMETRY if size in REFUSED else None), report
    assert seconds < MAX_SECONDS, report
    assert growth() < MAX_RSS_GROWTH_MB, report


def test_the_bound_is_one_side_at_most_100_times_the_other() -> None:
    assert DEFAULT_LIMITS.max_aspect_ratio == 100


def test_the_refusal_says_which_shape_and_why(tiny_encoders: dict[str, Any]) -> None:
    data = encode(Image.new("L", (1, 10_000)), "PNG")
    with pytest.raises(ImageError) as raised:
        ImagePreparer(Settings(), tiny_encoders["openclip"]).pixels(data)
    assert raised.value.code == ErrorCode.BAD_GEOMETRY
    assert "1x10000" in raised.value.message and "100 times" in raised.value.message
