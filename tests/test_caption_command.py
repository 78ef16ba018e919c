"""`caption-worker caption FILE...` on the tiny model and the bundled photographs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"fetch", "decode", "queue", "time_to_first_token", "generation", "total"}


@pytest.fixture
def bad_files(tmp_path) -> dict[str, Path]:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((ROOT / "worker" / "samples" / "chelsea.jpg").read_bytes()[:2000])
    return {"text": text, "empty": empty, "truncated": truncated, "missing": tmp_path / "missing.jpg"}


def _run_cli(*args: str | bytes, text: bool = True, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker", "caption", *args],
        capture_output=True,
        text=text,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
    )


def test_lines_follow_input_order_past_bad_files(tiny_model_dir, sample_photos, bad_files):
    files = [
        sample_photos[0],
        bad_files["text"],
        sample_photos[1],
        bad_files["missing"],
        bad_files["empty"],
        bad_files["truncated"],
        sample_photos[2],
    ]

    completed = _run_cli("--model", str(tiny_model_dir), "--max-new-tokens", "8", *map(str, files))

    lines = [json.loads(line) for line in completed.stdout.splitlines()]
    assert completed.returncode == 1, completed.stderr
    assert [line["image"] for line in lines] == [str(path) for path in files]
    assert [line.get("error", {}).get("code") for line in lines] == [
        None,
        "unsupported_format",
        None,
        "image_not_found",
        "empty_object",
        "corrupt_image",
        None,
    ]


def test_odd_file_names_give_utf8_json(tiny_model_dir, sample_photos, tmp_path):
    photo = sample_photos[0].read_bytes()
    non_utf8_name = os.fsencode(tmp_path) + b"/bad\xffname.jpg"
    accented_name = os.fsencode(tmp_path) + "/café.jpg".encode()
    missing_name = os.fsencode(tmp_path) + b"/missing\xfe.jpg"
    for name in (non_utf8_name, accented_name):
        with open(name, "wb") as file:
            file.write(photo)

    # PYTHONIOENCODING=ascii simulates a locale that is not UTF-8.
    completed = _run_cli(
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
        non_utf8_name,
        accented_name,
        missing_name,
        text=False,
        PYTHONIOENCODING="ascii",
    )

    lines = [json.loads(line) for line in completed.stdout.decode("utf-8").splitlines()]
    assert completed.returncode == 1, completed.stderr
    assert [line["image"] for line in lines] == [
        f"{tmp_path}/bad\\xffname.jpg",
        f"{tmp_path}/café.jpg",
        f"{tmp_path}/missing\\xfe.jpg",
    ]
    assert "caption" in lines[0]
    assert "caption" in lines[1]
    assert lines[2]["error"]["message"] == f"file not found: {tmp_path}/missing\\xfe.jpg"


def test_success_line_has_caption_and_timings(tiny_model_dir, sample_photos, capsys):
    exit_code = main(["caption", "--model", str(tiny_model_dir), "--max-new-tokens", "6", str(sample_photos[0])])

    line = json.loads(capsys.readouterr().out)
    assert exit_code == 0
    assert line["caption"].strip()
    assert line["model"] == tiny_model_dir.name
    assert line["finish_reason"] in ("stop", "length")
    assert 1 <= line["generated_tokens"] <= 6
    assert set(line["timings"]) == TIMING_KEYS


def test_full_engine_waits_for_room(tiny_model_dir, sample_photos, capsys):
    files = [str(path) for path in sample_photos] * 2

    exit_code = main(
        ["caption", "--model", str(tiny_model_dir), "--max-new-tokens", "4", "--max-queued-requests", "2", *files]
    )

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert exit_code == 0
    assert [line["image"] for line in lines] == files
    assert all("caption" in line for line in lines)


def test_prompt_flag_changes_prompt(tiny_model_dir, sample_photos, capsys):
    arguments = ["caption", "--model", str(tiny_model_dir), "--max-new-tokens", "12", str(sample_photos[0])]

    main(arguments)
    default_caption = json.loads(capsys.readouterr().out)["caption"]
    main([*arguments, "--prompt", "List the colours."])
    other_caption = json.loads(capsys.readouterr().out)["caption"]

    assert other_caption != default_caption


@pytest.mark.parametrize(
    ("config", "named_file"),
    [
        (None, "config.json"),
        ("{}", "model_type"),
        ("[1, 2", "config.json is not valid JSON"),
        ('{"model_type": "gemma3"}', "openvino_language_model.xml"),
    ],
)
def test_wrong_model_folder_exits_with_one_line(tmp_path, sample_photos, config, named_file):
    if config is not None:
        (tmp_path / "config.json").write_text(config)

    completed = _run_cli("--model", str(tmp_path), str(sample_photos[0]))

    assert completed.returncode == 4
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr
    error_lines = [line for line in completed.stderr.splitlines() if " ERROR " in line]
    assert len(error_lines) == 1, completed.stderr
    assert "is not a Gemma 3 OpenVINO export" in error_lines[0]
    assert named_file in error_lines[0]


def test_invalid_setting_exits_with_usage_code(tiny_model_dir, sample_photos, capsys):
    exit_code = main(["caption", "--model", str(tiny_model_dir), "--max-new-tokens", "0", str(sample_photos[0])])

    assert exit_code == 2
    assert "--max-new-tokens" in capsys.readouterr().err
