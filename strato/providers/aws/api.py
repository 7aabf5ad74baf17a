"""The boto3 boundary of the AWS provider: the EC2 and IAM client factories (boto3 is
imported only inside them, so users of other clouds never need it) and the small helpers
that read botocore's errors and write EC2's tag lists.

Every EC2 call goes through ``make_ec2_client``, which honours an endpoint override
(``provider.endpoint_url``, else ``AWS_ENDPOINT_URL_EC2``, else ``AWS_ENDPOINT_URL``) so
tests point the provider at moto.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from strato.exceptions import ConfigError


def make_ec2_client(provider_config: Mapping[str, Any]) -> Any:
    """Build the one EC2 client the provider uses (lazy boto3 import, endpoint override)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:  # pragma: no cover - depends on the user's environment
        raise ConfigError("provider.type 'aws' needs boto3: pip install boto3") from e
    endpoint = (provider_config.get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_EC2")
                or os.environ.get("AWS_ENDPOINT_URL")
                or None)
    return boto3.client(
        "ec2",
        region_name=provider_config.get("region"),
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def make_iam_client(provider_config: Mapping[str, Any]) -> Any:
    """The IAM client ``prepare`` uses for the head's role (endpoint override:
    ``provider.iam_endpoint_url``, else ``AWS_ENDPOINT_URL_IAM`` / ``AWS_ENDPOINT_URL``)."""
    import boto3
    from botocore.config import Config

    endpoint = (provider_config.get("iam_endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_IAM")
                or os.environ.get("AWS_ENDPOINT_URL")
                or None)
    return boto3.client("iam", region_name=provider_config.get("region"),
                        endpoint_url=endpoint,
                        config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def error_code(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "") or ""


def error_message(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Message", "") or str(exc)


def sdk_errors() -> tuple[type[Exception], ...]:
    """botocore's error bases, imported lazily like boto3 itself."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def as_list(value: Any) -> list[str]:
    """Zones come as a YAML list or Ray's comma-separated string."""
    if not value:
        return []
    if isinstance(value, str):
        return [z.strip() for z in value.split(",") if z.strip()]
    return [str(z) for z in value]


def tags_dict(tags: Iterable[Mapping[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags or ()}


def aws_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": str(v)} for k, v in tags.items()]

