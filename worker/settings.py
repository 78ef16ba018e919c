"""Worker settings: one frozen object read from flags and CAPTION_* environment variables.

Every field is both a flag (`--input-topic`) and a variable (`CAPTION_INPUT_TOPIC`).
Flags win because they are passed to the constructor, which pydantic-settings
ranks above the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# The tiny random model shipped in the package, so every command runs on a fresh clone.
# It produces random words; real captions need a real Gemma 3 OpenVINO export.
DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "tiny-gemma3"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_PROMPT = "Describe this image in detail."

# Substrings of librdkafka property names whose values are masked in logs. The
# OAUTHBEARER and JAAS configs carry client secrets inside free-form text.
_SECRET_OPTION_MARKERS = ("password", "secret", ".pem", "token", "oauthbearer.config", "jaas")

# Kafka's legal topic names: ASCII letters, digits, '.', '_' and '-', at most 249 characters.
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")

# URI schemes that the fetcher implements; --allowed-schemes may only narrow this set.
IMPLEMENTED_SCHEMES = frozenset({"s3"})


class SettingsError(Exception):
    """Invalid settings; the message names each offending setting by its flag."""


class Settings(BaseSettings):
    """All settings of the worker and its commands."""

    model_config = SettingsConfigDict(
        env_prefix="CAPTION_",
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    # Kafka
    bootstrap_servers: str = Field("localhost:9092", description="Kafka bootstrap servers, host:port[,host:port]")
    input_topic: str = Field("images", description="topic of image events")
    output_topic: str = Field("captions", description="topic that receives one caption record per image")
    dlq_topic: str = Field("captions-dlq", description="dead-letter topic for error records")
    group_id: str = Field("caption-worker", description="Kafka consumer group")
    kafka_option: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="librdkafka property as key=value, repeatable (TLS, SASL, tuning); "
        "the variable takes a JSON object",
    )
    kafka_sasl_username: str | None = Field(None, description="SASL username")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password")
    delivery: Literal["at-least-once", "exactly-once"] = Field(
        "at-least-once", description="at-least-once, or exactly-once with Kafka transactions"
    )
    transactional_id: str | None = Field(
        None, description="Kafka transactional.id with --delivery exactly-once, unique per running process; "
        "default <group-id>-<host name>-<process id>-<8 random hex digits>, new at each start"
    )
    max_in_flight: int = Field(64, ge=1, le=4096, description="images fetched, decoded or captioned at once")
    commit_interval_seconds: float = Field(5.0, gt=0, description="seconds between offset commits")
    drain_timeout_seconds: float = Field(
        60.0, gt=0, description="seconds that shutdown and revocation wait for in-flight captions"
    )
    max_poll_gap_seconds: float = Field(
        120.0, gt=0, description="/healthz fails when the consumer has not polled for this many seconds"
    )

    # Model and generation
    model: Path = Field(DEFAULT_MODEL_DIR, description="directory of a Gemma 3 OpenVINO export")
    device: str = Field("CPU", description="OpenVINO device")
    system_prompt: str = Field(DEFAULT_SYSTEM_PROMPT, description="system turn of the chat template")
    prompt: str = Field(DEFAULT_PROMPT, description="user instruction sent with each image")
    max_prompt_chars: int = Field(2000, ge=1, description="maximum length in characters of a prompt that an event sets")
    max_new_tokens: int = Field(128, ge=1, le=8192, description="maximum generated tokens per caption")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    temperature: float = Field(1.0, gt=0, description="sampling temperature, with --do-sample")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass, with --do-sample")
    top_k: int = Field(0, ge=0, description="top-k sampling, 0 for no limit, with --do-sample")
    repetition_penalty: float = Field(1.0, gt=0, description="repetition penalty, 1.0 for none")
    stop_strings: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="extra stop strings, repeatable"
    )
    seed: int | None = Field(None, description="random seed for sampling")
    ignore_eos: bool = Field(
        False, description="ignore end of sequence and always generate max-new-tokens tokens, for benchmarks"
    )
    request_timeout_seconds: float = Field(600.0, gt=0, description="deadline of one caption request")

    # Continuous-batching scheduler
    max_num_seqs: int = Field(
        32, ge=1, description="sequences scheduled in one step; no effect while OpenVINO's dynamic split-fuse is on"
    )
    max_num_batched_tokens: int = Field(4096, ge=1, description="tokens scheduled in one step")
    cache_size: int = Field(
        2, ge=0, description="KV cache size in GB; 0 grows it on demand, up to the peak of the running requests"
    )
    enable_prefix_caching: bool = Field(False, description="reuse KV blocks of shared prompt prefixes")
    max_queued_requests: int = Field(64, ge=1, description="requests admitted to the engine at once")
    inference_threads: int = Field(
        0, ge=0, description="OpenVINO inference threads on CPU; 0 lets OpenVINO choose"
    )

    # S3
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint URL, for MinIO and other stores")
    s3_region: str | None = Field(None, description="S3 region")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="S3 addressing style")
    s3_allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="buckets that may be read, repeatable; '*' allows all"
    )
    allowed_schemes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["s3"], description="image URI schemes that events may use"
    )
    fetch_threads: int = Field(8, ge=1, le=256, description="threads that fetch and decode images")
    s3_max_attempts: int = Field(5, ge=1, description="attempts per S3 call before it fails")
    s3_connect_timeout_seconds: float = Field(5.0, gt=0, description="S3 connect timeout")
    s3_read_timeout_seconds: float = Field(30.0, gt=0, description="S3 read timeout")

    # Input and output limits
    max_image_bytes: int = Field(25 * 1024 * 1024, ge=1, description="largest object that is downloaded")
    max_image_pixels: int = Field(50_000_000, ge=1, description="largest width*height that is decoded")
    min_image_side: int = Field(8, ge=1, description="smallest accepted width or height in pixels")
    max_image_side: int = Field(20_000, ge=1, description="largest accepted width or height in pixels")
    max_aspect_ratio: float = Field(20.0, ge=1, description="largest accepted ratio of long to short side")
    max_output_bytes: int = Field(1024 * 1024, ge=1024, description="largest output record")

    # Operations
    metrics_port: int = Field(9400, ge=0, le=65535, description="port of /metrics, /healthz and /readyz")
    metrics_host: str = Field("0.0.0.0", description="address that the metrics server binds")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="key=value text or JSON lines")

    @field_validator("kafka_option", mode="before")
    @classmethod
    def _parse_kafka_options(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("{") else [value]
        if isinstance(value, list):
            return parse_key_values(value)
        return value

    @field_validator("s3_allowed_buckets", "allowed_schemes", "stop_strings", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        # A variable may carry a JSON list or a comma-separated string. NoDecode on
        # these fields stops pydantic-settings from requiring JSON first.
        if isinstance(value, str):
            if value.strip().startswith("["):
                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("model")
    @classmethod
    def _check_model_dir(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model directory not found: {value}")
        return value

    @field_validator("input_topic", "output_topic", "dlq_topic")
    @classmethod
    def _check_topic_name(cls, value: str) -> str:
        if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
            raise ValueError(f"invalid Kafka topic name {value!r}: use 1 to 249 of A-Z a-z 0-9 . _ -")
        return value

    @field_validator("bootstrap_servers")
    @classmethod
    def _check_bootstrap_servers(cls, value: str) -> str:
        for server in value.split(","):
            host, sep, port = server.strip().rpartition(":")
            if not sep or not host or any(ch.isspace() for ch in host) or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port], got {value!r}")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"expected an http:// or https:// URL, got {_mask_url(value)!r}")
        return value

    @field_validator("allowed_schemes")
    @classmethod
    def _check_schemes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - IMPLEMENTED_SCHEMES)
        if unknown:
            raise ValueError(f"unsupported scheme {', '.join(unknown)}: only {', '.join(sorted(IMPLEMENTED_SCHEMES))} is implemented")
        if not value:
            raise ValueError("at least one scheme is needed")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        # Error records carry the image URI, so a dead-letter topic read as input would
        # turn one bad event into an endless loop. An output topic read as input would too.
        if self.input_topic in (self.output_topic, self.dlq_topic):
            raise ValueError(
                f"--input-topic {self.input_topic!r} must differ from --output-topic and --dlq-topic"
            )
        if self.min_image_side > self.max_image_side:
            raise ValueError(
                f"--min-image-side {self.min_image_side} is larger than --max-image-side {self.max_image_side}"
            )
        return self

    def kafka_common_config(self) -> dict[str, str]:
        """Return librdkafka properties shared by the consumer and the producer."""
        config = {"bootstrap.servers": self.bootstrap_servers}
        if self.kafka_sasl_username is not None:
            config["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password is not None:
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        config.update(self.kafka_option)
        return config

    def summary(self) -> str:
        """Return a one-line key=value summary with secrets masked."""
        parts = []
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = "***" if value.get_secret_value() else ""
            elif name == "kafka_option":
                value = {k: ("***" if _is_secret_option(k) else v) for k, v in value.items()}
            elif name == "s3_endpoint_url" and value:
                value = _mask_url(value)
            parts.append(f"{name}={value}")
        return " ".join(parts)


def _is_secret_option(key: str) -> bool:
    return any(marker in key.lower() for marker in _SECRET_OPTION_MARKERS)


def _mask_url(url: str) -> str:
    """Return the URL with any user and password replaced by ***."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def unknown_environment_variables(environ: dict[str, str] | None = None) -> list[str]:
    """Return CAPTION_* variables that name no setting, which are most likely misspelt."""
    environ = os.environ if environ is None else environ
    known = {f"CAPTION_{name.upper()}" for name in Settings.model_fields}
    return sorted(name for name in environ if name.upper().startswith("CAPTION_") and name.upper() not in known)


