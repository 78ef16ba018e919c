"""EngineProcess: the caption engine in a child process, on the real pipeline with the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from worker.engine import CaptionEngine, GenerationOptions, ModelLoadError
from worker import engine_process
from worker.engine_process import EngineProcess
from worker.errors import CaptionError, EngineFull, EngineStopped, ErrorCode
from worker.localrun import find_engine_pid
from worker.metrics import Metrics
from worker.settings import load_settings

# Long enough that a request is still running when the test acts on it (about 1 ms per token).
LONG_OPTIONS = GenerationOptions(max_new_tokens=1900, ignore_eos=True)
WAIT_SECONDS = 60.0


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(48, 48 + seed % 5, 3), dtype=np.uint8)


def _settings(tiny_model_dir, **overrides):
    return load_settings(None, model=tiny_model_dir, cache_size=1, **overrides)


def _wait_for(condition, description: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {description}"
        time.sleep(0.01)


def _engine_pid(engine: EngineProcess) -> int:
    return engine._process.pid


@pytest.fixture
def make_engine(tiny_model_dir):
    started: list[EngineProcess] = []

    def make(metrics: Metrics | None = None, precision: str | None = None, **overrides) -> EngineProcess:
        engine = EngineProcess(_settings(tiny_model_dir, **overrides), metrics, inference_precision=precision)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.close(5.0)


def test_captions_match_the_engine_in_this_process(make_engine, tiny_model_dir):
    # f32 makes greedy captions independent of batching, so both engines must agree exactly.
    options = GenerationOptions(max_new_tokens=12)
    in_process = CaptionEngine(_settings(tiny_model_dir), None, inference_precision="f32")
    in_process.start()
    try:
        expected = [in_process.submit(_image(seed), None, options).result(WAIT_SECONDS) for seed in range(6)]
    finally:
        in_process.close(5.0)

    engine = make_engine(precision="f32")
    futures = [engine.submit(_image(seed), None, options) for seed in range(6)]
    results = [future.result(WAIT_SECONDS) for future in futures]

    assert [result.text for result in results] == [result.text for result in expected]
    assert [result.generated_tokens for result in results] == [result.generated_tokens for result in expected]
    assert all(result.prompt_tokens > 0 and result.generation_seconds > 0 for result in results)


def test_metrics_are_recorded_in_the_parent(make_engine):
    metrics = Metrics()
    engine = make_engine(metrics)
    engine.submit(_image(1), None, GenerationOptions(max_new_tokens=5, ignore_eos=True)).result(WAIT_SECONDS)

    assert metrics.generated_tokens._value.get() == 5
    assert metrics.prompt_tokens._value.get() > 0
    assert metrics.generation._sum.get() > 0
    # The child reports its step figures twice a second.
    _wait_for(lambda: "running" in engine.stats(), "the child's first report")
    assert engine.stats()["completed"] == 1


def test_submit_rejects_long_prompt_and_bad_pixels(make_engine):
    engine = make_engine(max_prompt_chars=10)
    with pytest.raises(CaptionError) as raised:
        engine.submit(_image(1), "x" * 11, GenerationOptions())
    assert raised.value.code == ErrorCode.GENERATION_FAILED
    with pytest.raises(ValueError):
        engine.submit(np.zeros((8, 8), dtype=np.uint8), None, GenerationOptions())
    assert engine.free_slots() == engine._settings.max_queued_requests


def test_full_admission_and_cancelled_slot(make_engine):
    engine = make_engine(max_queued_requests=2)
    first = engine.submit(_image(1), None, LONG_OPTIONS)
    second = engine.submit(_image(2), None, LONG_OPTIONS)
    with pytest.raises(EngineFull):
        engine.submit(_image(3), None, LONG_OPTIONS)

    assert first.cancel() or first.done()
    # The slot frees when the child reports the request cancelled, not when the future is.
    _wait_for(lambda: engine.free_slots() == 1, "the child to release the cancelled request")
    second.cancel()
    with pytest.raises(CancelledError):
        second.result(0)


def test_close_fails_unfinished_requests_as_retryable(make_engine):
    engine = make_engine()
    future = engine.submit(_image(1), None, GenerationOptions(max_new_tokens=1900, ignore_eos=True))
    engine.close(0.2)

    with pytest.raises(CaptionError) as raised:
        future.result(WAIT_SECONDS)
    assert raised.value.retryable
    assert not engine._process.is_alive()
    with pytest.raises(RuntimeError):
        engine.submit(_image(2), None, GenerationOptions())


def test_killed_child_fails_pending_futures_with_engine_stopped(make_engine):
    engine = make_engine()
    futures = [engine.submit(_image(seed), None, LONG_OPTIONS) for seed in range(3)]
    os.kill(_engine_pid(engine), signal.SIGKILL)

    for future in futures:
        with pytest.raises(EngineStopped):
            future.result(WAIT_SECONDS)
    assert "code -9" in engine.failure
    with pytest.raises(EngineStopped):
        engine.submit(_image(4), None, GenerationOptions())


def test_missing_model_file_raises_before_any_process_starts(tiny_model_dir, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name != "openvino_language_model.bin":
            (broken / path.name).symlink_to(path)
    with pytest.raises(ModelLoadError, match="openvino_language_model.bin is missing"):
        EngineProcess(_settings(broken), None)


def test_unloadable_model_fails_start(tiny_model_dir, tmp_path):
    broken = tmp_path / "model"
    broken.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name == "openvino_language_model.xml":
            (broken / path.name).write_text("<net>not a model")
        else:
            (broken / path.name).symlink_to(path)
    engine = EngineProcess(_settings(broken), None)
    with pytest.raises(ModelLoadError, match="could not load"):
        engine.start()
    assert engine._process.exitcode == 0


def test_child_exits_when_its_parent_is_killed(tiny_model_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import os, signal
        from worker.engine_process import EngineProcess
        from worker.settings import load_settings

        if __name__ == "__main__":
            engine = EngineProcess(load_settings(None, model={str(tiny_model_dir)!r}, cache_size=1), None)
            engine.start()
            print(engine._process.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    parent = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=WAIT_SECONDS)
    assert parent.returncode == -signal.SIGKILL, parent.stderr
    child = int(parent.stdout.split()[0])

    _wait_for(lambda: not os.path.exists(f"/proc/{child}") or _is_zombie(child), "the orphaned child to exit")


def test_find_engine_pid_skips_resource_tracker(make_engine):
    engine = make_engine()
    assert find_engine_pid(os.getpid()) == _engine_pid(engine)


def test_submit_does_not_wait_for_a_stopped_child(make_engine):
    engine = make_engine()
    # A full-size Gemma 3 image (896 x 896 RGB) is far larger than a pipe's buffer.
    pixels = np.zeros((896, 896, 3), dtype=np.uint8)
    os.kill(_engine_pid(engine), signal.SIGSTOP)
    try:
        submitter = threading.Thread(
            target=lambda: [engine.submit(pixels, None, GenerationOptions(max_new_tokens=4)) for _ in range(4)],
            daemon=True,
        )
        submitter.start()
        submitter.join(WAIT_SECONDS)
        assert not submitter.is_alive(), "submit() waited on the pipe to a stopped child"
    finally:
        os.kill(_engine_pid(engine), signal.SIGCONT)


def test_stuck_child_is_killed_after_the_request_deadline(make_engine, monkeypatch):
    monkeypatch.setattr(engine_process, "OVERDUE_SECONDS", 0.5)
    engine = make_engine(request_timeout_seconds=1.0)
    pid = _engine_pid(engine)
    os.kill(pid, signal.SIGSTOP)
    future = engine.submit(_image(1), None, GenerationOptions(max_new_tokens=4))

    with pytest.raises(EngineStopped, match="past request-timeout-seconds"):
        future.result(WAIT_SECONDS)
    assert "past request-timeout-seconds" in engine.failure
    _wait_for(lambda: _is_zombie(pid), "the stuck child to be killed")


def test_process_tied_to_its_parent_dies_with_it(tmp_path):
    # A stand-in for an engine process that is still loading its model: it only sleeps.
    child_script = tmp_path / "child.py"
    child_script.write_text(textwrap.dedent(
        """
        import os, sys, time
        from worker.engine_process import _die_with_parent

        _die_with_parent(int(sys.argv[1]))
        print(os.getpid(), flush=True)
        time.sleep(60)
        """
    ))
    parent_script = tmp_path / "parent.py"
    parent_script.write_text(textwrap.dedent(
        f"""
        import os, subprocess, sys, time

        child = subprocess.Popen([sys.executable, {str(child_script)!r}, str(os.getpid())], stdout=subprocess.PIPE)
        print(child.stdout.readline().decode().strip(), flush=True)
        time.sleep(60)
        """
    ))
    parent = subprocess.Popen([sys.executable, str(parent_script)], stdout=subprocess.PIPE)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(WAIT_SECONDS)
        _wait_for(lambda: _is_zombie(child), "the child of a killed parent to die")
    finally:
        parent.kill()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
