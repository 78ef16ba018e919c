"""`caption-worker bench stream`: the whole stream against the engine alone and a naive consumer, in one run.

All three caption the bundled photographs, cycled, at the same max-new-tokens
with end of sequence ignored, so every image costs the same. They run one
after another, never at once, so each has the machine to itself:
1. engine alone: the photographs decoded once and held in memory, N submissions to a
   CaptionEngine with the worker's scheduler settings and at most max-in-flight at once;
2. stream: `caption-worker run` as a child process consumes N Amazon S3 event
   notifications from the local broker, fetches from the local S3 server, captions and
   publishes. A closed-loop producer keeps at most twice max-in-flight events
   outstanding. So the worker always has input, and no backlog inflates latency;
3. naive: one message at a time (poll, fetch, decode, VLMPipeline.generate, produce and
   flush, synchronous commit) on the first --naive-events events.
Throughput is images over the seconds from the first event (or submission) to the
last record (or result). End-to-end latency is from an event's broker timestamp to
its output record's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import numpy as np

from worker.errors import EngineFull
from worker.localrun import (
    EventProducer,
    LocalRunError,
    LocalStack,
    OutputReader,
    OutputRecord,
    StackEndpoints,
    UploadedObject,
    RunNames,
    WorkerProcess,
    client_config,
    create_topics,
    delete_bucket,
    delete_topics,
    make_s3_client,
    percentile,
    photo_paths,
    read_machine_busy_seconds,
    read_proc_cpu_seconds,
    read_proc_status_bytes,
    s3_event_notification,
    start_worker,
    upload_photo,
)
from worker.logs import configure_logging
from worker.settings import Settings, SettingsError, load_settings

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
# A KV cache that grows on demand, unless --cache-size is given. A fixed pool becomes resident
# block by block as captions first write to it: 48 KiB per caption with the tiny model, until the
# 2 GB default is full after about 44,000 captions. That growth would hide a real leak.
DEFAULT_CACHE_SIZE = 0
DEFAULT_NAIVE_EVENTS = 100
RSS_WINDOW_RECORDS = 1000
RSS_SAMPLE_SECONDS = 0.5
READY_TIMEOUT_SECONDS = 300.0
WORKER_STOP_TIMEOUT_SECONDS = 120.0
INPUT_PARTITIONS = 4

# Targets that docs/benchmarks.md reports against.
TARGET_STREAM_VS_ENGINE = 0.8
TARGET_STREAM_VS_NAIVE = 5.0
TARGET_RSS_GROWTH = 0.05


@dataclass
class PhaseResult:
    """Throughput and latency of one phase."""

    images: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    rss_first_window_bytes: int | None = None
    rss_last_window_bytes: int | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_first_window_bytes or self.rss_last_window_bytes is None:
            return None
        return (self.rss_last_window_bytes - self.rss_first_window_bytes) / self.rss_first_window_bytes


@dataclass
class EnginePhaseResult(PhaseResult):
    """The engine phase, with the cost of decoding that the engine alone does not pay in its timed part."""

    decode_seconds_per_image: float = 0.0


@dataclass
class StreamPhaseResult(PhaseResult):
    """The stream phase, with the worker's memory and per-record latency over time."""

    dead_lettered: int = 0
    peak_rss_bytes: int | None = None
    rss_window_records: int = 0
    # (records read, RSS bytes) samples of the worker process, taken every RSS_SAMPLE_SECONDS.
    rss_samples: list[tuple[int, int]] = field(default_factory=list)
    # (seconds since the first event, end-to-end latency in seconds) per caption record, for the plot.
    latency_points: list[tuple[float, float]] = field(default_factory=list)
    # The worker's own `timings` of each caption record (fetch, decode, queue, ...), by name.
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)
    # Mean cores that each process, and the whole machine, used while the events ran.
    cpu_cores: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- phase 1: engine alone


