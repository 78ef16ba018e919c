"""Caption engine: one thread runs an OpenVINO GenAI continuous-batching pipeline for many callers.

Callers on any thread `submit()` an image, a prompt and generation options and
get a `concurrent.futures.Future[CaptionResult]`. The engine thread owns the
`openvino_genai.ContinuousBatchingPipeline`. Each turn of its loop:

1. admit: hand newly submitted requests to the pipeline (`add_request`, which
   encodes the image and the prompt);
2. drop: cancel requests whose deadline passed or whose future was cancelled;
3. step: run one scheduler step, which batches prefill and decoding of every
   running request;
4. collect: resolve the futures of finished requests and update the gauges.

Admission is bounded by `max_queued_requests`, counting requests from
`submit()` until their future resolves, so `submit()` raises EngineFull at once
instead of blocking.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import threading
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from worker.errors import CaptionError, EngineFull, EngineStopped, ErrorCode
from worker.logs import fields
from worker.metrics import Metrics
from worker.settings import Settings

logger = logging.getLogger(__name__)

# A deadline or a cancellation fails the future instead of returning a result.
FinishReason = Literal["stop", "length"]

# Gemma 3 ends each model turn with <end_of_turn>, but generation_config.json lists only <eos>.
END_OF_TURN = "<end_of_turn>"

# Tag that OpenVINO GenAI (checked on 2026.4) replaces with the model's own image
# tokens, here Gemma 3's <start_of_image> and soft tokens, when it encodes a prompt.
IMAGE_TAG = "<ov_genai_image_0>"

# How long the idle engine thread sleeps before it checks deadlines and shutdown again.
IDLE_WAIT_SECONDS = 0.05

WARM_UP_MAX_NEW_TOKENS = 8

# The OpenVINO CPU plugin caches the primitives that it builds for each input shape, up to
# 5,000 entries on x86 by default (rtCacheCapacity in the plugin's config.h). Continuous
# batching gives most steps a new shape, so the cache keeps growing. In `bench stream` with
# the tiny model, the worker's RSS after 1,000 captions was about 680 MiB with the default
# and 460 MiB with the cache off (0), and throughput did not drop.
# NOTE: not measured with a full-size Gemma 3, whose steps may gain from cached primitives.
CPU_RUNTIME_CACHE_CAPACITY = 0

# OpenVINO IR models of a Gemma 3 export by optimum-intel, each an .xml graph with .bin weights.
# Without the vision model or the language model OpenVINO GenAI fails to load, and without
# the tokenizer it loads but reports no <eos> token.
REQUIRED_IR_MODELS = (
    "openvino_language_model",
    "openvino_text_embeddings_model",
    "openvino_vision_embeddings_model",
    "openvino_tokenizer",
    "openvino_detokenizer",
)
EXPORT_HINT = "export one with `optimum-cli export openvino --task image-text-to-text` (see docs/engine.md)"


class ModelLoadError(Exception):
    """A model directory that is not a loadable Gemma 3 OpenVINO export; the message names the file."""


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding parameters of one request."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k limit
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    # Generate exactly max_new_tokens tokens, for benchmarks that need equal work per image.
    ignore_eos: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> GenerationOptions:
        return cls(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repetition_penalty=settings.repetition_penalty,
            stop_strings=tuple(settings.stop_strings),
            seed=settings.seed,
            ignore_eos=settings.ignore_eos,
        )

    def replace(self, **changes: Any) -> GenerationOptions:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CaptionResult:
    """A finished caption with its token counts and timings in seconds.

    `queue_seconds` runs from submit() until the pipeline admitted the request.
    The other timings run from that admission, as the pipeline measures them.
    """

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: FinishReason
    queue_seconds: float
    time_to_first_token_seconds: float
    generation_seconds: float
    time_per_output_token_seconds: float


@dataclass
class _Request:
    """A submitted request and its state in the engine thread."""

    request_id: int
    pixels: np.ndarray
    prompt: str
    config: Any  # openvino_genai.GenerationConfig
    stop_strings: tuple[str, ...]
    future: Future
    submitted_at: float
    deadline: float
    admitted_at: float | None = None
    handle: Any = None  # openvino_genai.GenerationHandle once admitted


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0


class EngineBase:
    """The model facts and settings that the in-process engine and EngineProcess share.

    `inference_precision` (for example "f32") sets OpenVINO's INFERENCE_PRECISION_HINT.
    On CPUs where OpenVINO defaults to bf16, f32 makes greedy captions independent
    of which requests share a batch.
    """

    def __init__(self, settings: Settings, metrics: Metrics | None, inference_precision: str | None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._inference_precision = inference_precision
        self._model_dir = Path(settings.model)
        check_model_dir(self._model_dir)
        self._image_side = read_image_side(self._model_dir)
        self._lock: Any = threading.Lock()
        self._failure: str | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics | None, inference_precision: str | None = None
    ) -> Self:
        return cls(settings, metrics, inference_precision)

    @property
    def image_side(self) -> int:
        """Side in pixels of the square image that the vision encoder reads."""
        return self._image_side

    @property
    def model_name(self) -> str:
        return self._model_dir.name

    @property
    def failure(self) -> str | None:
        """Why the engine stopped for good, or None while it works."""
        with self._lock:
            return self._failure

    def submit(self, pixels: np.ndarray, prompt: str | None, options: GenerationOptions) -> Future:
        raise NotImplementedError

    def warm_up(self) -> CaptionResult:
        """Caption a generated gradient image and return the result; raise if that fails."""
        options = GenerationOptions(max_new_tokens=WARM_UP_MAX_NEW_TOKENS)
        started = time.monotonic()
        result = self.submit(gradient_image(self._image_side), None, options).result(
            timeout=self._settings.request_timeout_seconds + 5.0
        )
        logger.info(
            "warm-up caption done",
            extra=fields(seconds=round(time.monotonic() - started, 3), tokens=result.generated_tokens),
        )
        return result


class CaptionEngine(EngineBase):
    """Continuous-batching captioner: thread-safe submit(), one engine thread stepping the pipeline."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, inference_precision: str | None = None
    ) -> None:
        """Prepare an engine; start() loads the model."""
        super().__init__(settings, metrics, inference_precision)
        self._lock = threading.Condition()
        self._incoming: collections.deque[_Request] = collections.deque()
        self._active: dict[int, _Request] = {}
        self._in_flight = 0  # submitted and not yet resolved, under _lock
        self._closing = False
        self._close_deadline: float | None = None
        self._request_ids = itertools.count()
        self._counters = _Counters()

        self._pipeline: Any = None
        self._tokenizer: Any = None
        self._eos_token_id = -1
        self._stop_token_ids: set[int] = set()
        self._thread: threading.Thread | None = None
        self._pipeline_metrics: dict[str, float] = {}

    # ------------------------------------------------------------ public interface

    def start(self) -> None:
        """Load the model and start the engine thread; raise ModelLoadError if OpenVINO cannot load it."""
        import openvino_genai

        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs = self._settings.max_num_seqs
        scheduler.max_num_batched_tokens = self._settings.max_num_batched_tokens
        scheduler.cache_size = self._settings.cache_size
        scheduler.enable_prefix_caching = self._settings.enable_prefix_caching
        properties = device_properties(self._inference_precision, self._settings.device, self._settings.inference_threads)

        started = time.monotonic()
        try:
            self._pipeline = openvino_genai.ContinuousBatchingPipeline(
                str(self._model_dir),
                scheduler,
                self._settings.device,
                properties=properties,
                vision_encoder_properties=properties,
            )
        except RuntimeError as error:
            # OpenVINO's messages span several lines with C++ source paths; one line suits a log.
            detail = " ".join(str(error).split())
            # The KV cache is allocated here too, so a cache-size that does not fit fails here.
            raise ModelLoadError(
                f"OpenVINO GenAI could not load {self._model_dir} on device {self._settings.device} "
                f"with cache-size {self._settings.cache_size} GB: {detail}"
            ) from error
        # NOTE: openvino-genai 2026.4 deprecates finish_chat(), which _admit() needs, and warns
        # at each call. When a release removes it, the history growth that it clears comes back.
        warnings.filterwarnings("ignore", message=r"start_chat\(\) / finish_chat\(\) API is deprecated")
        self._tokenizer = self._pipeline.get_tokenizer()
        self._eos_token_id = int(self._tokenizer.get_eos_token_id())
        self._stop_token_ids = resolve_stop_token_ids(self._tokenizer)
        logger.info(
            "model loaded",
            extra=fields(
                model=str(self._model_dir),
                device=self._settings.device,
                seconds=round(time.monotonic() - started, 3),
                max_num_seqs=self._settings.max_num_seqs,
                max_num_batched_tokens=self._settings.max_num_batched_tokens,
                cache_size_gb=self._settings.cache_size,
                precision=self._inference_precision or "default",
            ),
        )

        self._thread = threading.Thread(target=self._run, name="caption-engine", daemon=True)
        self._thread.start()

    def submit(
        self, pixels: np.ndarray, prompt: str | None, options: GenerationOptions, *, submitted_at: float | None = None
    ) -> Future:
        """Queue one image for captioning and return a future of its CaptionResult.

        `submitted_at` (time.monotonic(), which all processes of a Linux machine share)
        starts the queue time and the deadline earlier than now: EngineProcess passes the
        time of its own submit().

        `pixels` is uint8 RGB, height x width x 3. `prompt` None means the
        configured prompt. Raises EngineFull when max_queued_requests requests are
        in flight, CaptionError (generation_failed) when the prompt is longer than
        max_prompt_chars, ValueError on pixels of the wrong shape or type, and
        RuntimeError once close() has begun. The future fails with CaptionError
        (generation_failed or empty_caption), or with EngineStopped when the engine
        thread died. Cancelling the future drops the request.
        """
        if self._pipeline is None:
            raise RuntimeError("caption engine is not started: call start() first")
        pixels = check_pixels(pixels)
        user_prompt = check_prompt(self._settings, prompt)
        rendered = render_prompt(self._tokenizer, self._settings.system_prompt, user_prompt)
        config = build_generation_config(options, self._eos_token_id, self._stop_token_ids)

        now = time.monotonic() if submitted_at is None else submitted_at
        with self._lock:
            if self._closing:
                raise RuntimeError("caption engine is closed")
            if self._in_flight >= self._settings.max_queued_requests:
                raise EngineFull(f"{self._in_flight} caption requests in flight, the maximum")
            request = _Request(
                request_id=next(self._request_ids),
                pixels=pixels,
                prompt=rendered,
                config=config,
                stop_strings=options.stop_strings,
                future=Future(),
                submitted_at=now,
                deadline=now + self._settings.request_timeout_seconds,
            )
            self._in_flight += 1
            self._incoming.append(request)
            self._lock.notify_all()
        return request.future

    def free_slots(self) -> int:
        """Return how many more requests submit() accepts now."""
        with self._lock:
            return max(0, self._settings.max_queued_requests - self._in_flight)

    def stats(self) -> dict[str, Any]:
        """Return counts of requests by state and the pipeline's last step metrics."""
        with self._lock:
            return {
                "in_flight": self._in_flight,
                "queued": len(self._incoming),
                "completed": self._counters.completed,
                "failed": self._counters.failed,
                "cancelled": self._counters.cancelled,
                "timed_out": self._counters.timed_out,
                **self._pipeline_metrics,
            }

    def close(self, timeout: float) -> None:
        """Stop the engine, giving requests in flight up to `timeout` seconds to finish.

        Steps:
        1. stop admission: submit() raises RuntimeError from now on;
        2. let the engine thread finish what is queued and running until the deadline;
        3. at the deadline, cancel what is left and fail its futures with a retryable
           generation_failed;
        4. join the engine thread.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            pending = self._in_flight
            self._lock.notify_all()
        logger.info("caption engine closing", extra=fields(in_flight=pending, timeout_seconds=timeout))

        if self._thread is not None:
            # The thread fails what is left at the deadline; the margin covers one last step.
            self._thread.join(timeout + 10.0)
            if self._thread.is_alive():
                logger.warning("caption engine thread did not stop", extra=fields(timeout_seconds=timeout))
        logger.info("caption engine closed", extra=fields(**self.stats()))

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while self._run_once():
                pass
        except Exception as error:  # noqa: BLE001 - the thread must fail every future before it dies
            logger.exception("caption engine thread failed")
            with self._lock:
                self._failure = f"caption engine thread failed: {error!r}"
            self._fail_all(EngineStopped(self._failure))

    def _run_once(self) -> bool:
        """Run one turn of the loop; return False when the engine has shut down."""
        self._take_input()
        self._admit()
        self._drop_expired_and_cancelled()

        if not self._active:
            self._clear_request_gauges()
            with self._lock:
                if self._closing and not self._incoming:
                    return False
                idle = not self._incoming
            if idle:
                self._wait_for_input(IDLE_WAIT_SECONDS)
            return True

        try:
            self._pipeline.step()
        except Exception as error:  # noqa: BLE001 - a failed step fails its batch, not the engine
            logger.exception("pipeline step failed", extra=fields(running=len(self._active)))
            for request in list(self._active.values()):
                self._drop(request)
                self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, f"generation failed: {error}"))
            return True

        self._collect()
        self._update_gauges()
        return True

    def _take_input(self) -> None:
        """Hook for a subclass that receives requests in the engine thread itself; nothing here."""

    def _wait_for_input(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for a submission while no request is active."""
        with self._lock:
            if not self._incoming and not self._closing:
                self._lock.wait(timeout)

    def _admit(self) -> None:
        """Hand queued requests to the pipeline; a request that fails here fails alone."""
        added = False
        while True:
            with self._lock:
                if not self._incoming:
                    break
                request = self._incoming.popleft()
            if request.future.cancelled():
                self._release(request)
                self._count("cancelled")
                continue
            self._add_to_pipeline(request)
            added = True
        if added:
            # The pipeline's inputs embedder keeps every prompt's token ids as chat history,
            # even outside a chat: about 0.4 KiB per caption for the life of the pipeline.
            # finish_chat() clears it. It does not lock against add_request, so it runs here.
            self._pipeline.finish_chat()

    def _add_to_pipeline(self, request: _Request) -> None:
        import openvino as ov

        request.admitted_at = time.monotonic()
        try:
            image = ov.Tensor(request.pixels[np.newaxis])
            request.handle = self._pipeline.add_request(request.request_id, request.prompt, [image], request.config)
        except Exception as error:  # noqa: BLE001 - one bad request must not stop the others
            logger.exception("request rejected by the pipeline", extra=fields(request_id=request.request_id))
            self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, f"generation failed: {error}"))
            return
        request.pixels = None  # the pipeline has encoded the image
        self._active[request.request_id] = request

    def _drop_expired_and_cancelled(self) -> None:
        now = time.monotonic()
        closing_deadline = self._close_deadline if self._closing else None
        for request in list(self._active.values()):
            if request.future.cancelled():
                self._drop(request)
                self._release(request)
                self._count("cancelled")
            elif now >= request.deadline:
                self._drop(request)
                self._count("timed_out")
                logger.warning(
                    "caption request timed out",
                    extra=fields(request_id=request.request_id, timeout_seconds=self._settings.request_timeout_seconds),
                )
                message = f"caption timed out after {self._settings.request_timeout_seconds:g} s (request-timeout-seconds)"
                # max-new-tokens bounds the work, so a timeout means a slow or paused engine, not a bad image.
                self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, message, retryable=True))
            elif closing_deadline is not None and now >= closing_deadline:
                self._drop(request)
                message = "caption engine closed before the caption finished"
                self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, message, retryable=True))

    def _drop(self, request: _Request) -> None:
        """Cancel the request in the pipeline, which frees its KV cache blocks at the next step."""
        self._active.pop(request.request_id, None)
        if request.handle is not None:
            request.handle.cancel()
            request.handle = None

    def _collect(self) -> None:
        import openvino_genai

        running = openvino_genai.GenerationStatus.RUNNING
        for request in list(self._active.values()):
            status = request.handle.get_status()
            if status == running:
                continue
            self._active.pop(request.request_id)
            if status == openvino_genai.GenerationStatus.FINISHED:
                self._finish_generated(request)
            elif status == openvino_genai.GenerationStatus.IGNORED:
                # The scheduler could not fit the prompt in the KV cache.
                message = "request did not fit in the KV cache; raise cache-size or lower max-num-batched-tokens"
                self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, message, retryable=True))
            else:
                self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, f"generation ended as {status}"))

    def _finish_generated(self, request: _Request) -> None:
        outputs = request.handle.read_all()
        if not outputs:
            self._finish_error(request, CaptionError(ErrorCode.GENERATION_FAILED, "pipeline returned no output"))
            return
        output = outputs[0]
        token_ids = list(output.generated_ids)
        decoded = self._tokenizer.decode(token_ids, skip_special_tokens=True)
        # A token may bring its own leading space, as the tiny model's first token does.
        text = cut_at_stop_strings(decoded, request.stop_strings).strip()
        if not text:
            message = f"model generated an empty caption ({len(token_ids)} tokens)"
            self._finish_error(request, CaptionError(ErrorCode.EMPTY_CAPTION, message))
            return
        result = self._build_result(request, text, len(token_ids), finish_reason_name(output.finish_reason))
        if self._metrics is not None:
            observe_result(self._metrics, result)
        self._finish(request, result=result)

    def _build_result(self, request: _Request, text: str, generated: int, reason: FinishReason) -> CaptionResult:
        finished_at = time.monotonic()
        admitted_at = request.admitted_at if request.admitted_at is not None else finished_at
        perf = request.handle.get_perf_metrics()
        # The pipeline reports milliseconds from add_request. Where it has no figure
        # (no token generated), the engine thread's own clock is used instead.
        own_generation = finished_at - admitted_at
        ttft = _mean_seconds(perf.get_ttft()) or own_generation
        generation = _mean_seconds(perf.get_generate_duration()) or own_generation
        tpot = _mean_seconds(perf.get_tpot())
        if not tpot and generated > 1:
            tpot = max(0.0, generation - ttft) / (generated - 1)
        return CaptionResult(
            text=text,
            prompt_tokens=int(perf.get_num_input_tokens()),
            generated_tokens=generated,
            finish_reason=reason,
            queue_seconds=admitted_at - request.submitted_at,
            time_to_first_token_seconds=ttft,
            generation_seconds=generation,
            time_per_output_token_seconds=tpot,
        )

    def _update_gauges(self) -> None:
        pipeline_metrics = self._pipeline.get_metrics()
        running = int(pipeline_metrics.scheduled_requests)
        waiting = max(0, int(pipeline_metrics.requests) - running)
        # The pipeline reports cache usage in percent.
        usage = float(pipeline_metrics.cache_usage) / 100.0
        with self._lock:
            self._pipeline_metrics = {"running": running, "waiting": waiting, "kv_cache_usage": usage}
        if self._metrics is not None:
            set_request_gauges(self._metrics, running, waiting, usage)

    def _clear_request_gauges(self) -> None:
        # The pipeline's figures describe its last step, which may be long past when idle.
        # With no request left, the cache holds no blocks either, unless prefix caching keeps some.
        if self._pipeline_metrics.get("running") or self._pipeline_metrics.get("waiting"):
            usage = self._pipeline_metrics.get("kv_cache_usage", 0.0)
            if not self._settings.enable_prefix_caching:
                usage = 0.0
            with self._lock:
                self._pipeline_metrics = {"running": 0, "waiting": 0, "kv_cache_usage": usage}
            if self._metrics is not None:
                set_request_gauges(self._metrics, 0, 0, usage)

    def _finish_error(self, request: _Request, error: Exception) -> None:
        self._count("failed")
        self._finish(request, error=error)

    def _finish(self, request: _Request, *, result: CaptionResult | None = None, error: Exception | None = None) -> None:
        """Resolve the future unless the caller cancelled it, and free the admission slot."""
        if result is not None:
            self._count("completed")
        if request.future.set_running_or_notify_cancel():
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)
        self._release(request)

    def _release(self, request: _Request) -> None:
        request.pixels = None
        with self._lock:
            self._in_flight -= 1

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self._counters, name, getattr(self._counters, name) + 1)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            queued = list(self._incoming)
            self._incoming.clear()
            self._closing = True
        for request in queued + list(self._active.values()):
            self._active.pop(request.request_id, None)
            self._finish_error(request, error)


