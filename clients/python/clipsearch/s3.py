"""S3 helpers shared by the services: URI parsing and client construction.

Clients follow boto3's standard credential chain (env, shared config, IAM role);
``endpoint_url`` points them at MinIO or a test server instead of AWS.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipsearch.errors import InvalidArgument


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # a key or a prefix; may be empty

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str, field: str = "uri") -> S3Location:
    if not uri.startswith("s3://"):
        raise InvalidArgument(f"{field} must look like s3://bucket/key, got {uri!r}", field=field)
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise InvalidArgument(f"{field} has no bucket: {uri!r}; expected s3://bucket/key", field=field)
    return S3Location(bucket, key)


def make_s3_client(endpoint_url: str = "", region: str = "", timeout_seconds: float = 60.0):
    import boto3
    from botocore.config import Config

    # SigV4 everywhere: presigned URLs then carry X-Amz-Expires and work in every region.
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32,
                    signature_version="s3v4", connect_timeout=min(timeout_seconds, 10.0),
                    read_timeout=timeout_seconds)
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url or None,
        region_name=region or session.region_name or "us-east-1",
        config=config,
    )


def is_missing_error(exc: Exception) -> bool:
    """True when a botocore ClientError means the bucket or key does not exist."""
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    return code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
