"""`caption-worker bench engine`: continuous batching against sequential generation, in one run.

Every run captions the same images: the bundled photographs, decoded once and
cycled, at 128 new tokens each with end of sequence ignored, so every image
costs the same work. The runs go one after another, each with the machine to itself:
1. sequential: one `openvino_genai.VLMPipeline.generate` call per image;
2. engine xN for N in 1, 8 and 32: the CaptionEngine with N requests in flight,
   a new one submitted as soon as one finishes.
Throughput is images (and generated tokens) over the run's wall time. Latency
is per image, from submission (or the generate call) to its result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.settings import load_command_settings
from worker.cli import EXIT_OK, EXIT_USAGE
from worker.benchmarks.stream import decode_photos
from worker.localrun import percentile

MAX_NEW_TOKENS = 128
CONCURRENCY = (1, 8, 32)

# Throughput at 32 in flight over sequential generation that docs/benchmarks.md reports against.
TARGET_RATIO_AT_32 = 4.0


@dataclass(frozen=True)
class RunFigures:
    """Throughput, latency and memory of one run."""

    images: int
    seconds: float
    generated_tokens: int
    p50_latency_seconds: float
    p99_latency_seconds: float
    # Peak resident memory of this process so far, which includes earlier runs.
    peak_rss_bytes: int

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds

    def to_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "seconds": round(self.seconds, 4),
            "images_per_second": round(self.images_per_second, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
            "p50_latency_seconds": round(self.p50_latency_seconds, 4),
            "p99_latency_seconds": round(self.p99_latency_seconds, 4),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def bench_engine_command(args: argparse.Namespace) -> int:
    """Run the sequential and batched runs, print their figures, and return the exit code."""
    settings = load_command_settings(args)
    if settings is None:
        return EXIT_USAGE
    if args.images < 1:
        print(f"invalid --images {args.images}: must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    # The engine must admit the largest concurrency measured, whatever the settings request.
    largest = max(CONCURRENCY)
    settings = settings.model_copy(
        update={
            "max_queued_requests": max(settings.max_queued_requests, largest),
            "max_num_seqs": max(settings.max_num_seqs, largest),
        }
    )

    runs: dict[str, RunFigures] = {"sequential": run_sequential(settings, args.images)}
    runs.update(run_batched(settings, args.images))
    report = build_report(settings, args.images, runs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return EXIT_OK


def benchmark_options() -> Any:
    from worker.engine import GenerationOptions

    return GenerationOptions(max_new_tokens=MAX_NEW_TOKENS, ignore_eos=True)


def run_sequential(settings: Any, count: int) -> RunFigures:
    """Caption `count` images with one VLMPipeline.generate call each."""
    import openvino as ov
    import openvino_genai

    from worker.engine import build_generation_config, device_properties, read_image_side, render_prompt

    pipeline = openvino_genai.VLMPipeline(
        str(settings.model), settings.device, **device_properties(None, settings.device, settings.inference_threads)
    )
    tokenizer = pipeline.get_tokenizer()
    prompt = render_prompt(tokenizer, settings.system_prompt, settings.prompt)
    eos_token_id = int(tokenizer.get_eos_token_id())
    config = build_generation_config(benchmark_options(), eos_token_id, {eos_token_id})
    images = [ov.Tensor(pixels[np.newaxis]) for pixels in decode_photos(settings, read_image_side(settings.model))]

    # One untimed call, so that first-inference compilation does not count.
    pipeline.generate(prompt, images=[images[0]], generation_config=config)

    latencies = []
    tokens = 0
    started = time.perf_counter()
    for index in range(count):
        call_started = time.perf_counter()
        result = pipeline.generate(prompt, images=[images[index % len(images)]], generation_config=config)
        latencies.append(time.perf_counter() - call_started)
        tokens += int(result.perf_metrics.get_num_generated_tokens())
    seconds = time.perf_counter() - started
    del pipeline
    return _figures(count, seconds, tokens, latencies)


def run_batched(settings: Any, count: int) -> dict[str, RunFigures]:
    """Caption `count` images through one CaptionEngine at each concurrency in CONCURRENCY."""
    from worker.engine import CaptionEngine

    engine = CaptionEngine.from_settings(settings, None)
    engine.start()
    try:
        engine.warm_up()
        images = decode_photos(settings, engine.image_side)
        return {str(in_flight): run_closed_loop(engine, images, in_flight, count) for in_flight in CONCURRENCY}
    finally:
        engine.close(30.0)


def run_closed_loop(engine: Any, images: list[np.ndarray], in_flight: int, count: int) -> RunFigures:
    """Caption `count` images keeping `in_flight` requests in the engine, a new one per finished one."""
    options = benchmark_options()
    submitted_at: dict[Future, float] = {}
    latencies: list[float] = []
    tokens = 0
    submitted = 0
    started = time.perf_counter()
    while submitted < count or submitted_at:
        while submitted < count and len(submitted_at) < in_flight:
            future = engine.submit(images[submitted % len(images)], None, options)
            submitted_at[future] = time.perf_counter()
            submitted += 1
        done, _ = wait(list(submitted_at), return_when=FIRST_COMPLETED)
        finished_at = time.perf_counter()
        for future in done:
            # A failed caption fails the benchmark, because every run must do the same work.
            tokens += future.result().generated_tokens
            latencies.append(finished_at - submitted_at.pop(future))
    seconds = time.perf_counter() - started
    return _figures(count, seconds, tokens, latencies)


def _figures(count: int, seconds: float, tokens: int, latencies: list[float]) -> RunFigures:
    return RunFigures(
        images=count,
        seconds=seconds,
        generated_tokens=tokens,
        p50_latency_seconds=percentile(latencies, 50),
        p99_latency_seconds=percentile(latencies, 99),
        peak_rss_bytes=peak_rss_bytes(),
    )


def peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_report(settings: Any, count: int, runs: dict[str, RunFigures]) -> dict[str, Any]:
    sequential = runs["sequential"].images_per_second
    return {
        "benchmark": "engine",
        "model": settings.model.name,
        "device": settings.device,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "images": count,
        "max_new_tokens": MAX_NEW_TOKENS,
        "ignore_eos": True,
        "runs": {name: figures.to_dict() for name, figures in runs.items()},
        "ratio_vs_sequential": {
            str(in_flight): round(runs[str(in_flight)].images_per_second / sequential, 2) for in_flight in CONCURRENCY
        },
        "target_ratio_at_32": TARGET_RATIO_AT_32,
    }


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"bench engine: {report['images']} images x {report['max_new_tokens']} new tokens (end of sequence ignored), "
        f"model {report['model']}, device {report['device']}, {report['cpu_count']} CPUs",
        f"{'run':<12}{'images/s':>10}{'tokens/s':>10}{'p50 s':>9}{'p99 s':>9}{'peak RSS MiB':>14}{'vs seq':>8}",
    ]
    for name, figures in report["runs"].items():
        label = name if name == "sequential" else f"engine x{name}"
        ratio = report["ratio_vs_sequential"].get(name, 1.0)
        lines.append(
            f"{label:<12}{figures['images_per_second']:>10.2f}{figures['tokens_per_second']:>10.1f}"
            f"{figures['p50_latency_seconds']:>9.3f}{figures['p99_latency_seconds']:>9.3f}"
            f"{figures['peak_rss_bytes'] / 2**20:>14.0f}{ratio:>7.2f}x"
        )
    ratio_at_32 = report["ratio_vs_sequential"]["32"]
    verdict = "met" if ratio_at_32 >= report["target_ratio_at_32"] else "missed"
    lines.append(f"target >= {report['target_ratio_at_32']:g}x sequential at 32 in flight: {verdict} ({ratio_at_32:.2f}x)")
    return "\n".join(lines)
