"""``AWSProvider``: nodes are EC2 instances tagged with the cluster name.

The class holds the provider's state, config checks and the EC2 plumbing; preparing a
cluster is ``setup.py`` (key pair, security group, subnets) and ``iam.py`` (the head's
role), instance types, images and prices ``offerings.py``, the instances themselves
``instances.py``, the boto3 boundary ``api.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from strato.exceptions import ProviderError
from strato.providers.aws.api import error_code, error_message, make_ec2_client, sdk_errors
from strato.providers.aws.iam import HeadRoleMixin
from strato.providers.aws.instances import InstancesMixin
from strato.providers.aws.offerings import OfferingsMixin
from strato.providers.aws.setup import SetupMixin
from strato.providers.base import ConfigProblem, NodeProvider, SpotIdiom


class AWSProvider(SetupMixin, HeadRoleMixin, OfferingsMixin, InstancesMixin, NodeProvider):
    """Nodes are EC2 instances tagged with the cluster name; state lives only in AWS tags."""

    needs_prepare_to_reach_nodes = True
    default_ssh_user = "ubuntu"
    can_stop_nodes = True

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[ConfigProblem]:
        provider = config.get("provider")
        if isinstance(provider, Mapping) and not provider.get("region"):
            return [ConfigProblem(("provider", "region"), "required for provider type 'aws'")]
        return []

    @classmethod
    def spot_idiom(cls, node_config: Mapping[str, Any]) -> SpotIdiom | None:
        """``InstanceMarketOptions: {MarketType: spot}`` (with ``SpotOptions.MaxPrice``)."""
        market = node_config.get("InstanceMarketOptions")
        if not isinstance(market, Mapping) or \
                str(market.get("MarketType", "")).lower() != "spot":
            return None
        options = market.get("SpotOptions")
        price = options.get("MaxPrice") if isinstance(options, Mapping) else None
        try:
            max_price = float(price) if price not in (None, "") else None
        except (TypeError, ValueError):
            max_price = None
        return SpotIdiom(("InstanceMarketOptions", "MarketType"),
                         "InstanceMarketOptions.MarketType: spot", max_price)

    @property
    def spot_notice(self) -> str | None:
        return "aws"  # spot/instance-action in the instance metadata

    def __init__(self, provider_config: Mapping[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        self._ec2: Any = None
        self._prepared: dict[str, Any] | None = None
        self._subnets: dict[str, str] = {}
        self._vpc_id: str | None = None
        self._images: dict[str, str] = {}
        self._spot_cache: dict[tuple[str, ...], tuple[float, dict[tuple[str, str], float]]] = {}

    # ------------------------------------------------------------------ plumbing
    @property
    def ec2(self) -> Any:
        """The boto3 EC2 client, built on first use by ``make_ec2_client``."""
        if self._ec2 is None:
            self._ec2 = make_ec2_client(self.provider_config)
        return self._ec2

    @property
    def resource_name(self) -> str:
        """Name of the key pair and security group of this cluster."""
        return f"strato-{self.cluster_name}"

    def _call(self, operation: str, **kwargs: Any) -> Any:
        """Call EC2, turning SDK errors into ``ProviderError`` with AWS's own message."""
        try:
            return getattr(self.ec2, operation)(**kwargs)
        except sdk_errors() as e:
            code = error_code(e) or type(e).__name__
            raise ProviderError(f"AWS {operation} failed ({code}): {error_message(e)}") from e

