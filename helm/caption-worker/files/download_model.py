"""Download every object under an s3://bucket/prefix/ URI into a directory.

The model init container runs this with the worker image's Python and boto3:

    python download_model.py s3://models/gemma-3-4b-it-ov/ /models/model

It reads the same S3 settings as the worker (CAPTION_S3_ENDPOINT_URL,
CAPTION_S3_REGION, CAPTION_S3_ADDRESSING_STYLE) and the AWS SDK's usual
credential chain. It exits 1 when the prefix contains no objects, so a wrong
URI stops the pod at the init container instead of at model loading.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split s3://bucket/prefix into the bucket and a prefix that is empty or ends with '/'."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"invalid model URI {uri!r}: expected s3://bucket/prefix/")
    prefix = parsed.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return parsed.netloc, prefix


def make_client():
    style = os.environ.get("CAPTION_S3_ADDRESSING_STYLE", "auto")
    config = Config(retries={"max_attempts": 10, "mode": "standard"}, s3={"addressing_style": style})
    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("CAPTION_S3_ENDPOINT_URL") or None,
        region_name=os.environ.get("CAPTION_S3_REGION") or None,
        config=config,
    )


def download_prefix(client, bucket: str, prefix: str, target: Path) -> int:
    """Download the objects under prefix into target, keeping relative paths; return the count.

    Keys that end with '/' (folder placeholders) are skipped, and a key whose
    relative path would leave target (through '..') raises ValueError.
    """
    target = target.resolve()
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):]
            if not relative or relative.endswith("/"):
                continue
            path = (target / relative).resolve()
            if not path.is_relative_to(target):
                raise ValueError(f"object key {item['Key']!r} leaves the target directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(path))
            print(f"downloaded s3://{bucket}/{item['Key']} ({item['Size']} bytes)", flush=True)
            count += 1
    return count


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: download_model.py s3://bucket/prefix/ TARGET_DIR", file=sys.stderr)
        return 2
    try:
        bucket, prefix = parse_s3_uri(argv[0])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    count = download_prefix(make_client(), bucket, prefix, Path(argv[1]))
    if count == 0:
        print(f"error: no objects found under s3://{bucket}/{prefix}", file=sys.stderr)
        return 1
    print(f"downloaded {count} objects into {argv[1]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