# ------------------------------------------------------------ helpers


def check_prompt(settings: Settings, prompt: str | None) -> str:
    """Return the user prompt, the configured one for None; raise CaptionError when it is too long."""
    user_prompt = settings.prompt if prompt is None else prompt
    if len(user_prompt) > settings.max_prompt_chars:
        raise CaptionError(
            ErrorCode.GENERATION_FAILED,
            f"prompt has {len(user_prompt)} characters, more than max-prompt-chars {settings.max_prompt_chars}",
        )
    return user_prompt


def observe_result(metrics: Metrics, result: CaptionResult) -> None:
    """Record a finished caption's timings and token counts."""
    metrics.queue.observe(result.queue_seconds)
    metrics.time_to_first_token.observe(result.time_to_first_token_seconds)
    metrics.generation.observe(result.generation_seconds)
    if result.generated_tokens > 1:
        metrics.time_per_output_token.observe(result.time_per_output_token_seconds)
    metrics.prompt_tokens.inc(result.prompt_tokens)
    metrics.generated_tokens.inc(result.generated_tokens)


def set_request_gauges(metrics: Metrics, running: int, waiting: int, kv_cache_usage: float | None = None) -> None:
    """Set the running and waiting request gauges, and the KV-cache usage when given."""
    metrics.running_requests.set(running)
    metrics.waiting_requests.set(waiting)
    if kv_cache_usage is not None:
        metrics.kv_cache_usage.set(kv_cache_usage)


