"""AWS EC2 node provider: key pair, security group, on-demand and spot instances.

boto3 is imported only inside the client factories of ``api.py``, so users of other
clouds never need it. The package, by concern:

- ``provider.py``: ``AWSProvider`` itself: its state, config checks, the EC2 plumbing;
- ``setup.py``: ``prepare`` (key pair, security group, VPC and subnets), ``adopt_facts``;
- ``iam.py``: the head's IAM role and instance profile (the monitor's credentials);
- ``offerings.py``: instance types, default images, zones offering a type, spot prices;
- ``instances.py``: launching (spot, capacity errors), listing, terminate, stop/start, tags;
- ``api.py``: the EC2 and IAM client factories (endpoint overrides), botocore's errors.
"""

from __future__ import annotations

from strato.providers.aws.api import make_ec2_client, make_iam_client
from strato.providers.aws.iam import (
    HEAD_CHANGE_ACTIONS,
    HEAD_READ_ACTIONS,
    PROFILE_PROPAGATION_S,
    head_policy,
    head_role_name,
)
from strato.providers.aws.instances import CAPACITY_ERROR_CODES, SPOT_TERMINATION_CODE
from strato.providers.aws.offerings import MEMORY_FRACTION, SPOT_PRICE_TTL_S
from strato.providers.aws.provider import AWSProvider

PROVIDER = AWSProvider

__all__ = [
    "CAPACITY_ERROR_CODES", "HEAD_CHANGE_ACTIONS", "HEAD_READ_ACTIONS", "MEMORY_FRACTION",
    "PROFILE_PROPAGATION_S", "PROVIDER", "SPOT_PRICE_TTL_S", "SPOT_TERMINATION_CODE",
    "AWSProvider", "head_policy", "head_role_name", "make_ec2_client", "make_iam_client",
]
