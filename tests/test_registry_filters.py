"""``Catalog.list``, ``count`` and ``search`` with every combination of filters and sort orders, against
the same selection made in Python over every entry's full record.

The catalog reads these through its indexes (ids intersected before any row is read, the sort
order's index walked); this checks that what it returns is what the plain definition says.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

from lorareg.registry.catalog import SORTS, Catalog

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    sys.path.insert(0, str(ROOT))
    from benchmarks.registry import build_catalog

    home = tmp_path_factory.mktemp("filters")
    build_catalog(home, 400)
    with Catalog(home) as opened:
        full = [opened.by_id(e.id) for e in opened.list(limit=None)]
        # vary the sort keys: some sizes tie, some entries updated later
        for entry in full[::7]:
            opened.conn.execute("UPDATE adapters SET updated_at = '2025-06-01T00:00:00Z' WHERE id = ?", (entry.id,))
        yield opened, [opened.by_id(e.id) for e in full]


def _keep(entry, architecture, fmt, tag, base):
    return ((architecture is None or entry.architecture == architecture) and (fmt is None or entry.format == fmt)
            and (tag is None or tag in entry.tags)
            and (base is None or base in entry.metadata.get("ss_sd_model_name", "")))


SORT_KEYS = {"name": lambda e: (e.name.lower(),), "added": lambda e: (e.added_at, e.id),
             "updated": lambda e: (e.updated_at, e.id), "size": lambda e: (-e.size, e.id)}
DESCENDING = {"added", "updated"}
COMBOS = list(itertools.product([None, "sdxl", "sd1"], [None, "peft"], [None, "anime"], [None, "sd_xl_base"]))


@pytest.mark.parametrize(("architecture", "fmt", "tag", "base"), COMBOS)
def test_list_and_count_match_the_definition(catalog, architecture, fmt, tag, base):
    opened, full = catalog
    kept = [e for e in full if _keep(e, architecture, fmt, tag, base)]
    filters = {"architecture": architecture, "format": fmt, "tag": tag, "base_model": base}
    assert opened.count(**filters) == len(kept)
    for sort in SORTS:
        expected = sorted(kept, key=SORT_KEYS[sort], reverse=sort in DESCENDING)
        assert [e.id for e in opened.list(sort=sort, limit=None, **filters)] == [e.id for e in expected], sort
        assert [e.id for e in opened.list(sort=sort, limit=7, offset=14, **filters)] == [e.id for e in expected[14:21]]


@pytest.mark.parametrize(("architecture", "fmt", "tag", "base"), COMBOS[::3])
def test_search_filters_keep_the_ranking(catalog, architecture, fmt, tag, base):
    opened, full = catalog
    ranked, total = opened.search("pixel", limit=None)
    assert total == len(ranked) == sum(1 for e in full if "pixel" in e.name or "pixel" in e.tags
                                       or any("pixel" in t for t in e.triggers) or "pixel" in (e.description or "")
                                       or "pixel" in (e.title or ""))
    by_id = {e.id: e for e in full}
    expected = [e.id for e in ranked if _keep(by_id[e.id], architecture, fmt, tag, base)]
    filters = {"architecture": architecture, "format": fmt, "tag": tag, "base_model": base}
    found, count = opened.search("pixel", limit=None, **filters)
    assert [e.id for e in found] == expected and count == len(expected)
    page, count = opened.search("pixel", limit=5, offset=5, **filters)
    assert [e.id for e in page] == expected[5:10] and count == len(expected)


@pytest.mark.parametrize("sort", list(SORTS))
def test_search_sorted_by_another_order(catalog, sort):
    opened, full = catalog
    ranked, _ = opened.search("pixel", limit=None)
    matching = {e.id for e in ranked}
    by_id = {e.id: e for e in full}
    for filters in ({}, {"architecture": "sdxl", "tag": "anime"}):
        kept = [by_id[i] for i in matching if _keep(by_id[i], filters.get("architecture"), None, filters.get("tag"), None)]
        expected = [e.id for e in sorted(kept, key=SORT_KEYS[sort], reverse=sort in DESCENDING)]
        found, total = opened.search("pixel", sort=sort, limit=None, **filters)
        assert [e.id for e in found] == expected and total == len(expected)
        page, total = opened.search("pixel", sort=sort, limit=6, offset=3, **filters)
        assert [e.id for e in page] == expected[3:9] and total == len(expected)
