"""The instance catalogue: typed rows read from a CSV shipped with strato.

Each row is one (cloud, instance type, accelerator, region) with its shape and its
on-demand and spot price per hour. The file's ``# date:`` and ``# source:`` header lines
say when and where the figures were taken. ``STRATO_CATALOG`` names another file;
otherwise ``$STRATO_HOME/catalog.csv`` (written by ``strato catalog update``) wins over
the packaged one.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from strato.exceptions import LauncherError
from strato.localfiles import strato_home

__all__ = ["CSV_COLUMNS", "Catalog", "CatalogError", "InstanceOffer", "catalog_path",
           "load_catalog", "normalize_accelerator"]

CSV_COLUMNS = ("cloud", "instance_type", "accelerator", "accelerator_count",
               "accelerator_memory_gib", "vcpus", "memory_gib", "region", "price", "spot_price")
CLOUDS = ("aws", "gcp")
USER_CATALOG = "catalog.csv"

# Spellings people use for the same GPU, all upper-case -> the catalogue's name.
_ALIASES = {"A100-40G": "A100", "A100-40GB": "A100", "A100-80GB": "A100-80G",
            "A100_80GB": "A100-80G", "H100-80GB": "H100", "H100-80G": "H100",
            "TESLA-T4": "T4", "TESLA-V100": "V100", "NVIDIA-L4": "L4", "A10": "A10G"}


class CatalogError(LauncherError):
    """The catalogue cannot answer: unreadable file, unknown GPU, nothing in a region."""


def normalize_accelerator(name: str) -> str:
    """``a100-80gb`` -> ``A100-80G``: upper-case and the catalogue's spelling."""
    key = name.strip().upper().replace(" ", "")
    return _ALIASES.get(key, key)


@dataclass(frozen=True)
class InstanceOffer:
    """One row: an instance (machine) type in a region, what it carries, what it costs."""

    cloud: str
    instance_type: str
    accelerator: str | None  # None: a CPU-only type
    accelerator_count: int
    accelerator_memory_gib: float  # per accelerator
    vcpus: float
    memory_gib: float
    region: str
    price: float  # on-demand, USD per hour
    spot_price: float | None  # USD per hour (AWS: an estimate; live prices are asked for)

    @property
    def label(self) -> str:
        """How people name it: ``g5.xlarge``, ``n1-standard-8 + 1x T4`` (GCP attached GPUs)."""
        if self.cloud == "gcp" and self.accelerator and self.instance_type.startswith("n1-"):
            return f"{self.instance_type} + {self.accelerator_count}x {self.accelerator}"
        return self.instance_type

    def price_for(self, spot: bool) -> float | None:
        return self.spot_price if spot else self.price


