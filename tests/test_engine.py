"""CaptionEngine on the real continuous-batching pipeline with the tiny model."""

from __future__ import annotations

import json
import shutil
import string
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from worker.engine import CaptionEngine, CaptionResult, GenerationOptions, ModelLoadError, gradient_image
from worker.errors import CaptionError, EngineFull, ErrorCode
from worker.metrics import Metrics
from worker.settings import load_settings

# Long enough that a request is still running when the test acts on it: the tiny
# model needs roughly a millisecond per token, and its context has room for 2048 positions.
LONG_MAX_NEW_TOKENS = 1900

# Upper bound for waits on the engine thread, so a broken engine fails the test instead of hanging it.
WAIT_SECONDS = 60.0


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(40 + seed % 7, 56, 3), dtype=np.uint8)


def _engine(tiny_model_dir, metrics: Metrics | None = None, precision: str | None = None, **overrides) -> CaptionEngine:
    settings = load_settings(None, model=tiny_model_dir, cache_size=1, **overrides)
    engine = CaptionEngine.from_settings(settings, metrics, inference_precision=precision)
    engine.start()
    return engine


def _long_options() -> GenerationOptions:
    return GenerationOptions(max_new_tokens=LONG_MAX_NEW_TOKENS, ignore_eos=True)


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_queued_requests=16)
    yield engine
    engine.close(10.0)


def test_warm_up_returns_caption(engine):
    result = engine.warm_up()

    assert isinstance(result, CaptionResult)
    assert result.text.strip()
    assert result.prompt_tokens > 0


def test_result_has_counts_and_timings(engine):
    result = engine.submit(_image(1), None, GenerationOptions(max_new_tokens=6)).result(WAIT_SECONDS)

    assert result.generated_tokens >= 1
    assert result.finish_reason in ("stop", "length")
    assert result.queue_seconds >= 0
    assert result.time_to_first_token_seconds > 0
    assert result.generation_seconds >= result.time_to_first_token_seconds
    assert result.time_per_output_token_seconds >= 0


def test_submissions_from_many_threads(engine):
    results: dict[int, CaptionResult] = {}
    errors: list[BaseException] = []

    def submit_four(thread_index: int) -> None:
        try:
            futures = {
                thread_index * 4 + i: engine.submit(_image(thread_index * 4 + i), None, GenerationOptions(max_new_tokens=8))
                for i in range(4)
            }
            for key, future in futures.items():
                results[key] = future.result(WAIT_SECONDS)
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=submit_four, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)

    assert errors == []
    assert sorted(results) == list(range(16))
    assert all(result.text.strip() for result in results.values())


def test_caption_has_no_surrounding_whitespace(engine):
    futures = [engine.submit(_image(seed), None, GenerationOptions(max_new_tokens=6)) for seed in range(8)]

    captions = [future.result(WAIT_SECONDS).text for future in futures]

    for caption in captions:
        assert caption == caption.strip(), repr(caption)


def test_max_new_tokens_with_ignore_eos_is_exact(engine):
    options = GenerationOptions(max_new_tokens=5, ignore_eos=True)

    result = engine.submit(_image(2), None, options).result(WAIT_SECONDS)

    assert result.generated_tokens == 5
    assert result.finish_reason == "length"


def test_max_new_tokens_is_upper_bound(engine):
    result = engine.submit(_image(3), None, GenerationOptions(max_new_tokens=3)).result(WAIT_SECONDS)

    assert result.generated_tokens <= 3


def test_stop_string_ends_caption_before_it(engine):
    full = engine.submit(_image(4), None, GenerationOptions(max_new_tokens=12)).result(WAIT_SECONDS)
    stop = full.text.split()[1]

    stopped = engine.submit(_image(4), None, GenerationOptions(max_new_tokens=12, stop_strings=(stop,)))
    result = stopped.result(WAIT_SECONDS)

    assert result.finish_reason == "stop"
    assert stop not in result.text
    assert full.text.startswith(result.text)


def test_stop_string_on_first_token_is_empty_caption(engine):
    # Every letter and digit is a stop string, so the caption ends inside its first word.
    options = GenerationOptions(max_new_tokens=8, stop_strings=tuple(string.ascii_letters + string.digits))

    future = engine.submit(_image(5), None, options)

    with pytest.raises(CaptionError) as caught:
        future.result(WAIT_SECONDS)
    assert caught.value.code == ErrorCode.EMPTY_CAPTION


def test_empty_caption_leaves_batch_unharmed(engine):
    empty = GenerationOptions(max_new_tokens=8, stop_strings=tuple(string.ascii_letters))
    normal = GenerationOptions(max_new_tokens=8)

    futures = [engine.submit(_image(6), None, empty if i % 2 else normal) for i in range(6)]

    for i, future in enumerate(futures):
        if i % 2:
            with pytest.raises(CaptionError):
                future.result(WAIT_SECONDS)
        else:
            assert future.result(WAIT_SECONDS).text.strip()


def test_prompt_override_changes_prompt_tokens(engine):
    short = engine.submit(_image(7), "Caption.", GenerationOptions(max_new_tokens=2)).result(WAIT_SECONDS)
    default = engine.submit(_image(7), None, GenerationOptions(max_new_tokens=2)).result(WAIT_SECONDS)

    assert short.prompt_tokens < default.prompt_tokens


def test_over_long_prompt_is_rejected(engine):
    with pytest.raises(CaptionError) as caught:
        engine.submit(_image(8), "x" * 2001, GenerationOptions())
    assert caught.value.code == ErrorCode.GENERATION_FAILED
    assert "max-prompt-chars" in caught.value.message


