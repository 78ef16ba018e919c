"""Command-line entry point: `caption-worker run | caption | demo | bench engine | bench stream`.

Each subcommand's work lives in its own module; this file only parses flags
and dispatches, so that `--help` stays fast and free of model loading.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from worker import __version__
from worker.settings import add_settings_arguments

# Exit codes, documented in the README.
EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error
EXIT_USAGE = 2  # invalid flags or settings
EXIT_KAFKA_FATAL = 3  # a fatal Kafka client error, a fenced producer included
EXIT_STARTUP = 4  # the model or a dependency could not be loaded at startup
EXIT_DRAIN_TIMEOUT = 5  # shutdown gave up waiting for in-flight captions; their offsets stay uncommitted
EXIT_ENGINE_STOPPED = 6  # the caption engine's process died; unfinished offsets stay uncommitted
EXIT_SIGNAL = 130  # a second SIGINT or SIGTERM stopped the worker at once


def _set_offline_environment() -> None:
    # No model hub is reachable from where the worker runs; fail fast instead of retrying downloads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caption-worker", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"caption-worker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="consume image events, caption them and publish the captions")
    add_settings_arguments(run)

    caption = commands.add_parser("caption", help="caption local image files and print one JSON line per file")
    caption.add_argument("files", nargs="+", metavar="FILE", help="image files")
    add_settings_arguments(caption)

    demo = commands.add_parser("demo", help="run the worker on bundled photographs on a local stack it starts")
    demo.add_argument("--keep-stack", action="store_true", help="leave the local stack running afterwards")
    demo.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the worker to be ready, and then for all records"
    )
    add_settings_arguments(demo)

    bench = commands.add_parser("bench", help="benchmarks that print ratios measured in one run")
    bench_kinds = bench.add_subparsers(dest="bench_kind", required=True, metavar="KIND")
    bench_engine = bench_kinds.add_parser("engine", help="continuous batching against sequential generation")
    bench_engine.add_argument("--json", action="store_true", help="print one JSON object")
    bench_engine.add_argument("--images", type=int, default=64, help="images per measured run")
    add_settings_arguments(bench_engine)
    bench_stream = bench_kinds.add_parser("stream", help="the whole stream against the engine and a naive consumer")
    bench_stream.add_argument("--json", action="store_true", help="print one JSON object")
    bench_stream.add_argument("--events", type=int, default=2000, help="events sent through the stream")
    bench_stream.add_argument(
        "--naive-events", type=int, default=100, help="events captioned by the naive one-at-a-time consumer"
    )
    bench_stream.add_argument("--plot", metavar="PNG", help="write a plot of end-to-end latency over the run")
    add_settings_arguments(bench_stream)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _set_offline_environment()
    args = build_parser().parse_args(argv)

    # Imports are deferred so that one command's dependencies do not slow the others.
    if args.command == "run":
        from worker.stream import run_command

        return run_command(args)
    if args.command == "caption":
        from worker.captioning import caption_command

        return caption_command(args)
    if args.command == "demo":
        from worker.demo import demo_command

        return demo_command(args)
    if args.bench_kind == "engine":
        from worker.benchmarks.engine import bench_engine_command

        return bench_engine_command(args)
    from worker.benchmarks.stream import bench_stream_command

    return bench_stream_command(args)


if __name__ == "__main__":
    sys.exit(main())
