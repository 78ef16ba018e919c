"""Tests of worker.events: own events, Amazon S3 notifications and MinIO notifications."""

from __future__ import annotations

import json
import urllib.parse

import pytest

from worker.errors import CaptionError, ErrorCode
from worker.events import MAX_METADATA_BYTES, MAX_RECORDS, ImageRef, parse_message
from worker.settings import SettingsError, load_settings

SETTINGS = load_settings(max_prompt_chars=50, max_new_tokens=64)


def parse(document, default_id: str = "images-0-42", settings=SETTINGS):
    value = document if isinstance(document, bytes) else json.dumps(document).encode()
    return parse_message(value, default_id=default_id, settings=settings)


def only_image(document, **kwargs):
    parsed = parse(document, **kwargs)
    assert parsed.failures == []
    assert parsed.skipped == []
    assert len(parsed.images) == 1
    return parsed.images[0]


def only_failure(document, **kwargs):
    parsed = parse(document, **kwargs)
    assert parsed.images == []
    assert len(parsed.failures) == 1
    return parsed.failures[0]


def s3_record(key: str, event_name: str = "ObjectCreated:Put", bucket: str = "photos", **object_fields) -> dict:
    """Build one record as Amazon S3 sends it: the key form-encoded, as in a query string."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "eu-west-1",
        "eventTime": "2025-01-01T00:00:00.000Z",
        "eventName": event_name,
        "s3": {
            "s3SchemaVersion": "1.0",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {"key": key, "size": 1234, "eTag": "0123", "sequencer": "00AB", **object_fields},
        },
    }


def minio_notification(bucket: str, key: str, event_name: str = "s3:ObjectCreated:Put") -> dict:
    # MinIO escapes the key like a query value, so `/` becomes %2F and a space `+`.
    encoded = urllib.parse.quote_plus(key, safe="")
    record = s3_record(encoded, event_name=event_name, bucket=bucket)
    record["eventSource"] = "minio:s3"
    return {"EventName": event_name, "Key": f"{bucket}/{encoded}", "Records": [record]}


# Own events


def test_own_event_with_uri():
    request = only_image({"image": "s3://photos/cats/tabby.jpg"})

    assert request.image == ImageRef("s3", "photos", "cats/tabby.jpg")
    assert request.id == "images-0-42"
    assert request.prompt is None
    assert request.max_new_tokens is None
    assert request.metadata == {}


def test_own_event_with_object_and_all_fields():
    request = only_image(
        {
            "id": "upload-7",
            "image": {"bucket": "photos", "key": "a b/c+d.jpg", "version_id": "v3"},
            "prompt": "Name the animal.",
            "max_new_tokens": 20,
            "metadata": {"user": 12, "tags": ["x"]},
        }
    )

    assert request.image == ImageRef("s3", "photos", "a b/c+d.jpg", "v3")
    assert request.image.uri == "s3://photos/a b/c+d.jpg"
    assert request.id == "upload-7"
    assert request.prompt == "Name the animal."
    assert request.max_new_tokens == 20
    assert request.metadata == {"user": 12, "tags": ["x"]}


def test_own_uri_key_is_literal_not_percent_decoded():
    request = only_image({"image": "s3://photos/my+photo%20(1).jpg"})

    assert request.image.key == "my+photo%20(1).jpg"


def test_own_uri_scheme_is_case_insensitive():
    assert only_image({"image": "S3://photos/a.jpg"}).image.scheme == "s3"


@pytest.mark.parametrize(
    "uri", ["https://example.com/a.jpg", "http://127.0.0.1/a.jpg", "file:///etc/passwd", "gs://bucket/a.jpg"]
)
def test_other_schemes_are_unsupported_scheme(uri):
    failure = only_failure({"id": "e1", "image": uri})

    assert failure.error.code == ErrorCode.UNSUPPORTED_SCHEME
    assert failure.id == "e1"
    assert failure.image == uri


def test_unimplemented_scheme_cannot_be_allowed():
    # Allowing a scheme that the fetcher lacks would dead-letter good events, so it
    # stops the worker at startup instead.
    with pytest.raises(SettingsError) as caught:
        load_settings(allowed_schemes=["s3", "https"])

    assert "--allowed-schemes" in str(caught.value)


@pytest.mark.parametrize(
    ("document", "mentions"),
    [
        ({"image": 5}, "`image`"),
        ({"image": "photos/a.jpg"}, "URI"),
        ({"image": "s3://photos"}, "lacks"),
        ({"image": "s3:///a.jpg"}, "lacks"),
        ({"image": {"bucket": "photos"}}, "image.key"),
        ({"image": {"bucket": "", "key": "a.jpg"}}, "image.bucket"),
        ({"image": {"bucket": "photos", "key": "a.jpg", "versionId": "v1"}}, "unknown fields"),
        ({"image": {"bucket": "photos", "key": "a.jpg", "version_id": 3}}, "version_id"),
        ({"image": "s3://photos/a.jpg", "prompt": 7}, "`prompt`"),
        ({"image": "s3://photos/a.jpg", "prompt": "   "}, "`prompt`"),
        ({"image": "s3://photos/a.jpg", "prompt": "x" * 51}, "--max-prompt-chars"),
        ({"image": "s3://photos/a.jpg", "prompt": "Compare <start_of_image>"}, "reserved"),
        ({"image": "s3://photos/a.jpg", "prompt": "and <ov_genai_image_1>"}, "reserved"),
        ({"image": "s3://photos/a.jpg", "prompt": "ok<end_of_turn>"}, "reserved"),
        ({"image": "s3://photos/a.jpg", "prompt": "bad \ud800 text"}, "surrogate"),
        ({"image": "s3://photos/a.jpg", "max_new_tokens": "20"}, "integer"),
        ({"image": "s3://photos/a.jpg", "max_new_tokens": True}, "integer"),
        ({"image": "s3://photos/a.jpg", "max_new_tokens": 2.5}, "integer"),
        ({"image": "s3://photos/a.jpg", "max_new_tokens": 0}, "1 to 64"),
        ({"image": "s3://photos/a.jpg", "max_new_tokens": 65}, "1 to 64"),
        ({"image": "s3://photos/a.jpg", "metadata": [1, 2]}, "`metadata`"),
        ({"image": "s3://photos/a.jpg", "metadata": {"blob": "x" * MAX_METADATA_BYTES}}, "maximum"),
        ({"image": "s3://photos/" + "k" * 1025}, "1024"),
    ],
)
def test_bad_own_event_fields_are_invalid_event(document, mentions):
    failure = only_failure({"id": "e9", **document})

    assert failure.error.code == ErrorCode.INVALID_EVENT
    assert mentions in failure.error.message
    assert failure.id == "e9"


def test_failure_keeps_readable_image_uri():
    failure = only_failure({"image": {"bucket": "photos", "key": "a.jpg"}, "max_new_tokens": -1})

    assert failure.image == "s3://photos/a.jpg"
    assert failure.id == "images-0-42"


def test_bad_id_is_invalid_event_without_id():
    failure = only_failure({"id": 17, "image": "s3://photos/a.jpg"})

    assert failure.error.code == ErrorCode.INVALID_EVENT
    assert failure.id is None
    assert failure.image == "s3://photos/a.jpg"


def test_own_event_folder_and_null_image_are_skipped():
    assert parse({"image": "s3://photos/albums/"}).skipped == ["folder"]
    assert parse({"image": None}).skipped == ["null_value"]


# Amazon S3 notifications


@pytest.mark.parametrize(
    ("encoded_key", "key"),
    [
        ("my+photo+%281%29.jpg", "my photo (1).jpg"),
        ("a%2Bb.jpg", "a+b.jpg"),
        ("year%3D2024/month%3D01/x.png", "year=2024/month=01/x.png"),
        ("caf%C3%A9/%E7%8C%AB.jpg", "café/猫.jpg"),
        ("100%25.jpg", "100%.jpg"),
        ("plain/key.jpg", "plain/key.jpg"),
    ],
)
def test_s3_notification_keys_are_decoded_once(encoded_key, key):
    request = only_image({"Records": [s3_record(encoded_key)]})

    assert request.image == ImageRef("s3", "photos", key)


def test_s3_notification_reads_version_id():
    request = only_image({"Records": [s3_record("a.jpg", versionId="3HL4kqtJlcpXroDTDmJ")]})

    assert request.image.version_id == "3HL4kqtJlcpXroDTDmJ"


def test_s3_notification_null_version_means_latest():
    assert only_image({"Records": [s3_record("a.jpg", versionId="null")]}).image.version_id is None


@pytest.mark.parametrize("event_name", ["ObjectCreated:Put", "ObjectCreated:CompleteMultipartUpload", "s3:ObjectCreated:Copy"])
def test_created_events_with_and_without_prefix(event_name):
    assert only_image({"Records": [s3_record("a.jpg", event_name=event_name)]}).image.key == "a.jpg"


def test_several_records_get_indexed_ids():
    document = {"Records": [s3_record("a.jpg"), s3_record("b.jpg", bucket="other"), s3_record("c.jpg")]}

    parsed = parse(document, default_id="images-3-100")

    assert [request.image.uri for request in parsed.images] == ["s3://photos/a.jpg", "s3://other/b.jpg", "s3://photos/c.jpg"]
    assert [request.id for request in parsed.images] == ["images-3-100", "images-3-100-1", "images-3-100-2"]


def test_mixed_records_split_by_outcome():
    document = {
        "Records": [
            s3_record("a.jpg"),
            s3_record("gone.jpg", event_name="ObjectRemoved:Delete"),
            s3_record("folder/"),
            None,
            {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}}},
            "not a record",
        ]
    }

    parsed = parse(document, default_id="m")

    assert [request.id for request in parsed.images] == ["m"]
    assert parsed.skipped == ["not_created", "folder", "null_value"]
    assert [failure.id for failure in parsed.failures] == ["m-4", "m-5"]
    assert {failure.error.code for failure in parsed.failures} == {ErrorCode.INVALID_EVENT}


def test_amazon_test_event_is_skipped():
    document = {
        "Service": "Amazon S3",
        "Event": "s3:TestEvent",
        "Time": "2025-01-01T00:00:00.000Z",
        "Bucket": "photos",
        "RequestId": "5582815E1AEA5ADF",
        "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE",
    }

    parsed = parse(document)

    assert parsed.skipped == ["test_event"]
    assert parsed.images == []


@pytest.mark.parametrize(
    "event_name", ["ObjectRemoved:Delete", "s3:ObjectRemoved:DeleteMarkerCreated", "ObjectRestore:Completed", "s3:ObjectAccessed:Get"]
)
def test_non_create_events_are_skipped(event_name):
    parsed = parse({"Records": [s3_record("a.jpg", event_name=event_name)]})

    assert parsed.images == []
    assert parsed.failures == []
    assert parsed.skipped == ["not_created"]


def test_folder_placeholder_is_skipped():
    assert parse({"Records": [s3_record("albums%2F2024/")]}).skipped == ["folder"]


def test_too_many_records_is_invalid_event():
    with pytest.raises(CaptionError) as caught:
        parse({"Records": [s3_record("a.jpg")] * (MAX_RECORDS + 1)})

    assert caught.value.code == ErrorCode.INVALID_EVENT


def test_key_with_invalid_utf8_escape_is_invalid_event():
    failure = only_failure({"Records": [s3_record("bad%FF.jpg")]})

    assert failure.error.code == ErrorCode.INVALID_EVENT
    assert "UTF-8" in failure.error.message


# MinIO notifications


@pytest.mark.parametrize(
    "key", ["albums/2024/my photo (1).jpg", "a+b=c.jpg", "café/猫 1.png", "deep/er/still/x.webp"]
)
def test_minio_keys_with_encoded_slash_find_nested_object(key):
    request = only_image(minio_notification("photos", key))

    assert request.image == ImageRef("s3", "photos", key)


def test_minio_removal_is_skipped():
    parsed = parse(minio_notification("photos", "a.jpg", event_name="s3:ObjectRemoved:Delete"))

    assert parsed.skipped == ["not_created"]


def test_minio_removal_envelope_without_records():
    parsed = parse({"EventName": "s3:ObjectRemoved:Delete", "Key": "photos/a.jpg", "Records": None})

    assert parsed.skipped == ["not_created"]


# Whole messages


def test_null_value_is_skipped():
    parsed = parse_message(None, default_id="x", settings=SETTINGS)

    assert parsed.skipped == ["null_value"]
    assert parsed.images == []
    assert parsed.failures == []


def test_json_null_is_skipped():
    assert parse(b"null").skipped == ["null_value"]


@pytest.mark.parametrize(
    "value",
    [b"", b"not json", b"{\"image\": ", b"\xff\xfe\x00garbage", b"[1, 2]", b"\"s3://photos/a.jpg\"", b"42",
     b"{\"image\": NaN}", b"[" * 100_000 + b"]" * 100_000],
)
def test_unreadable_values_are_invalid_json(value):
    with pytest.raises(CaptionError) as caught:
        parse(value)

    assert caught.value.code == ErrorCode.INVALID_JSON


@pytest.mark.parametrize(
    "document",
    [{}, {"picture": "s3://photos/a.jpg"}, {"Records": "a.jpg"}, {"Records": []}, {"EventName": "s3:ObjectCreated:Put"}],
)
def test_objects_of_no_known_shape_are_invalid_event(document):
    with pytest.raises(CaptionError) as caught:
        parse(document)

    assert caught.value.code == ErrorCode.INVALID_EVENT
