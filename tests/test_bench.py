"""The benchmark runs every mode end to end on a handful of images and reports every field.

A smoke test only: it proves the harness works (real redis-server, real worker processes, the
naive Celery app, the ceiling subprocess) and that the JSON report has what BENCHMARKS.md
quotes. It asserts nothing about speed; throughput is measured by `python -m bench`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench.cli import bench_command
from tests.fixtures.services import require

pytestmark = pytest.mark.timeout(600)

MODE_FIELDS = ("items", "items_per_s", "latency_p50_ms", "latency_p95_ms", "batch_fill",
               "rows_per_shard", "peak_rss_mib", "worker_cpu_ms_per_item", "failed")
SMALL = ("tiny.images=6", "tiny.latency_jobs=2", "tiny.warmup_jobs=2", "tiny.repeats=1",
         "tiny.ceiling_batches=2,4", "tiny.ceiling_sweep_items=6", "tiny.ceiling_latency_items=2",
         "tiny.max_batch_items=4", "tiny.per_message=3", "tiny.max_inflight_messages=2",
         "tiny.naive_concurrency=2")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return run_bench(tmp_path_factory.mktemp("bench"), "--setting", "jpeg_draft=true")


def run_bench(tmp_path: Path, *extra: str) -> dict[str, object]:
    """`python -m bench` on the tiny model at the SMALL sizes; its JSON report."""
    require("redis-server")
    args = ["--models", "tiny", "--workdir", str(tmp_path / "work"),
            "--model-cache", str(tmp_path / "models"), "--json", str(tmp_path / "bench.json"),
            *extra]
    for override in SMALL:
        args += ["--set", override]
    result = CliRunner().invoke(bench_command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "b. dualstream" in result.output and "b/c" in result.output
    loaded: dict[str, object] = json.loads((tmp_path / "bench.json").read_text())
    return loaded


def test_every_mode_runs_and_the_report_has_every_field(report: dict[str, object]) -> None:
    assert isinstance(report, dict)
    for field in ("date", "command", "machine", "versions", "images", "models"):
        assert field in report
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu_model"]  # type: ignore[index]
    tiny = report["models"]["tiny"]  # type: ignore[index]
    assert set(tiny["summary"]) == {"ceiling", "dualstream", "naive"}
    for mode, summary in tiny["summary"].items():
        missing = [name for name in MODE_FIELDS if name not in summary]
        assert not missing, f"{mode} lacks {missing}"
        assert summary["items"] == 6 and summary["failed"] == 0
        assert summary["items_per_s"] > 0 and summary["peak_rss_mib"] > 0
        assert summary["latency_p50_ms"] is not None and summary["latency_p95_ms"] is not None
    assert report["settings"] == {"jpeg_draft": "true"}  # given to all three modes
    assert set(tiny["ratios"]) == {"b_over_a", "b_over_c", "b_over_bare_forward"}
    assert all(value is not None for value in tiny["ratios"].values())
    assert [t["target"].split()[0] for t in tiny["targets"]] == ["b/c", "b/a", "b"]


def test_batch_fill_is_read_from_the_committed_shards(report: dict[str, object]) -> None:
    modes = report["models"]["tiny"]["modes"]  # type: ignore[index]
    assert modes["naive"]["rows_per_shard"] == 1.0  # one task, one image, one shard
    streaming = modes["dualstream"]
    assert streaming["shards"] >= 2  # 6 images, at most 4 a batch
    assert 0 < streaming["batch_fill"] <= 1.0
    assert streaming["rows_per_shard"] * streaming["shards"] == pytest.approx(6)


@pytest.fixture(scope="module")
def text_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    return run_bench(tmp_path_factory.mktemp("bench-text"), "--modality", "text",
                     "--texts", "8", "--worker-processes", "2")


def test_text_mode_runs_every_mode_on_text_embedding_jobs(
        text_report: dict[str, object]) -> None:
    assert text_report["modality"] == "text" and "images" not in text_report
    assert text_report["texts"]["count"] == 8  # type: ignore[index]
    tiny = text_report["models"]["tiny"]  # type: ignore[index]
    assert set(tiny["summary"]) == {"ceiling", "dualstream", "naive"}
    for mode, summary in tiny["summary"].items():
        assert summary["items"] == 8 and summary["failed"] == 0, mode
        assert summary["items_per_s"] > 0
    assert all(value is not None for value in tiny["ratios"].values())
    assert [t["target"] for t in tiny["targets"]][:2] == ["b/c >= 10", "b/a >= 0.8"]
    streaming = tiny["modes"]["dualstream"]  # text shards, read from their manifests
    assert streaming["shards"] >= 2
    assert streaming["rows_per_shard"] * streaming["shards"] == pytest.approx(8)
    assert tiny["modes"]["naive"]["rows_per_shard"] == 1.0
    assert streaming["worker_settings"]["worker_processes"] == 2  # b's supervisor and children


def test_the_redis_cost_bench_counts_each_sides_commands_cpu_and_bytes(
        tmp_path: Path) -> None:
    """Smoke test of `python -m bench.redis_cost` at a small size: the report is complete and
    the counts are the shape of the protocol (one message per 8 jobs, every job's outcome
    written by the worker); it asserts no target."""
    from bench.redis_cost import measure, render

    require("redis-server")
    report = measure(jobs=32, per_message=8, labels=3, singles=4, workdir=tmp_path)
    assert report["producer"]["by_command"]["lpush"] == pytest.approx(1 / 8)
    assert report["worker"]["by_command"]["blmove"] >= 1 / 8  # and idle waits for more
    assert report["worker"]["commands_per_job"] >= 1
    assert report["redis_cpu_us_per_job"] > 0 and report["bytes_per_finished_job"] > 0
    assert report["done"] == 32
    assert report["singles"]["by_command"]["lpush"] == pytest.approx(1)
    assert report["singles"]["record_bytes_with_embedding"] > report["record_bytes"]
    assert "Redis CPU µs" in render(report, baseline=report)


def test_the_capacity_bench_replays_both_sides_recorded_traffic() -> None:
    """Smoke test of bench/redis_capacity.py at a small size: the producer's and the worker's
    requests are recorded from the real code (4 a message for the worker: fetch, reservation,
    commit, ack) and replayed without an error reply, writing every job's record again."""
    from bench.redis_capacity import measure

    require("redis-server")
    report = measure(jobs=256, per_message=32, labels=3, lanes=2, kept=1000)
    assert report["worker"]["requests"] == 4 * 256 // 32
    assert report["worker"]["usec_per_job_by_command"]["set"] > 0  # the jobs' records
    assert 0 < report["producer"]["requests"] <= 4
    assert report["redis_cpu_us_per_job"] > 0 and len(report["runs_us_per_job"]) == 3