def test_pixels_of_wrong_shape_are_rejected(engine):
    with pytest.raises(ValueError):
        engine.submit(np.zeros((8, 8), dtype=np.uint8), None, GenerationOptions())
    with pytest.raises(ValueError):
        engine.submit(np.zeros((8, 8, 3), dtype=np.float32), None, GenerationOptions())


def test_cancelled_future_frees_its_slot(engine):
    future = engine.submit(_image(9), None, _long_options())
    _wait_for(lambda: engine.stats()["running"] >= 1 or future.done(), "the request to start")

    assert future.cancel()
    _wait_for(lambda: engine.free_slots() == 16, "the slot to be released")

    assert engine.stats()["cancelled"] >= 1
    with pytest.raises(CancelledError):
        future.result(0)


def test_engine_full_when_admission_is_full(tiny_model_dir):
    engine = _engine(tiny_model_dir, max_queued_requests=2)
    try:
        futures = [engine.submit(_image(i), None, _long_options()) for i in range(2)]

        assert engine.free_slots() == 0
        with pytest.raises(EngineFull):
            engine.submit(_image(3), None, GenerationOptions())

        for future in futures:
            future.cancel()
        _wait_for(lambda: engine.free_slots() == 2, "cancelled requests to free their slots")
        assert engine.submit(_image(4), None, GenerationOptions(max_new_tokens=2)).result(WAIT_SECONDS)
    finally:
        engine.close(10.0)


def test_deadline_fails_runaway_request(tiny_model_dir):
    engine = _engine(tiny_model_dir, request_timeout_seconds=0.1, max_queued_requests=4)
    try:
        future = engine.submit(_image(1), None, _long_options())

        with pytest.raises(CaptionError) as caught:
            future.result(WAIT_SECONDS)
        assert caught.value.code == ErrorCode.GENERATION_FAILED
        assert caught.value.retryable is True
        assert "timed out" in caught.value.message
        assert engine.stats()["timed_out"] == 1
        _wait_for(lambda: engine.free_slots() == 4, "the slot to be released")
    finally:
        engine.close(10.0)


def test_close_fails_unfinished_requests(tiny_model_dir):
    engine = _engine(tiny_model_dir)
    future = engine.submit(_image(1), None, _long_options())

    engine.close(0.0)

    with pytest.raises(CaptionError) as caught:
        future.result(WAIT_SECONDS)
    assert caught.value.code == ErrorCode.GENERATION_FAILED
    assert caught.value.retryable is True
    with pytest.raises(RuntimeError):
        engine.submit(_image(2), None, GenerationOptions())


def test_metrics_are_updated(tiny_model_dir):
    metrics = Metrics()
    engine = _engine(tiny_model_dir, metrics=metrics)
    try:
        engine.submit(_image(1), None, GenerationOptions(max_new_tokens=4, ignore_eos=True)).result(WAIT_SECONDS)
    finally:
        engine.close(10.0)

    registry = metrics.registry
    assert registry.get_sample_value("caption_worker_generated_tokens_total") == 4
    assert registry.get_sample_value("caption_worker_prompt_tokens_total") > 0
    assert registry.get_sample_value("caption_worker_generation_seconds_count") == 1
    assert registry.get_sample_value("caption_worker_kv_cache_usage_ratio") is not None


def test_greedy_f32_batched_equals_sequential(tiny_model_dir):
    engine = _engine(tiny_model_dir, precision="f32")
    options = GenerationOptions(max_new_tokens=16, ignore_eos=True)
    images = [_image(seed) for seed in range(6)] + [gradient_image(64)]
    try:
        sequential = [engine.submit(image, None, options).result(WAIT_SECONDS).text for image in images]
        futures = [engine.submit(image, None, options) for image in images]
        batched = [future.result(WAIT_SECONDS).text for future in futures]
    finally:
        engine.close(10.0)

    assert batched == sequential
    assert len(set(sequential)) > 1


@pytest.mark.parametrize("removed", ["openvino_vision_embeddings_model.bin", "openvino_tokenizer.xml"])
def test_missing_model_file_raises_model_load_error(tiny_model_dir, tmp_path, removed):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / removed).unlink()
    settings = load_settings(None, model=model_dir, cache_size=1)

    with pytest.raises(ModelLoadError) as caught:
        CaptionEngine.from_settings(settings, None)

    assert "is not a Gemma 3 OpenVINO export" in str(caught.value)
    assert removed in str(caught.value)


def test_unreadable_model_file_fails_start(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "openvino_language_model.xml").write_text("<net")
    engine = CaptionEngine.from_settings(load_settings(None, model=model_dir, cache_size=1), None)

    with pytest.raises(ModelLoadError) as caught:
        engine.start()

    message = str(caught.value)
    assert "could not load" in message
    assert "openvino_language_model.xml" in message
    assert "\n" not in message


def test_bench_engine_prints_ratios(tiny_model_dir, capsys):
    from worker.cli import main

    exit_code = main(["bench", "engine", "--model", str(tiny_model_dir), "--images", "2", "--json"])

    report = json.loads(capsys.readouterr().out)
    assert exit_code == 0
    assert set(report["runs"]) == {"sequential", "1", "8", "32"}
    assert set(report["ratio_vs_sequential"]) == {"1", "8", "32"}
    assert report["runs"]["32"]["images"] == 2
    assert report["runs"]["sequential"]["tokens_per_second"] > 0
