"""`caption-worker caption FILE...`: caption local image files, one JSON line per file.

No Kafka and no S3. Lines come out on stdout in input order, as UTF-8 whatever
the locale. A file that cannot be read, decoded or captioned gets an error line
with the same `error` object as a dead-letter record, and the run goes on. Logs
go to stderr.

Exit codes: 0 when every file was captioned, 1 when any file failed, 2 for
invalid settings, 4 when the model could not be loaded.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from worker.cli import EXIT_OK, EXIT_STARTUP, EXIT_USAGE
from worker.errors import CaptionError, EngineFull, ErrorCode
from worker.images import ImageLimits, decode_image
from worker.logs import fields
from worker.settings import Settings, load_command_settings

logger = logging.getLogger(__name__)

# Same number as the CLI's EXIT_FAILURE, with a narrower meaning here.
EXIT_SOME_FAILED = 1

# Extra seconds past request-timeout-seconds before a caption is given up as lost,
# in case the engine thread itself stopped.
RESULT_MARGIN_SECONDS = 30.0


@dataclass
class _FileJob:
    """One input file on its way to an output line."""

    path: str
    started: float
    # The path for output lines and logs, from printable_path().
    name: str = ""
    read_seconds: float = 0.0
    decode_seconds: float = 0.0
    future: Future | None = None
    finished: float | None = None
    error: CaptionError | None = None


def caption_command(args: argparse.Namespace) -> int:
    """Caption every file in args.files and print one JSON line per file; return the exit code."""
    settings = load_command_settings(args)
    if settings is None:
        return EXIT_USAGE

    from worker.engine import CaptionEngine, ModelLoadError

    try:
        engine = CaptionEngine.from_settings(settings, None)
        engine.start()
    except ModelLoadError as error:
        # The message names the missing or invalid file, so a traceback would only hide it.
        logger.error("model could not be loaded", extra=fields(model=str(settings.model), error=str(error)))
        return EXIT_STARTUP
    except Exception:  # noqa: BLE001 - any load failure ends the command with its own exit code
        logger.exception("model could not be loaded", extra=fields(model=str(settings.model)))
        return EXIT_STARTUP

    if isinstance(sys.stdout, io.TextIOWrapper):
        # Consumers parse the lines as JSON, which is UTF-8 even under a C or Latin-1 locale.
        # A lone surrogate that printable_path() missed becomes a JSON \u escape, not a raw byte.
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
    try:
        failed = caption_files(engine, settings, list(args.files), sys.stdout)
    finally:
        engine.close(settings.drain_timeout_seconds)
    return EXIT_SOME_FAILED if failed else EXIT_OK


def caption_files(engine: Any, settings: Settings, paths: list[str], out: TextIO) -> int:
    """Submit every file to the engine, print the lines in input order, and return the number of failures.

    All files are in flight together up to the engine's admission limit. When the
    engine is full, the next file waits for any caption to finish.
    """
    from worker.engine import GenerationOptions

    limits = ImageLimits.from_settings(settings, engine.image_side)
    options = GenerationOptions.from_settings(settings)
    printer = _OrderedPrinter(engine.model_name, settings, out)

    for path in paths:
        job = _FileJob(path=path, started=time.monotonic(), name=printable_path(path))
        pixels = _read_and_decode(job, limits, settings.max_image_bytes)
        if pixels is not None:
            _submit_when_room(engine, job, pixels, options, printer)
        # Only now may the printer see the job: before submission it is neither done nor pending.
        printer.jobs.append(job)
        printer.print_ready()

    printer.print_all()
    return printer.failures


def _read_and_decode(job: _FileJob, limits: ImageLimits, max_bytes: int) -> Any:
    """Return the decoded pixels of job.path, or None after setting job.error."""
    started = time.monotonic()
    try:
        data = read_image_file(Path(job.path), max_bytes)
        job.read_seconds = time.monotonic() - started
        decoded = decode_image(data, limits)
    except CaptionError as error:
        job.error = error
        return None
    job.decode_seconds = decoded.decode_seconds
    return decoded.pixels


def _submit_when_room(engine: Any, job: _FileJob, pixels: Any, options: Any, printer: _OrderedPrinter) -> None:
    while True:
        try:
            job.future = engine.submit(pixels, None, options)
            job.future.add_done_callback(lambda _future: _mark_finished(job))
            return
        except EngineFull:
            pending = [other.future for other in printer.jobs if other.future is not None and not other.future.done()]
            wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            printer.print_ready()
        except CaptionError as error:
            job.error = error
            return


def _mark_finished(job: _FileJob) -> None:
    job.finished = time.monotonic()


def read_image_file(path: Path, max_bytes: int) -> bytes:
    """Read a local image file; raise CaptionError with the code that S3 would give."""
    name = printable_path(os.fspath(path))
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise CaptionError(ErrorCode.IMAGE_NOT_FOUND, f"{name} is a directory, not an image file")
        if size > max_bytes:
            raise CaptionError(
                ErrorCode.OBJECT_TOO_LARGE, f"{name} has {size} bytes, more than max-image-bytes {max_bytes}"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptionError(ErrorCode.IMAGE_NOT_FOUND, f"file not found: {name}") from None
    except PermissionError:
        raise CaptionError(ErrorCode.ACCESS_DENIED, f"permission denied: {name}") from None
    except OSError as error:
        raise CaptionError(ErrorCode.FETCH_FAILED, f"could not read {name}: {error.strerror or error}") from None
    if not data:
        raise CaptionError(ErrorCode.EMPTY_OBJECT, f"{name} is empty (0 bytes)")
    return data


def printable_path(path: str) -> str:
    """Return the path as valid Unicode text, writing each byte that is not UTF-8 as a \\xNN escape.

    Python decodes such bytes of command-line arguments to lone surrogates (PEP 383),
    which would make an output line invalid UTF-8. NOTE: a name that contains a
    backslash followed by "xff" prints the same as one with the byte 0xff.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:
        # Only a caller in Python can pass text that the file system encoding cannot hold.
        raw = path.encode("utf-8", errors="backslashreplace")
    return raw.decode("utf-8", errors="backslashreplace")