def decode_photos(settings: Settings, image_side: int) -> list[np.ndarray]:
    """Decode the bundled photographs with the worker's limits and the model's input side."""
    from worker.images import ImageLimits, decode_image

    limits = ImageLimits.from_settings(settings, image_side)
    return [decode_image(path.read_bytes(), limits).pixels for path in photo_paths()]


def run_engine_phase(settings: Settings, events: int) -> EnginePhaseResult:
    """Caption `events` in-memory photographs with at most max-in-flight submitted at once."""
    from worker.engine import CaptionEngine, GenerationOptions

    engine = CaptionEngine.from_settings(settings, None)
    engine.start()
    try:
        engine.warm_up()
        decode_started = time.perf_counter()
        images = decode_photos(settings, engine.image_side)
        decode_seconds = (time.perf_counter() - decode_started) / len(images)
        options = GenerationOptions.from_settings(settings)
        pending: dict[concurrent.futures.Future, float] = {}
        latencies: list[float] = []
        submitted = 0
        # This process's RSS at the end of the first and of the last window, as for the worker.
        window = min(RSS_WINDOW_RECORDS, events // 2)
        rss_first_window: int | None = None
        started = time.perf_counter()
        while submitted < events or pending:
            while submitted < events and len(pending) < settings.max_in_flight:
                try:
                    future = engine.submit(images[submitted % len(images)], None, options)
                except EngineFull:
                    break
                pending[future] = time.perf_counter()
                submitted += 1
            done, _ = concurrent.futures.wait(pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
            finished_at = time.perf_counter()
            for future in done:
                future.result()  # a failed caption fails the benchmark: all three must do the same work
                latencies.append(finished_at - pending.pop(future))
            if len(latencies) >= window and rss_first_window is None:
                rss_first_window = read_proc_status_bytes(os.getpid(), "VmRSS")
        seconds = time.perf_counter() - started
        result = EnginePhaseResult(events, seconds, latencies, decode_seconds_per_image=decode_seconds)
        result.rss_first_window_bytes = rss_first_window
        result.rss_last_window_bytes = read_proc_status_bytes(os.getpid(), "VmRSS")
        return result
    finally:
        engine.close(30.0)


# ---------------------------------------------------------------- phase 2: the stream


def run_stream_phase(
    args: argparse.Namespace,
    settings: Settings,
    endpoints: StackEndpoints,
    names: RunNames,
    objects: list[UploadedObject],
    events: int,
    log_dir: Path,
    stack_pids: dict[str, int],
) -> StreamPhaseResult:
    """Run the worker process on `events` events published by a closed-loop producer; see the module docstring.

    `stack_pids` names the stack's processes (S3 server, broker) whose CPU use is reported next to the worker's.
    """
    extra = {
        "CAPTION_MAX_NEW_TOKENS": str(settings.max_new_tokens),
        "CAPTION_IGNORE_EOS": "true",
        "CAPTION_CACHE_SIZE": str(settings.cache_size),
    }
    worker = start_worker(args, endpoints, names, log_dir, extra)
    producer: EventProducer | None = None
    try:
        worker.wait_ready(READY_TIMEOUT_SECONDS)
        producer = EventProducer(endpoints.kafka_bootstrap, names.input_topic)
        reader = OutputReader(endpoints.kafka_bootstrap, [names.output_topic, names.dlq_topic])
        pids = {"worker": worker.pid, **stack_pids}
        engine_pid = worker.engine_pid()
        if engine_pid is not None:
            pids["engine"] = engine_pid
        cpu_before = {name: read_proc_cpu_seconds(pid) for name, pid in pids.items()}
        machine_before, started = read_machine_busy_seconds(), time.monotonic()
        try:
            records, rss_samples = drive_stream(worker, producer, reader, objects, events, 2 * settings.max_in_flight)
        finally:
            reader.close()
        elapsed = time.monotonic() - started
        cpu_cores = cores_used(pids, cpu_before, elapsed)
        cpu_cores["machine"] = (read_machine_busy_seconds() - machine_before) / elapsed
        producer.flush()
        peak_rss = worker.peak_rss_bytes()
    finally:
        if producer is not None:
            producer.close()
        exit_code = worker.stop(WORKER_STOP_TIMEOUT_SECONDS)
    if exit_code != 0:
        logger.warning("the worker exited with code %s after SIGTERM; log: %s", exit_code, worker.log_path)
    result = summarize_stream(records, producer.timestamps_by_offset(), rss_samples, peak_rss, events)
    result.cpu_cores = cpu_cores
    return result


def cores_used(pids: dict[str, int], cpu_before: dict[str, float | None], seconds: float) -> dict[str, float]:
    """Return the mean cores that each named process used over `seconds`, leaving out processes that are gone."""
    cores = {}
    for name, pid in pids.items():
        after = read_proc_cpu_seconds(pid)
        before = cpu_before.get(name)
        if after is not None and before is not None and seconds > 0:
            cores[name] = (after - before) / seconds
    return cores


def drive_stream(
    worker: WorkerProcess,
    producer: EventProducer,
    reader: OutputReader,
    objects: list[UploadedObject],
    events: int,
    window: int,
) -> tuple[list[OutputRecord], list[tuple[int, int]]]:
    """Publish events while fewer than `window` are outstanding, read records and sample the worker's RSS.

    Returns the records and (records read, RSS bytes) samples. Raises LocalRunError when the worker
    exits, or when no record arrives for READY_TIMEOUT_SECONDS.
    """
    records: list[OutputRecord] = []
    rss_samples: list[tuple[int, int]] = []
    sent = 0
    last_progress = next_sample = time.monotonic()
    while len(records) < events:
        while sent < events and sent - len(records) < window:
            obj = objects[sent % len(objects)]
            producer.send(f"{obj.uri}#{sent}", s3_event_notification(obj))
            sent += 1
        producer.serve_callbacks()

        arrived = list(reader.poll(0.2))
        records.extend(arrived)
        now = time.monotonic()
        if arrived:
            last_progress = now
        if now >= next_sample or len(records) >= events:
            rss = worker.rss_bytes()
            if rss is not None:
                rss_samples.append((len(records), rss))
            next_sample = now + RSS_SAMPLE_SECONDS

        if worker.process.poll() is not None:
            raise LocalRunError(
                f"the worker exited with code {worker.process.returncode} after {len(records)} of {events} "
                f"records; last log lines:\n{worker.log_tail()}"
            )
        if now - last_progress > READY_TIMEOUT_SECONDS:
            raise LocalRunError(
                f"no record for {READY_TIMEOUT_SECONDS:.0f} s after {len(records)} of {events}; "
                f"last worker log lines:\n{worker.log_tail()}"
            )
    return records, rss_samples


def summarize_stream(
    records: list[OutputRecord],
    sent_at: dict[tuple[int, int], float],
    rss_samples: list[tuple[int, int]],
    peak_rss: int | None,
    events: int,
) -> StreamPhaseResult:
    first_event = min(sent_at.values())
    last_record = max(r.timestamp for r in records)
    result = StreamPhaseResult(images=len(records), seconds=last_record - first_event, peak_rss_bytes=peak_rss)
    result.dead_lettered = sum(1 for r in records if r.is_error)
    for record in records:
        sent = sent_at.get(record.source_position)
        if sent is None or record.is_error:
            continue
        result.latencies.append(record.timestamp - sent)
        result.latency_points.append((record.timestamp - first_event, record.timestamp - sent))
        for stage, seconds in (record.value.get("timings") or {}).items():
            if isinstance(seconds, (int, float)):
                result.stage_seconds.setdefault(stage, []).append(float(seconds))

    # Growth compares RSS at the end of the first and of the last window of records.
    # A window is 1,000 records, or half the run when the run is shorter than 2,000.
    result.rss_samples = rss_samples
    result.rss_window_records = min(RSS_WINDOW_RECORDS, events // 2)
    first_window = [rss for count, rss in rss_samples if count >= result.rss_window_records]
    if first_window and rss_samples:
        result.rss_first_window_bytes = first_window[0]
        result.rss_last_window_bytes = rss_samples[-1][1]
    return result


# ---------------------------------------------------------------- phase 3: the naive consumer


def run_naive_phase(settings: Settings, endpoints: StackEndpoints, names: RunNames, events: int) -> PhaseResult:
    """Caption the first `events` input events one at a time; see the module docstring."""
    import openvino as ov
    import openvino_genai
    from confluent_kafka import Consumer, Producer

    from worker.engine import GenerationOptions, build_generation_config, device_properties, read_image_side, render_prompt
    from worker.images import ImageLimits, decode_image

    # The same prompt, chat template and generation options as the engine's.
    pipeline = openvino_genai.VLMPipeline(
        str(settings.model), settings.device, **device_properties(None, settings.device, settings.inference_threads)
    )
    tokenizer = pipeline.get_tokenizer()
    prompt = render_prompt(tokenizer, settings.system_prompt, settings.prompt)
    eos_token_id = int(tokenizer.get_eos_token_id())
    config = build_generation_config(GenerationOptions.from_settings(settings), eos_token_id, {eos_token_id})
    limits = ImageLimits.from_settings(settings, read_image_side(settings.model))
    s3 = make_s3_client(endpoints.s3_endpoint)
    # One generation before the clock starts, as the engine and the worker warm up too.
    warm_image = decode_photos(settings, limits.target_side)[0]
    pipeline.generate(prompt, images=[ov.Tensor(warm_image[np.newaxis])], generation_config=config)

    consumer = Consumer(
        client_config(
            endpoints.kafka_bootstrap,
            **{"group.id": f"{names.group}-naive", "auto.offset.reset": "earliest", "enable.auto.commit": False},
        )
    )
    producer = Producer(client_config(endpoints.kafka_bootstrap))
    consumer.subscribe([names.input_topic])
    latencies: list[float] = []
    started: float | None = None
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    try:
        while len(latencies) < events:
            message = consumer.poll(1.0)
            if message is None or message.error() is not None:
                if time.monotonic() > deadline:
                    raise LocalRunError(f"the naive consumer read {len(latencies)} of {events} events in time")
                continue
            began = time.perf_counter()
            started = started if started is not None else began

            record = json.loads(message.value())["Records"][0]["s3"]
            bucket, key = record["bucket"]["name"], unquote_plus(record["object"]["key"])
            data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            pixels = decode_image(data, limits).pixels
            caption = pipeline.generate(prompt, images=[ov.Tensor(pixels[np.newaxis])], generation_config=config)
            output = {"image": f"s3://{bucket}/{key}", "caption": caption.texts[0]}
            producer.produce(naive_output_topic(names), value=json.dumps(output))
            producer.flush(30.0)
            consumer.commit(message=message, asynchronous=False)

            latencies.append(time.perf_counter() - began)
    finally:
        consumer.close()
        producer.close()
    return PhaseResult(images=events, seconds=time.perf_counter() - (started or time.perf_counter()), latencies=latencies)


# ---------------------------------------------------------------- the run


def naive_output_topic(names: RunNames) -> str:
    return f"{names.prefix}-naive-captions"


def run_benchmark(args: argparse.Namespace, settings: Settings, events: int, naive_events: int) -> dict[str, Any]:
    """Run the three phases on a local stack, then clean up what the run created; return the figures."""
    # Other work on the machine lowers every figure, so the report includes how busy it was.
    load_before = os.getloadavg()[0]
    names = RunNames.unique("bench")
    topics = {names.input_topic: INPUT_PARTITIONS, names.output_topic: 1, names.dlq_topic: 1, naive_output_topic(names): 1}
    stack = LocalStack()
    s3 = None
    try:
        endpoints = stack.start()
        create_topics(endpoints.kafka_bootstrap, topics)
        s3 = make_s3_client(endpoints.s3_endpoint)
        s3.create_bucket(Bucket=names.bucket)
        objects = [upload_photo(s3, names.bucket, f"bench photos/{p.name}", p) for p in photo_paths()]

        progress(f"engine alone: {events} images")
        engine = run_engine_phase(settings, events)
        progress(f"stream: {events} events through the worker process")
        stack_pids = {name: pid for name, part in (("s3_server", "s3"), ("kafka", "kafka"))
                      if (pid := stack.part_pid(part)) is not None}
        stream = run_stream_phase(args, settings, endpoints, names, objects, events, stack.log_dir(), stack_pids)
        progress(f"naive consumer: the first {naive_events} events, one at a time")
        naive = run_naive_phase(settings, endpoints, names, naive_events)
    finally:
        if stack.endpoints is not None:
            delete_topics(stack.endpoints.kafka_bootstrap, list(topics))
            if s3 is not None:
                delete_bucket(s3, names.bucket)
        stack.stop_started()
    report = build_report(settings, events, naive_events, engine, stream, naive)
    report["load_average_before"] = round(load_before, 2)
    return report


def build_report(
    settings: Settings,
    events: int,
    naive_events: int,
    engine: EnginePhaseResult,
    stream: StreamPhaseResult,
    naive: PhaseResult,
) -> dict[str, Any]:
    def ratio(numerator: float, denominator: float) -> float | None:
        return numerator / denominator if denominator > 0 else None

    return {
        "events": events,
        "naive_events": naive_events,
        "max_new_tokens": settings.max_new_tokens,
        "max_in_flight": settings.max_in_flight,
        "cache_size_gb": settings.cache_size,
        "inference_threads": settings.inference_threads,
        "model": str(settings.model),
        "stream_images_per_second": stream.images_per_second,
        "engine_images_per_second": engine.images_per_second,
        "naive_images_per_second": naive.images_per_second,
        "stream_vs_engine": ratio(stream.images_per_second, engine.images_per_second),
        "stream_vs_naive": ratio(stream.images_per_second, naive.images_per_second),
        "latency_p50_seconds": percentile(stream.latencies, 50),
        "latency_p99_seconds": percentile(stream.latencies, 99),
        "engine_latency_p50_seconds": percentile(engine.latencies, 50),
        "naive_latency_p50_seconds": percentile(naive.latencies, 50),
        "stream_stage_p50_seconds": {stage: percentile(values, 50) for stage, values in stream.stage_seconds.items()},
        "stream_cpu_cores": stream.cpu_cores,
        "stream_captions": len(stream.latencies),
        "stream_dead_lettered": stream.dead_lettered,
        "peak_rss_bytes": stream.peak_rss_bytes,
        "rss_first_window_bytes": stream.rss_first_window_bytes,
        "rss_last_window_bytes": stream.rss_last_window_bytes,
        "rss_window_records": stream.rss_window_records,
        "rss_growth": stream.rss_growth,
        "rss_samples": thin(stream.rss_samples, 50),
        "engine_rss_growth": engine.rss_growth,
        "decode_seconds_per_image": engine.decode_seconds_per_image,
        "latency_points": stream.latency_points,
        "machine": machine_description(),
    }


def thin(samples: list[Any], count: int) -> list[Any]:
    """Return at most `count` evenly spaced items of `samples`, always with the last one."""
    if len(samples) <= count:
        return list(samples)
    step = len(samples) / count
    return [samples[int(i * step)] for i in range(count - 1)] + [samples[-1]]


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": memory}


def progress(text: str) -> None:
    print(f"bench stream: {text}", file=sys.stderr, flush=True)


def format_optional(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def print_report(report: dict[str, Any]) -> None:
    mib = 1024 * 1024
    verdict = {True: "met", False: "MISSED", None: "n/a"}

    def target(value: float | None, ok: bool) -> str:
        return verdict[None if value is None else ok]

    a_b, a_c, growth = report["stream_vs_engine"], report["stream_vs_naive"], report["rss_growth"]
    lines = [
        f"{report['events']} events, {report['max_new_tokens']} new tokens per image (end of sequence ignored), "
        f"max-in-flight {report['max_in_flight']}, cache-size {report['cache_size_gb']} GB (0: grows on demand), "
        f"inference-threads {report['inference_threads']} (0: OpenVINO's choice)",
        f"(a) stream          {report['stream_images_per_second']:8.2f} images/s",
        f"(b) engine alone    {report['engine_images_per_second']:8.2f} images/s",
        f"(c) naive consumer  {report['naive_images_per_second']:8.2f} images/s  (first {report['naive_events']} events)",
        f"a/b                 {format_optional(a_b, '{:8.2f}')}  target >= {TARGET_STREAM_VS_ENGINE}: "
        f"{target(a_b, (a_b or 0) >= TARGET_STREAM_VS_ENGINE)}",
        f"a/c                 {format_optional(a_c, '{:8.2f}')}  target >= {TARGET_STREAM_VS_NAIVE}: "
        f"{target(a_c, (a_c or 0) >= TARGET_STREAM_VS_NAIVE)}",
        f"latency p50         {format_optional(report['latency_p50_seconds'], '{:8.2f}')} s  (event to output record)",
        f"latency p99         {format_optional(report['latency_p99_seconds'], '{:8.2f}')} s",
        f"worker peak RSS     {format_optional(report['peak_rss_bytes'] and report['peak_rss_bytes'] / mib, '{:8.0f}')} MiB",
        f"RSS growth          {format_optional(growth and growth * 100, '{:8.2f}')} %  "
        f"(end of first to end of last {report['rss_window_records']} records) target < 5 %: "
        f"{target(growth, (growth if growth is not None else 1) < TARGET_RSS_GROWTH)}",
        f"engine RSS growth   {format_optional(report['engine_rss_growth'] and report['engine_rss_growth'] * 100, '{:8.2f}')} %  "
        "(the engine alone, in this process, over the same windows)",
        f"dead-lettered       {report['stream_dead_lettered']:8d}",
        f"load average before {report['load_average_before']:8.2f}  (1 minute; other work on the machine slows the "
        "phases unevenly)",
        "worker stages p50   "
        + ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds in report["stream_stage_p50_seconds"].items()),
        "stream CPU, cores   "
        + ", ".join(f"{name} {cores:.2f}" for name, cores in report["stream_cpu_cores"].items()),
    ]
    print("\n".join(lines))


def bench_stream_command(args: argparse.Namespace) -> int:
    """Run the benchmark; print a table, or one JSON object with --json. Return 0, 1 on failure, 2 on bad settings."""
    configure_logging(getattr(args, "log_level", None) or "WARNING", getattr(args, "log_format", None) or "text")
    events = int(getattr(args, "events", 2000))
    naive_events = min(int(getattr(args, "naive_events", None) or DEFAULT_NAIVE_EVENTS), events)
    if events < 2:
        print("invalid --events: expected at least 2", file=sys.stderr)
        return 2
    try:
        overrides = {"ignore_eos": True}
        if getattr(args, "max_new_tokens", None) is None:
            overrides["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        if getattr(args, "cache_size", None) is None:
            overrides["cache_size"] = DEFAULT_CACHE_SIZE
        settings = load_settings(args, **overrides)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2

    try:
        report = run_benchmark(args, settings, events, naive_events)
    except LocalRunError as exc:
        print(f"bench stream failed: {exc}", file=sys.stderr)
        return 1

    plot_path = getattr(args, "plot", None)
    if plot_path:
        from worker.benchmarks.plot import write_latency_plot

        write_latency_plot(Path(plot_path), report["latency_points"], report)
    report.pop("latency_points")
    if getattr(args, "json", False):
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0