def device_properties(inference_precision: str | None, device: str = "CPU", threads: int = 0) -> dict[str, str]:
    """Return OpenVINO device properties: the inference precision, if any, and on CPU the runtime
    cache size and the number of inference threads (0 leaves that to OpenVINO)."""
    properties: dict[str, str] = {}
    if inference_precision is not None:
        properties["INFERENCE_PRECISION_HINT"] = inference_precision
    if device.upper() == "CPU":
        properties["CPU_RUNTIME_CACHE_CAPACITY"] = str(CPU_RUNTIME_CACHE_CAPACITY)
        if threads > 0:
            properties["INFERENCE_NUM_THREADS"] = str(threads)
    return properties


def render_prompt(tokenizer: Any, system_prompt: str, user_prompt: str) -> str:
    """Render the system and user turns through the model's chat template.

    The user turn starts with OpenVINO GenAI's image tag, which the pipeline
    expands into the model's image tokens. The pipeline's tokenizer adds <bos>
    itself when it encodes a rendered prompt, so the template's <bos> is removed
    here to keep one.
    """
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": IMAGE_TAG + user_prompt},
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    bos = tokenizer.get_bos_token()
    if bos and rendered.startswith(bos):
        rendered = rendered[len(bos) :]
    return rendered


def resolve_stop_token_ids(tokenizer: Any) -> set[int]:
    """Return the ids of <eos> and, when the vocabulary has it, <end_of_turn>."""
    stop_ids = {int(tokenizer.get_eos_token_id())}
    encoded = tokenizer.encode(END_OF_TURN, add_special_tokens=False).input_ids.data.ravel()
    if len(encoded) == 1:
        stop_ids.add(int(encoded[0]))
    else:
        logger.warning("tokenizer has no single <end_of_turn> token", extra=fields(token_count=len(encoded)))
    return stop_ids