class _OrderedPrinter:
    """Prints finished jobs as JSON lines, never ahead of an earlier unfinished job."""

    def __init__(self, model_name: str, settings: Settings, out: TextIO) -> None:
        self.jobs: list[_FileJob] = []
        self.failures = 0
        self._next = 0
        self._model_name = model_name
        self._result_timeout = settings.request_timeout_seconds + RESULT_MARGIN_SECONDS
        self._out = out

    def print_ready(self) -> None:
        """Print the leading jobs that are finished."""
        while self._next < len(self.jobs):
            job = self.jobs[self._next]
            if job.error is None and job.future is not None and not job.future.done():
                return
            self._print(job)

    def print_all(self) -> None:
        """Print every remaining job, waiting for each caption in turn."""
        while self._next < len(self.jobs):
            self._print(self.jobs[self._next])

    def _print(self, job: _FileJob) -> None:
        line = self._line(job)
        if "error" in line:
            self.failures += 1
        self._out.write(json.dumps(line, ensure_ascii=False) + "\n")
        self._out.flush()
        self._next += 1

    def _line(self, job: _FileJob) -> dict[str, Any]:
        if job.error is None and job.future is not None:
            try:
                result = job.future.result(timeout=self._result_timeout)
            except CaptionError as error:
                job.error = error
            except TimeoutError:
                job.error = CaptionError(ErrorCode.GENERATION_FAILED, "no caption within request-timeout-seconds")
            except Exception as error:  # noqa: BLE001 - one file must not stop the others
                logger.exception("caption failed unexpectedly", extra=fields(file=job.name))
                job.error = CaptionError(ErrorCode.GENERATION_FAILED, f"unexpected error: {error!r}")
        if job.error is not None:
            logger.warning(
                "file failed", extra=fields(file=job.name, code=job.error.code.value, error=job.error.message)
            )
            return {"image": job.name, "error": job.error.to_dict()}
        return {
            "image": job.name,
            "caption": result.text,
            "model": self._model_name,
            "finish_reason": result.finish_reason,
            "generated_tokens": result.generated_tokens,
            "timings": {
                "fetch": round(job.read_seconds, 6),
                "decode": round(job.decode_seconds, 6),
                "queue": round(result.queue_seconds, 6),
                "time_to_first_token": round(result.time_to_first_token_seconds, 6),
                "generation": round(result.generation_seconds, 6),
                "total": round((job.finished or time.monotonic()) - job.started, 6),
            },
        }
