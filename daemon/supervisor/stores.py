"""The store master: which store ids exist, and their names and area codes."""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

REQUIRED_COLUMNS = ("AreaCode", "StoreName", "StoreID")


@dataclass(frozen=True)
class Store:
    store_id: str
    name: str
    area_code: str


class StoreMasterError(Exception):
    """The store master file cannot be used; the message names the file and the problem."""


def load_store_master(path: str | Path) -> dict[str, Store]:
    """Stores keyed by StoreID. Read with the csv module: real names are quoted and contain commas."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise StoreMasterError(f"{path}: missing column(s) {', '.join(missing)}")
            stores: dict[str, Store] = {}
            for row in reader:
                store_id = (row["StoreID"] or "").strip()
                if store_id and store_id not in stores:
                    stores[store_id] = Store(store_id, (row["StoreName"] or "").strip(),
                                             (row["AreaCode"] or "").strip())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise StoreMasterError(f"{path}: {exc}") from None
    if not stores:
        raise StoreMasterError(f"{path}: no stores")
    return stores