@dataclass(frozen=True)
class Catalog:
    """All rows of one catalogue file, with the file's date and source."""

    offers: tuple[InstanceOffer, ...]
    date: str = ""
    source: str = ""
    path: str = ""
    _by_type: dict[tuple[str, str, str], list[InstanceOffer]] = field(
        default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for o in self.offers:
            self._by_type.setdefault((o.cloud, o.instance_type, o.region), []).append(o)

    # ------------------------------------------------------------ questions
    def find(self, *, accelerator: str | None = None, cloud: str | None = None,
             region: str | None = None, min_count: int = 0,
             gpus_only: bool = False) -> list[InstanceOffer]:
        """Rows matching every filter given (accelerator by any common spelling)."""
        want = normalize_accelerator(accelerator) if accelerator else None
        return [o for o in self.offers
                if (want is None or o.accelerator == want)
                and (cloud is None or o.cloud == cloud)
                and (region is None or o.region == region)
                and o.accelerator_count >= min_count
                and (not gpus_only or o.accelerator)]

    def offer(self, cloud: str, instance_type: str, region: str | None, *,
              accelerator: str | None = None, count: int | None = None) -> InstanceOffer | None:
        """The row of one type in one region (GCP n1: the one with this accelerator)."""
        rows = self._by_type.get((cloud, instance_type, region or ""), [])
        if accelerator is not None:
            want = normalize_accelerator(accelerator)
            rows = [o for o in rows if o.accelerator == want
                    and (count is None or o.accelerator_count == count)]
        elif len(rows) > 1:
            rows = [o for o in rows if not o.accelerator] or rows[:1]
        return rows[0] if rows else None

    def accelerators(self, cloud: str | None = None) -> list[str]:
        """GPU models in the catalogue, sorted."""
        return sorted({o.accelerator for o in self.offers
                       if o.accelerator and (cloud is None or o.cloud == cloud)})

    def regions(self, cloud: str | None = None, accelerator: str | None = None) -> list[str]:
        """Regions with rows (carrying ``accelerator`` if given), sorted."""
        return sorted({o.region for o in self.find(accelerator=accelerator, cloud=cloud)})

    def nearest_regions(self, cloud: str, accelerator: str, region: str | None,
                        min_count: int = 0, limit: int = 3) -> list[str]:
        """Regions that have ``accelerator``, those sharing the longest prefix with
        ``region`` first (``us-west-1`` -> ``us-east-1``, ``us-west-2`` before Europe)."""
        have = {o.region for o in self.find(accelerator=accelerator, cloud=cloud,
                                            min_count=min_count)}

        def key(r: str) -> tuple[int, str]:
            shared = len(os.path.commonprefix([r, region or ""]))
            same_area = r.split("-")[0] == (region or "").split("-")[0]
            return (-(100 if same_area else 0) - shared, r)

        return sorted(have, key=key)[:limit]


# ---------------------------------------------------------------- loading
def catalog_path() -> Path | None:
    """The catalogue a user chose (``STRATO_CATALOG``) or refreshed (``$STRATO_HOME``);
    None: the packaged one."""
    chosen = os.environ.get("STRATO_CATALOG")
    if chosen:
        return Path(chosen).expanduser()
    updated = strato_home() / USER_CATALOG
    return updated if updated.is_file() else None


_CACHE: dict[tuple[str, float], Catalog] = {}


def load_catalog(path: str | os.PathLike[str] | None = None) -> Catalog:
    """Read the catalogue (see the module docstring for which file); cached per file."""
    chosen = Path(path) if path is not None else catalog_path()
    if chosen is None:
        ref = resources.files("strato.catalog").joinpath("data", USER_CATALOG)
        key = (str(ref), 0.0)
        if key not in _CACHE:
            _CACHE[key] = parse_catalog(ref.read_text(encoding="utf-8"), str(ref))
        return _CACHE[key]
    try:
        mtime = chosen.stat().st_mtime
        key = (str(chosen), mtime)
        if key not in _CACHE:
            _CACHE[key] = parse_catalog(chosen.read_text(encoding="utf-8"), str(chosen))
    except OSError as e:
        raise CatalogError(f"cannot read the instance catalogue {chosen}: "
                           f"{e.strerror or e}") from None
    return _CACHE[key]


_HEADER_RE = re.compile(r"^#\s*(date|source):\s*(.*)$")


def parse_catalog(text: str, where: str = "<catalog>") -> Catalog:
    """Parse catalogue CSV text; ``CatalogError`` names the line of a bad row."""
    meta: dict[str, str] = {}
    body: list[str] = []
    skipped = 0  # comment lines, so errors name the file's own line numbers
    for line in text.splitlines():
        if line.startswith("#"):
            m = _HEADER_RE.match(line)
            if m:
                meta[m.group(1)] = m.group(2).strip()
            skipped += 1
        else:
            body.append(line)
    reader = csv.DictReader(io.StringIO("\n".join(body)))
    missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise CatalogError(f"{where}: missing column(s) {', '.join(missing)}")
    offers = []
    for row in reader:
        try:
            offers.append(_offer(row))
        except (ValueError, TypeError) as e:
            raise CatalogError(f"{where}:{reader.line_num + skipped}: bad row ({e})") from None
    return Catalog(tuple(offers), date=meta.get("date", ""), source=meta.get("source", ""),
                   path=where)


def _offer(row: dict[str, str]) -> InstanceOffer:
    cloud = row["cloud"].strip()
    if cloud not in CLOUDS:
        raise ValueError(f"cloud {cloud!r} is not one of {', '.join(CLOUDS)}")
    acc = (row["accelerator"] or "").strip()
    spot = (row["spot_price"] or "").strip()
    return InstanceOffer(
        cloud=cloud, instance_type=row["instance_type"].strip(),
        accelerator=normalize_accelerator(acc) if acc else None,
        accelerator_count=int(row["accelerator_count"] or 0),
        accelerator_memory_gib=float(row["accelerator_memory_gib"] or 0),
        vcpus=float(row["vcpus"]), memory_gib=float(row["memory_gib"]),
        region=row["region"].strip(), price=float(row["price"]),
        spot_price=float(spot) if spot else None)


def write_catalog(path: str | os.PathLike[str], offers: Iterable[InstanceOffer], *,
                  date: str, source: str, notes: Sequence[str] = ()) -> None:
    """Write a catalogue file with its header (date, source, notes), rows sorted."""
    from strato.localfiles import atomic_write

    out = io.StringIO()
    out.write("# strato instance catalogue (written by `strato catalog update`).\n")
    out.write(f"# date: {date}\n# source: {source}\n")
    for note in notes:
        out.write(f"# {note}\n")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for o in sorted(offers, key=lambda o: (o.cloud, o.region, o.accelerator or "",
                                           o.price, o.instance_type)):
        writer.writerow([o.cloud, o.instance_type, o.accelerator or "", o.accelerator_count,
                         f"{o.accelerator_memory_gib:g}", f"{o.vcpus:g}", f"{o.memory_gib:g}",
                         o.region, f"{o.price:g}",
                         "" if o.spot_price is None else f"{o.spot_price:g}"])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, out.getvalue().encode(), mode=0o644)
