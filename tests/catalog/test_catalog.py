"""The catalogue file, accelerator requests and their resolution, as plain data."""

from __future__ import annotations

import pytest

from strato.catalog import (
    AcceleratorRequest,
    CatalogError,
    load_catalog,
    parse_accelerators,
    parse_any_of,
    resolve,
)
from strato.catalog.data import parse_catalog

pytestmark = pytest.mark.timeout(30)

HEADER = ("cloud,instance_type,accelerator,accelerator_count,accelerator_memory_gib,vcpus,"
          "memory_gib,region,price,spot_price\n")


def test_packaged_catalogue_says_when_and_where_from() -> None:
    cat = load_catalog()
    assert cat.date == "2025-01-15"
    assert "hand-entered" in cat.source and "strato catalog update" in cat.source
    assert {"A100", "A10G", "H100", "L4", "T4", "V100"} <= set(cat.accelerators())
    g5 = cat.offer("aws", "g5.xlarge", "us-east-1")
    assert (g5.accelerator, g5.accelerator_count, g5.accelerator_memory_gib, g5.vcpus,
            g5.memory_gib, g5.price) == ("A10G", 1, 24, 4, 16, 1.006)
    assert 0 < g5.spot_price < g5.price
    # GCP n1 carries attached GPUs: one row per combination, picked by accelerator
    t4 = cat.offer("gcp", "n1-standard-8", "us-central1", accelerator="T4")
    v100 = cat.offer("gcp", "n1-standard-8", "us-central1", accelerator="V100")
    assert t4.price < v100.price and t4.label == "n1-standard-8 + 1x T4"
    assert cat.offer("aws", "m5.large", "us-east-1").accelerator is None


def test_catalogue_rows_are_sane() -> None:
    for o in load_catalog().offers:
        assert o.price > 0 and o.vcpus > 0 and o.memory_gib > 0, o
        assert o.spot_price is None or 0 < o.spot_price < o.price, o
        assert (o.accelerator is None) == (o.accelerator_count == 0), o


def test_bad_rows_name_their_line(tmp_path) -> None:
    text = "# date: x\n" + HEADER + "aws,g5.xlarge,A10G,1,24,4,16,us-east-1,cheap,\n"
    with pytest.raises(CatalogError, match=r":3: bad row"):
        parse_catalog(text, "f.csv")
    with pytest.raises(CatalogError, match="missing column"):
        parse_catalog("cloud,instance_type\n")
    path = tmp_path / "mine.csv"
    path.write_text("# date: 2030-01-01\n# source: me\n" + HEADER
                    + "aws,x1.gpu,A10G,1,24,4,16,us-east-1,0.5,\n")
    mine = load_catalog(path)
    assert (mine.date, mine.source, len(mine.offers)) == ("2030-01-01", "me", 1)
    assert mine.offers[0].spot_price is None


@pytest.mark.parametrize("value, want", [
    ("A100:8", AcceleratorRequest("A100", 8)),
    ("l4", AcceleratorRequest("L4", 1)),
    ({"L4": 1}, AcceleratorRequest("L4", 1)),
    ("a100-80gb:2", AcceleratorRequest("A100-80G", 2)),
])
def test_parse_accelerators(value, want) -> None:
    assert parse_accelerators(value) == want


@pytest.mark.parametrize("value, words", [
    ("A100:0", "count"), ("A100:x", "NAME:COUNT"), ({"A100": 1, "H100": 1}, "any_of"),
    ({"A100": "8"}, "whole number"), (8, "expected"),
])
def test_parse_accelerators_rejects(value, words) -> None:
    with pytest.raises(ValueError, match=words):
        parse_accelerators(value)


def test_parse_any_of() -> None:
    assert parse_any_of([{"accelerators": "A100:8"}, "H100:8"]) == [
        AcceleratorRequest("A100", 8), AcceleratorRequest("H100", 8)]
    with pytest.raises(ValueError, match=r"\[1\]"):
        parse_any_of(["A100:8", {"accelerators": "H100:8", "zones": []}])
    with pytest.raises(ValueError, match="non-empty list"):
        parse_any_of([])


def test_a10g_on_demand_resolves_to_cheapest_g5_then_the_next() -> None:
    cat = load_catalog()
    options = resolve(cat, [parse_accelerators("A10G:1")], cloud="aws", region="us-east-1",
                      spot=False, zones=["us-east-1a", "us-east-1b"])
    assert {o.spot for o in options} == {False}
    assert [(o.instance_type, o.zone) for o in options[:3]] == [
        ("g5.xlarge", "us-east-1a"), ("g5.xlarge", "us-east-1b"), ("g5.2xlarge", "us-east-1a")]
    assert options[0].price == 1.006 and options[0].price_source == "catalog"
    prices = [o.price for o in options]
    assert prices == sorted(prices)
    assert {o.instance_type.split(".")[0] for o in options} == {"g5"}