def build_generation_config(options: GenerationOptions, eos_token_id: int, stop_token_ids: set[int]) -> Any:
    """Translate GenerationOptions into an openvino_genai.GenerationConfig; raise ValueError if invalid."""
    import openvino_genai

    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = options.max_new_tokens
    config.do_sample = options.do_sample
    if options.do_sample:
        config.temperature = options.temperature
        config.top_p = options.top_p
        if options.top_k > 0:
            config.top_k = options.top_k
    config.repetition_penalty = options.repetition_penalty
    if options.seed is not None:
        config.rng_seed = options.seed
    config.stop_strings = set(options.stop_strings)
    # NOTE: openvino-genai 2026.4.1 fails the whole step ("Cannot remove more embeds than
    # has been generated") when a VLM request's first token matches a stop string and the
    # string is to be left out. Keeping it in the output avoids that path, and
    # cut_at_stop_strings() removes it afterwards.
    config.include_stop_str_in_output = True
    config.eos_token_id = eos_token_id
    config.ignore_eos = options.ignore_eos
    if options.ignore_eos:
        # ignore_eos covers <eos> only, so <end_of_turn> would still end the caption early.
        config.stop_token_ids = {eos_token_id}
    else:
        config.stop_token_ids = set(stop_token_ids)
    # The prompt is already rendered through the chat template by render_prompt().
    config.apply_chat_template = False
    try:
        config.validate()
    except RuntimeError as error:
        raise ValueError(f"invalid generation options: {error}") from None
    return config