def parse_key_values(items: list[str]) -> dict[str, str]:
    """Parse `key=value` strings into a dict; raise ValueError on an item without `=`."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        result[key.strip()] = value
    return result


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_settings_arguments(parser: argparse.ArgumentParser, fields: list[str] | None = None) -> None:
    """Add one flag per settings field (or per name in `fields`) to `parser`.

    Flags default to None so that an absent flag leaves the variable or the
    field default in force.
    """
    for name, info in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        help_text = info.description or ""
        annotation = info.annotation
        if annotation is bool:
            parser.add_argument(
                flag_name(name), dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif name in ("kafka_option", "s3_allowed_buckets", "allowed_schemes", "stop_strings"):
            parser.add_argument(flag_name(name), dest=name, default=None, action="append", help=help_text)
        else:
            parser.add_argument(flag_name(name), dest=name, default=None, help=help_text)


def load_settings(args: argparse.Namespace | None = None, **overrides: Any) -> Settings:
    """Build Settings from parsed flags, CAPTION_* variables and defaults, in that order.

    Raises SettingsError whose message names each invalid setting by its flag.
    """
    values: dict[str, Any] = {}
    if args is not None:
        for name in Settings.model_fields:
            value = getattr(args, name, None)
            if value is not None:
                values[name] = value
    values.update(overrides)
    unknown = unknown_environment_variables()
    if unknown:
        raise SettingsError(f"unknown variable {', '.join(unknown)}: no setting has that name; check the spelling")
    try:
        return Settings(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            if field:
                lines.append(f"invalid setting {flag_name(field)} (CAPTION_{field.upper()}): {message}")
            else:
                lines.append(f"invalid settings: {message}")
        raise SettingsError("\n".join(lines)) from None


def load_command_settings(args: argparse.Namespace) -> Settings | None:
    """Load settings for a command and configure logging; print the error and return None when invalid."""
    from worker.logs import configure_logging

    try:
        settings = load_settings(args)
    except SettingsError as error:
        print(error, file=sys.stderr)
        return None
    configure_logging(settings.log_level, settings.log_format)
    return settings
