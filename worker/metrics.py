"""Every Prometheus metric of the worker, with the prefix caption_worker_.

Labels are bounded: outcomes, error codes, S3 error codes from a fixed list,
librdkafka error names (a fixed enumeration) and partition numbers of the one input topic. Never keys, ids or URIs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics

from worker.errors import ErrorCode
from worker.events import SKIP_FOLDER, SKIP_NOT_CREATED, SKIP_NULL_VALUE, SKIP_TEST_EVENT

PREFIX = "caption_worker"

# Fetches take milliseconds; captions on a busy CPU can take minutes.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SLOW_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
BYTES_BUCKETS = tuple(float(2**n) for n in range(10, 27, 2))  # 1 KiB to 64 MiB

# S3 error codes kept as label values; anything else is counted as "other".
S3_ERROR_CODES = frozenset(
    {
        "NoSuchKey",
        "NoSuchBucket",
        "NoSuchVersion",
        "AccessDenied",
        "SlowDown",
        "Throttling",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "IncompleteBody",
        "ConnectionError",
        "ReadTimeout",
        "400",
        "403",
        "404",
        "429",
        "500",
        "502",
        "503",
        "504",
    }
)

# librdkafka error names of a broker outage, whose series start at 0. Other names appear at their first error.
KAFKA_OUTAGE_ERRORS = ("_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_MSG_TIMED_OUT")


def s3_error_label(code: str) -> str:
    """Map an S3 error code or HTTP status to a bounded label value."""
    return code if code in S3_ERROR_CODES else "other"


class Metrics:
    """The worker's metrics, registered in one registry (a fresh one per instance by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The *_created series double the exposition without helping any query or alert.
        # The switch is process-wide in prometheus_client, so it is set here, not at import.
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        self._define_flow(self.registry)
        self._define_latency(self.registry)
        self._define_engine(self.registry)
        self._define_kafka(self.registry)
        self._start_known_labels_at_zero()

    def _define_flow(self, r: CollectorRegistry) -> None:
        self.messages = Counter(
            f"{PREFIX}_messages_total",
            "Input messages finished, by outcome: captioned, dead_lettered (at least one error record) or skipped",
            ["outcome"],
            registry=r,
        )
        self.captions = Counter(f"{PREFIX}_captions_total", "Caption records acknowledged by the broker", registry=r)
        self.failures = Counter(
            f"{PREFIX}_failures_total", "Error records acknowledged on the dead-letter topic, by error code", ["code"],
            registry=r,
        )
        self.skipped = Counter(
            f"{PREFIX}_skipped_total",
            "Input records skipped without a caption: test_event, not_created, folder or null_value",
            ["reason"],
            registry=r,
        )
        self.s3_errors = Counter(
            f"{PREFIX}_s3_errors_total", "Failed S3 calls, by S3 error code or HTTP status", ["code"], registry=r
        )
        self.fetch_retries = Counter(f"{PREFIX}_fetch_retries_total", "S3 fetches tried again", registry=r)
        self.in_flight = Gauge(f"{PREFIX}_in_flight_images", "Images being fetched, decoded or captioned", registry=r)
        self.info = Info(f"{PREFIX}_build", "Model, device and worker version", registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz passes", registry=r)

    def _start_known_labels_at_zero(self) -> None:
        """Create the series of every label value known in advance, at 0.

        A series that first appears with the value 1 has no increase for rate() and
        increase(), so the first failure of a code or the first failed commit would
        stay invisible to the dashboard and the alerts. Series scraped at 0 first do not.
        """
        known_labels = [
            (self.messages, "outcome", ("captioned", "dead_lettered", "skipped")),
            (self.failures, "code", tuple(code.value for code in ErrorCode)),
            (self.skipped, "reason", (SKIP_TEST_EVENT, SKIP_NOT_CREATED, SKIP_FOLDER, SKIP_NULL_VALUE)),
            (self.commits, "result", ("ok", "failed")),
            (self.rebalances, "kind", ("assign", "revoke", "lost")),
            (self.transactions, "result", ("committed", "aborted")),
            (self.kafka_errors, "code", KAFKA_OUTAGE_ERRORS),
        ]
        for counter, label, values in known_labels:
            for value in values:
                counter.labels(**{label: value})

    def _define_latency(self, r: CollectorRegistry) -> None:
        self.end_to_end = Histogram(
            f"{PREFIX}_end_to_end_seconds",
            "Seconds from the input message's timestamp to the acknowledged output or error record",
            buckets=SLOW_BUCKETS,
            registry=r,
        )
        self.fetch = Histogram(f"{PREFIX}_fetch_seconds", "Seconds to download one object", buckets=FAST_BUCKETS, registry=r)
        self.decode = Histogram(f"{PREFIX}_decode_seconds", "Seconds to decode one image", buckets=FAST_BUCKETS, registry=r)
        self.image_bytes = Histogram(
            f"{PREFIX}_image_bytes", "Size of downloaded objects", buckets=BYTES_BUCKETS, registry=r
        )
        self.queue = Histogram(
            f"{PREFIX}_queue_seconds", "Seconds a request waited in the engine before its first step",
            buckets=SLOW_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Seconds from admission to the first generated token",
            buckets=SLOW_BUCKETS, registry=r,
        )
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Mean seconds per generated token after the first",
            buckets=TOKEN_BUCKETS, registry=r,
        )
        self.generation = Histogram(
            f"{PREFIX}_generation_seconds", "Seconds from admission to the last generated token",
            buckets=SLOW_BUCKETS, registry=r,
        )

    def _define_engine(self, r: CollectorRegistry) -> None:
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens_total", "Tokens generated", registry=r)
        self.running_requests = Gauge(f"{PREFIX}_engine_running_requests", "Requests being generated", registry=r)
        self.waiting_requests = Gauge(f"{PREFIX}_engine_waiting_requests", "Requests waiting to be scheduled", registry=r)
        self.kv_cache_usage = Gauge(
            f"{PREFIX}_kv_cache_usage_ratio", "Fraction of the KV cache in use, 0 to 1", registry=r
        )

    def _define_kafka(self, r: CollectorRegistry) -> None:
        self.consumer_lag = Gauge(
            f"{PREFIX}_consumer_lag", "Messages behind the high watermark, per assigned input partition",
            ["partition"], registry=r,
        )
        self.paused_partitions = Gauge(f"{PREFIX}_paused_partitions", "Input partitions paused by backpressure", registry=r)
        self.assigned_partitions = Gauge(f"{PREFIX}_assigned_partitions", "Input partitions assigned", registry=r)
        self.commits = Counter(
            f"{PREFIX}_commits_total", "Offset commits, by result: ok or failed", ["result"], registry=r
        )
        self.rebalances = Counter(
            f"{PREFIX}_rebalances_total", "Rebalance callbacks, by kind: assign, revoke or lost", ["kind"], registry=r
        )
        self.transactions = Counter(
            f"{PREFIX}_transactions_total", "Kafka transactions, by result: committed or aborted", ["result"],
            registry=r,
        )
        self.kafka_errors = Counter(
            f"{PREFIX}_kafka_errors_total",
            "Errors that the Kafka clients reported to the worker, by librdkafka error name (a fixed set)",
            ["code"], registry=r,
        )
        self.last_poll = Gauge(
            f"{PREFIX}_last_poll_timestamp_seconds", "Unix time of the consumer's last poll", registry=r
        )
