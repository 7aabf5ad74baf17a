"""Money commands of the `strato` CLI: ``show-gpus``, ``catalog update``, ``cost-report``.

Thin wrappers over ``strato.catalog`` and ``strato.launcher.pricing``; errors become one
message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from strato.cli.cluster import _handle_errors

_err = Console(stderr=True, highlight=False, soft_wrap=True)
WIDE = 160  # tables are wide: when not on a terminal, do not squeeze them to 80 columns


def _console() -> Console:
    """Made per command, so the width fits where the output goes now."""
    import sys

    return Console(highlight=False, soft_wrap=True,
                   width=None if sys.stdout.isatty() else WIDE)


def _money(value: float | None, *, per_hour: bool = False) -> str:
    if value is None:
        return "-"
    text = f"${value:.4g}" if value < 10 else f"${value:,.2f}"
    return f"{text}/h" if per_hour else text


def gpu_rows(accelerator: str | None, cloud: str | None, region: str | None,
             show_all: bool, live: bool = False) -> list[dict[str, Any]]:
    """The rows ``show-gpus`` prints: one per (cloud, type, GPU, region), cheapest first.

    Without ``show_all`` one region per cloud is shown unless ``region`` is given (the
    cheapest region that has each type). ``live``: AWS spot prices from
    DescribeSpotPriceHistory (lowest over the region's zones) where credentials allow.
    """
    from strato.catalog import load_catalog

    catalog = load_catalog()
    offers = catalog.find(accelerator=accelerator, cloud=cloud, region=region,
                          gpus_only=True)
    if not show_all and region is None:
        best: dict[tuple[str, str, str | None, int], Any] = {}
        for o in offers:
            key = (o.cloud, o.instance_type, o.accelerator, o.accelerator_count)
            if key not in best or (o.price, o.region) < (best[key].price, best[key].region):
                best[key] = o
        offers = list(best.values())
    live_prices = _live_spot_prices(offers) if live else {}
    rows = []
    for o in sorted(offers, key=lambda o: (o.accelerator or "", o.accelerator_count,
                                           o.price, o.cloud, o.region)):
        spot = live_prices.get((o.instance_type, o.region))
        rows.append({
            "accelerator": o.accelerator, "count": o.accelerator_count,
            "gpu_memory_gib": o.accelerator_memory_gib, "cloud": o.cloud,
            "instance_type": o.label, "vcpus": o.vcpus, "memory_gib": o.memory_gib,
            "region": o.region, "price_per_hour": o.price,
            "spot_price_per_hour": spot if spot is not None else o.spot_price,
            "spot_price_source": "live" if spot is not None else (
                "catalog" if o.spot_price is not None else None)})
    return rows


def _live_spot_prices(offers: list[Any]) -> dict[tuple[str, str], float]:
    """(AWS type, region) -> lowest live spot price over the region's zones."""
    from strato.providers.aws import AWSProvider

    out: dict[tuple[str, str], float] = {}
    for region in sorted({o.region for o in offers if o.cloud == "aws"}):
        types = sorted({o.instance_type for o in offers if o.cloud == "aws" and
                        o.region == region})
        prices = AWSProvider({"region": region}, "show-gpus").spot_prices(types)
        for (t, _zone), price in prices.items():
            out[(t, region)] = min(price, out.get((t, region), price))
    return out


def register(cli: click.Group) -> None:
    """Add show-gpus, catalog and cost-report to the `strato` group."""

    @cli.command(name="show-gpus")
    @click.argument("accelerator", required=False)
    @click.option("--cloud", type=click.Choice(["aws", "gcp"]), help="Only this cloud.")
    @click.option("--region", help="Only this region (default: each type's cheapest).")
    @click.option("--all", "show_all", is_flag=True, help="Every region, not the cheapest.")
    @click.option("--live", is_flag=True,
                  help="Ask AWS for current spot prices (needs credentials).")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @_handle_errors
    def show_gpus(accelerator: str | None, cloud: str | None, region: str | None,
                  show_all: bool, live: bool, as_json: bool) -> None:
        """GPU models, the instance types that carry them and their prices per hour."""
        from strato.catalog import CatalogError, load_catalog

        catalog = load_catalog()
        rows = gpu_rows(accelerator, cloud, region, show_all, live)
        if not rows:
            known = ", ".join(catalog.accelerators(cloud))
            raise CatalogError(f"no {accelerator or 'GPU'} rows for "
                               f"{cloud or 'any cloud'} in {region or 'any region'} "
                               f"(known GPUs: {known})")
        if as_json:
            click.echo(json.dumps({"date": catalog.date, "source": catalog.source,
                                   "rows": rows}, indent=2))
            return
        table = Table(title=f"GPUs (prices per hour, USD; catalogue of {catalog.date})",
                      title_justify="left")
        for col in ("GPU", "QTY", "GPU MEM", "CLOUD", "INSTANCE TYPE", "vCPUs", "MEM",
                    "REGION", "ON-DEMAND", "SPOT"):
            table.add_column(col, justify="right" if col in (
                "QTY", "vCPUs", "ON-DEMAND", "SPOT") else "left")
        for r in rows:
            spot = _money(r["spot_price_per_hour"])
            if r["spot_price_source"] == "catalog" and r["cloud"] == "aws":
                spot += " (est.)"
            table.add_row(r["accelerator"], str(r["count"]), f"{r['gpu_memory_gib']:g}GB",
                          r["cloud"], r["instance_type"], f"{r['vcpus']:g}",
                          f"{r['memory_gib']:g}GB", r["region"], _money(r["price_per_hour"]),
                          spot)
        out = _console()
        out.print(table)
        out.print(f"source: {catalog.source}", markup=False)

    @cli.group()
    def catalog() -> None:
        """The instance catalogue (types, GPUs, prices) strato chooses from."""

    @catalog.command()
    @click.option("--cloud", "clouds", multiple=True, type=click.Choice(["aws", "gcp"]),
                  help="Cloud to refresh (repeatable; default: aws).")
    @click.option("--region", "regions", multiple=True,
                  help="Region to refresh (repeatable; default: the catalogue's).")
    @click.option("--project", envvar="GOOGLE_CLOUD_PROJECT", help="GCP project.")
    @click.option("--output", type=click.Path(dir_okay=False),
                  help="File to write (default: $STRATO_HOME/catalog.csv, used from then on).")
    @_handle_errors
    def update(clouds: tuple[str, ...], regions: tuple[str, ...], project: str | None,
               output: str | None) -> None:
        """Refresh the catalogue from the clouds' APIs (needs credentials and network)."""
        from strato.catalog.update import refresh

        clouds = clouds or ("aws",)
        if len(clouds) == 1:
            aws = list(regions) if clouds == ("aws",) else []
            gcp = list(regions) if clouds == ("gcp",) else []
        else:  # AWS regions end in -<digit> (us-east-1), GCP's in a letter+digit
            aws = [r for r in regions if r.rsplit("-", 1)[-1].isdigit()]
            gcp = [r for r in regions if not r.rsplit("-", 1)[-1].isdigit()]
        path, result = refresh(clouds=list(clouds), aws_regions=aws, gcp_regions=gcp,
                               gcp_project=project, output=output)
        for note in result.notes:
            _err.print(f"strato: note: {note}", markup=False, style="yellow")
        _console().print(f"wrote {len(result.offers)} refreshed row(s) to {path}", markup=False)

    @catalog.command(name="show")
    def show() -> None:
        """Where the catalogue in use comes from, and its date."""
        from strato.catalog import load_catalog

        cat = load_catalog()
        click.echo(f"{cat.path}\ndate: {cat.date}\nsource: {cat.source}\n"
                   f"rows: {len(cat.offers)}")

    @cli.command(name="cost-report")
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
    @_handle_errors
    def cost_report(as_json: bool) -> None:
        """Clusters from the local state, past and present: node-hours and cost."""
        from strato.launcher.pricing import summarize_costs
        from strato.launcher.state import StateDB

        state = StateDB()
        live = {r.name: True for r in state.list()}
        rows = [c.as_dict() for c in summarize_costs(state.node_costs(), live)]
        if as_json:
            click.echo(json.dumps({"clusters": rows,
                                   "total": round(sum(r["cost"] for r in rows), 6),
                                   "currency": "USD"}, indent=2))
            return
        table = Table(title=f"cluster costs ({os.fspath(state.home)})", title_justify="left")
        for col in ("CLUSTER", "PROVIDER", "LAUNCHED", "DURATION", "NODES", "NODE-HOURS",
                    "COST", "STATUS"):
            table.add_column(col, justify="right" if col in ("NODES", "NODE-HOURS", "COST")
                             else "left")
        estimated = False
        for r in rows:
            end = r["ended"] if r["ended"] is not None else time.time()
            cost = _money(r["cost"])
            if r["estimated"]:
                cost += " ~"
                estimated = True
            table.add_row(r["cluster"], r["provider"],
                          time.strftime("%Y-%m-%d %H:%M", time.localtime(r["launched"])),
                          _duration(end - r["launched"]), str(r["nodes"]),
                          f"{r['node_hours']:.3f}", cost, r["status"])
        out = _console()
        out.print(table)
        if estimated:
            out.print("~ estimate: a spot price not asked of the cloud, an unknown price, "
                       "or a node whose end was not seen")

    def _duration(seconds: float) -> str:
        seconds = int(max(seconds, 0))
        if seconds < 3600:
            return f"{seconds // 60}m{seconds % 60:02d}s"
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