def cut_at_stop_strings(text: str, stop_strings: tuple[str, ...]) -> str:
    """Return the text before the first occurrence of any stop string."""
    end = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if stop and position != -1:
            end = min(end, position)
    return text[:end]


def finish_reason_name(reason: Any) -> FinishReason:
    name = getattr(reason, "name", str(reason)).upper()
    if name == "LENGTH":
        return "length"
    return "stop"


def check_pixels(pixels: np.ndarray) -> np.ndarray:
    """Return pixels as a C-contiguous uint8 height x width x 3 array; raise ValueError otherwise."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be a uint8 numpy array, got {type(pixels).__name__} {getattr(pixels, 'dtype', '')}")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"pixels must have shape (height, width, 3), got {pixels.shape}")
    return np.ascontiguousarray(pixels)


def gradient_image(side: int) -> np.ndarray:
    """Return a side x side RGB image with red rising left to right and green top to bottom."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    red = np.broadcast_to(ramp[np.newaxis, :], (side, side))
    green = np.broadcast_to(ramp[:, np.newaxis], (side, side))
    blue = np.full((side, side), 128, dtype=np.float32)
    return np.ascontiguousarray(np.stack([red, green, blue], axis=-1).astype(np.uint8))


def check_model_dir(model_dir: Path) -> None:
    """Raise ModelLoadError unless model_dir has a Gemma 3 config.json and every required IR model."""
    config = _read_model_json(model_dir, "config.json")
    model_type = config.get("model_type")
    if model_type is None:
        raise _not_an_export(model_dir, "config.json has no model_type")
    if model_type != "gemma3":
        raise _not_an_export(model_dir, f"config.json has model_type {model_type!r}, expected 'gemma3'")
    for name in REQUIRED_IR_MODELS:
        for suffix in (".xml", ".bin"):
            if not (model_dir / (name + suffix)).is_file():
                raise _not_an_export(model_dir, f"{name}{suffix} is missing")


