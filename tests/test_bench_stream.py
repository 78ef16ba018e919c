"""`caption-worker bench stream` on the local stack with a handful of events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.benchmarks.stream import StreamPhaseResult, cores_used, summarize_stream
from worker.localrun import OutputRecord, read_proc_cpu_seconds

ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_SECONDS = 540

REPORT_KEYS = {
    "events",
    "naive_events",
    "stream_images_per_second",
    "engine_images_per_second",
    "naive_images_per_second",
    "stream_vs_engine",
    "stream_vs_naive",
    "latency_p50_seconds",
    "latency_p99_seconds",
    "peak_rss_bytes",
    "rss_growth",
    "stream_captions",
    "stream_dead_lettered",
    "stream_cpu_cores",
    "machine",
}


def caption_record(partition: int, offset: int, timestamp: float) -> OutputRecord:
    value = {"caption": "x", "source": {"topic": "in", "partition": partition, "offset": offset}}
    return OutputRecord(topic="out", value=value, timestamp=timestamp)


def test_rss_growth_between_window_ends() -> None:
    records = [caption_record(0, i, 100.0 + i) for i in range(10)]
    sent_at = {(0, i): 99.5 + i for i in range(10)}
    samples = [(2, 1000), (5, 1100), (7, 1200), (10, 1210)]

    result = summarize_stream(records, sent_at, samples, peak_rss=2000, events=10)

    assert result.rss_window_records == 5
    assert result.rss_first_window_bytes == 1100
    assert result.rss_last_window_bytes == 1210
    assert result.rss_growth == pytest.approx(0.1)
    assert result.latencies == [pytest.approx(0.5)] * 10
    assert result.seconds == pytest.approx(109.0 - 99.5)


def test_cores_used_skips_gone_processes() -> None:
    pid = os.getpid()
    before = {"this": read_proc_cpu_seconds(pid), "gone": 1.0}
    sum(range(2_000_000))  # spend some CPU in this process

    cores = cores_used({"this": pid, "gone": 2**22 + 1}, before, seconds=1.0)

    assert set(cores) == {"this"}
    assert cores["this"] > 0


def test_rss_growth_is_unknown_without_samples() -> None:
    assert StreamPhaseResult(images=1, seconds=1.0).rss_growth is None


@pytest.mark.slow
def test_bench_stream_json_reports_every_figure(local_stack, worker_env, tiny_model_dir, tmp_path) -> None:
    plot = tmp_path / "latency.png"
    command = [
        sys.executable, "-m", "worker", "bench", "stream", "--json",
        "--events", "40", "--naive-events", "4", "--max-new-tokens", "8", "--plot", str(plot),
    ]
    completed = subprocess.run(
        command, cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_SECONDS
    )

    assert completed.returncode == 0, f"bench stream failed:\n{completed.stdout}\n{completed.stderr}"
    report = json.loads(completed.stdout)
    assert REPORT_KEYS <= report.keys()
    assert report["events"] == 40
    assert report["naive_events"] == 4
    assert report["stream_captions"] == 40
    assert report["stream_dead_lettered"] == 0
    for name in ("stream_images_per_second", "engine_images_per_second", "naive_images_per_second"):
        assert report[name] > 0, name
    assert report["stream_vs_engine"] == pytest.approx(
        report["stream_images_per_second"] / report["engine_images_per_second"]
    )
    assert report["stream_vs_naive"] > 0
    assert 0 < report["latency_p50_seconds"] <= report["latency_p99_seconds"]
    assert report["peak_rss_bytes"] > 0
    assert report["rss_growth"] > -1
    assert report["stream_cpu_cores"]["worker"] > 0
    assert report["stream_cpu_cores"]["s3_server"] > 0
    assert plot.read_bytes().startswith(b"\x89PNG")