def test_spot_uses_live_prices_then_falls_back_to_on_demand() -> None:
    cat = load_catalog()
    live = {("g5.xlarge", "us-east-1a"): 0.61, ("g5.xlarge", "us-east-1b"): 0.39,
            ("g5.2xlarge", "us-east-1a"): 0.45, ("g5.2xlarge", "us-east-1b"): 0.47}
    options = resolve(cat, [parse_accelerators("A10G")], cloud="aws", region="us-east-1",
                      spot=True, fallback_to_on_demand=True,
                      zones=["us-east-1a", "us-east-1b"], spot_prices=live)
    first = [(o.instance_type, o.zone, o.price) for o in options[:4]]
    assert first == [("g5.xlarge", "us-east-1b", 0.39), ("g5.2xlarge", "us-east-1a", 0.45),
                     ("g5.2xlarge", "us-east-1b", 0.47), ("g5.xlarge", "us-east-1a", 0.61)]
    assert options[0].price_source == "live"
    spot = [o for o in options if o.spot]
    demand = [o for o in options if not o.spot]
    assert options == spot + demand  # every spot option before any on-demand one
    assert demand[0].instance_type == "g5.xlarge" and demand[0].price == 1.006


def test_offered_zones_and_any_of_order() -> None:
    cat = load_catalog()
    offered = {"g5.xlarge": ["us-east-1c"], "g5.2xlarge": ["us-east-1a", "us-east-1c"]}
    options = resolve(cat, [parse_accelerators("A10G")], cloud="aws", region="us-east-1",
                      spot=False, zones=["us-east-1a", "us-east-1b"], offered=offered)
    assert options[0].instance_type == "g5.2xlarge" and options[0].zone == "us-east-1a"
    # no zones given: the zones the type is offered in
    options = resolve(cat, [parse_accelerators("A10G")], cloud="aws", region="us-east-1",
                      spot=False, offered=offered)
    assert [(o.instance_type, o.zone) for o in options[:2]] == [
        ("g5.xlarge", "us-east-1c"), ("g5.2xlarge", "us-east-1a")]
    # any_of: alternatives in the order given, even if a later one is cheaper
    options = resolve(cat, parse_any_of(["A10G:1", "T4:1"]), cloud="aws", region="us-east-1",
                      spot=False)
    models = [o.accelerator for o in options]
    assert models[0] == "A10G" and models.index("T4") > models.index("A10G")
    assert models == sorted(models, key=["A10G", "T4"].index)


def test_errors_name_what_exists() -> None:
    cat = load_catalog()
    with pytest.raises(CatalogError, match=r"no A100 in us-west-1; nearest: us-(east-1|west-2), "
                                           r"us-(east-1|west-2)"):
        resolve(cat, [parse_accelerators("A100")], cloud="aws", region="us-west-1", spot=False)
    with pytest.raises(CatalogError, match=r"no GPU called B300 .*known: A100"):
        resolve(cat, [parse_accelerators("B300")], cloud="aws", region="us-east-1", spot=False)
    with pytest.raises(CatalogError, match=r"no aws type carries 16 x A10G \(at most 8\)"):
        resolve(cat, [parse_accelerators("A10G:16")], cloud="aws", region="us-east-1",
                spot=False)
    with pytest.raises(CatalogError, match="offered in us-east-1z"):
        resolve(cat, [parse_accelerators("A10G")], cloud="aws", region="us-east-1",
                spot=False, zones=["us-east-1z"], offered={})
    # any_of succeeds if one alternative exists
    assert resolve(cat, parse_any_of(["A100:8", "T4:1"]), cloud="aws", region="us-west-1",
                   spot=False)[0].accelerator == "T4"


def test_gcp_rows() -> None:
    cat = load_catalog()
    options = resolve(cat, [parse_accelerators("L4:1")], cloud="gcp", region="us-central1",
                      spot=True, zones=["us-central1-a"])
    assert options[0].instance_type == "g2-standard-4" and options[0].price_source == "catalog"
    t4 = resolve(cat, [parse_accelerators("T4")], cloud="gcp", region="us-central1",
                 spot=False, zones=["us-central1-a"])[0]
    assert (t4.instance_type, t4.accelerator, t4.accelerator_count) == ("n1-standard-4", "T4", 1)