def read_image_side(model_dir: Path) -> int:
    """Return the vision encoder's input side from preprocessor_config.json or config.json.

    Raises ModelLoadError when neither file gives it.
    """
    if (model_dir / "preprocessor_config.json").exists():
        size = _read_model_json(model_dir, "preprocessor_config.json").get("size", {})
        if isinstance(size, dict) and "height" in size:
            return int(size["height"])
    vision_config = _read_model_json(model_dir, "config.json").get("vision_config")
    if not isinstance(vision_config, dict) or not isinstance(vision_config.get("image_size"), int):
        raise _not_an_export(model_dir, "config.json has no vision_config.image_size")
    return vision_config["image_size"]


def _read_model_json(model_dir: Path, name: str) -> dict[str, Any]:
    path = model_dir / name
    try:
        content = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise _not_an_export(model_dir, f"{name} is missing") from None
    except OSError as error:
        raise _not_an_export(model_dir, f"{name} cannot be read: {error.strerror or error}") from None
    except ValueError as error:
        raise _not_an_export(model_dir, f"{name} is not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise _not_an_export(model_dir, f"{name} does not contain a JSON object")
    return content


def _not_an_export(model_dir: Path, problem: str) -> ModelLoadError:
    return ModelLoadError(f"{model_dir} is not a Gemma 3 OpenVINO export: {problem}; {EXPORT_HINT}")


def _mean_seconds(pair: Any) -> float:
    """Convert an OpenVINO GenAI MeanStdPair in milliseconds to seconds; 0.0 when absent."""
    mean = float(pair.mean)
    return mean / 1000.0 if mean > 0 else 0.0
