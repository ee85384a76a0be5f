"""Duplicates in the catalog: copies of a file, the same adapter in other forms, and near-duplicates.

Four kinds of group, from the most to the least alike:

- ``copies``: byte-identical files (the same SHA-256) at several paths;
- ``variants``: one entry with files that differ only in their metadata (the same tensors);
- ``same``: different entries holding the same ΔW up to rounding — the same adapter in another
  format, key spelling, dtype (fp32/fp16/bf16) or factorization. Fingerprint cosine at least
  :data:`loralib.fingerprint.SAME_COSINE` and norms within :data:`~loralib.fingerprint.SAME_NORM_RATIO`;
- ``near``: entries whose ΔW point nearly the same way (cosine at least ``near``, 0.8 by default)
  without being the same: a rank reduction of an adapter, a merge dominated by it, a retrained or
  re-scaled copy. Each pair comes with its similarity.

Fingerprints are compared all against all (in blocks, with numpy), so nothing is missed; two
unrelated adapters have a cosine near 0 (within about ±0.06, see :mod:`loralib.fingerprint`).
Entries without a fingerprint (LyCORIS, other families, damaged files, entries recorded before
fingerprints existed and not scanned since) are counted, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from loralib.fingerprint import DIMENSIONS, MAGIC, NEAR_COSINE, SAME_COSINE, SAME_NORM_RATIO, verdict

from .catalog import Catalog
from .records import Entry

BLOCK = 512  # fingerprints compared at once against all others


@dataclass
class Member:
    """One entry of a group, as reported."""

    name: str
    format: str | None
    dtype: str | None
    architecture: str | None
    rank: str
    norm: float | None = None

    @classmethod
    def of(cls, entry: Entry, norm: float | None = None) -> Member:
        return cls(entry.name, entry.format, entry.dtype, entry.architecture, entry.rank_text, norm)


@dataclass
class DuplicateReport:
    """Every group found, and how many entries could not be compared (by reason)."""

    copies: list[dict] = field(default_factory=list)
    variants: list[dict] = field(default_factory=list)
    same: list[list[Member]] = field(default_factory=list)
    near: list[dict] = field(default_factory=list)
    compared: int = 0
    without_fingerprint: dict[str, int] = field(default_factory=dict)
    near_threshold: float = NEAR_COSINE

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        from dataclasses import asdict

        return {"thresholds": {"same_cosine": SAME_COSINE, "same_norm_ratio": 1 - SAME_NORM_RATIO,
                               "near_cosine": self.near_threshold},
                "copies": self.copies, "variants": self.variants,
                "same": [[asdict(m) for m in group] for group in self.same],
                "near": [{**group, "members": [asdict(m) for m in group["members"]]} for group in self.near],
                "compared": self.compared, "without_fingerprint": self.without_fingerprint}


class _Groups:
    """Union-find over entry ids."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def join(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for x in self.parent:
            found.setdefault(self.find(x), []).append(x)
        return [sorted(members) for members in found.values() if len(members) > 1]


def similar_pairs(fingerprints: list[tuple[int, bytes, float]], near: float,
                  progress: Callable[[int, int], None] | None = None) -> list[tuple[int, int, float, float]]:
    """Every pair of fingerprints with cosine at least ``near``: (id a, id b, cosine, norm ratio)."""
    import numpy as np

    size = len(MAGIC) + 4 * DIMENSIONS
    rows = [(i, blob) for i, blob, _ in fingerprints if blob and len(blob) == size and blob.startswith(MAGIC)]
    if len(rows) < 2:
        return []
    ids = np.array([i for i, _ in rows])
    raw = b"".join(blob[len(MAGIC):] for _, blob in rows)
    matrix = np.frombuffer(raw, dtype="<f4").reshape(len(rows), DIMENSIONS).astype(np.float32)
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
    keep = norms > 0
    ids, matrix, norms = ids[keep], matrix[keep], norms[keep]
    unit = (matrix / norms[:, None]).astype(np.float32)
    pairs = []
    for start in range(0, len(unit), BLOCK):
        block = unit[start:start + BLOCK] @ unit[start:].T  # only pairs (i, j) with j >= i
        rows_i, cols = np.nonzero(block >= near - 1e-6)
        for r, c in zip(rows_i.tolist(), cols.tolist()):
            i, j = start + r, start + c
            if j <= i:
                continue
            # the cosine again in float64 from the stored floats, so the verdict does not depend on the block
            cosine = float(np.dot(matrix[i].astype(np.float64), matrix[j].astype(np.float64)) / (norms[i] * norms[j]))
            if cosine >= near or cosine >= SAME_COSINE:
                pairs.append((int(ids[i]), int(ids[j]), cosine, float(min(norms[i], norms[j]) / max(norms[i], norms[j]))))
        if progress is not None:
            progress(min(start + BLOCK, len(unit)), len(unit))
    return pairs


def find_duplicates(catalog: Catalog, *, near: float = NEAR_COSINE,
                    progress: Callable[[int, int], None] | None = None) -> DuplicateReport:
    """Every group of copies, same adapters and near-duplicates in ``catalog`` (see the module docstring)."""
    report = DuplicateReport(near_threshold=near)
    copies = catalog.copies()
    variants = catalog.variants()
    fingerprints = catalog.fingerprints()
    report.compared = len(fingerprints)
    report.without_fingerprint = catalog.fingerprint_notes()
    pairs = similar_pairs(fingerprints, near, progress)
    norms = {i: n for i, _, n in fingerprints}
    wanted = [i for _, paths in copies for _, i in paths] + [i for i, _ in variants] + \
        [x for a, b, _, _ in pairs for x in (a, b)]
    entries = catalog.entries_by_id(wanted)
    for sha256, paths in copies:
        report.copies.append({"sha256": sha256, "files": [{"path": p, "name": entries[i].name if i in entries else None}
                                                          for p, i in paths]})
    for adapter_id, files in variants:
        if adapter_id in entries:
            report.variants.append({"name": entries[adapter_id].name,
                                    "files": [{"path": p, "sha256": s} for p, s in files]})
    same, near_pairs = _Groups(), []
    for a, b, cosine, ratio in pairs:
        if verdict(cosine, ratio, near=near) == "same":
            same.join(a, b)
        else:
            near_pairs.append((a, b, cosine, ratio))
    for group in same.groups():
        report.same.append([Member.of(entries[i], norms.get(i)) for i in group if i in entries])
    report.same.sort(key=lambda g: g[0].name.casefold())
    # near-duplicates between same-groups: one line per pair of groups, named by each group's first entry
    seen: dict[tuple[int, int], tuple[float, float]] = {}
    for a, b, cosine, ratio in near_pairs:
        key = tuple(sorted((same.find(a), same.find(b))))
        if key[0] != key[1] and (key not in seen or cosine > seen[key][0]):
            seen[key] = (cosine, ratio)
    clusters = _Groups()
    for a, b in seen:
        clusters.join(a, b)
    for group in clusters.groups():
        members = [Member.of(entries[i], norms.get(i)) for i in group if i in entries]
        links = [{"a": entries[a].name, "b": entries[b].name, "similarity": round(cosine, 6),
                  "norm_ratio": round(ratio, 6)}
                 for (a, b), (cosine, ratio) in sorted(seen.items(), key=lambda kv: -kv[1][0])
                 if a in group and a in entries and b in entries]
        report.near.append({"members": members, "pairs": links})
    report.near.sort(key=lambda g: -max(p["similarity"] for p in g["pairs"]) if g["pairs"] else 0)
    return report
