"""The lineage tree of an adapter laid out for drawing: the adapter on the right, its inputs to the left.

Only positions are computed here; the SVG is written by the ``_lineage.html`` template, which
escapes every label like any other catalog value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorareg.registry.lineage import LineageNode, operation_summary

COLUMN = 250  # horizontal distance between generations
ROW = 64  # vertical distance between leaves
BOX_W, BOX_H = 200, 44
MARGIN = 12
MAX_NODES = 200


@dataclass
class Box:
    """One node as drawn."""

    x: float
    y: float
    label: str
    detail: str
    tensor_sha256: str | None
    in_catalog: bool
    repeated: bool


@dataclass
class Edge:
    """A line from an input (left) to what it made (right), with the input's weight."""

    x1: float
    y1: float
    x2: float
    y2: float
    weight: str


@dataclass
class Layout:
    """Boxes and edges in an SVG of ``width`` × ``height``."""

    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    truncated: bool = False


def _depth(node: LineageNode) -> int:
    return 1 + max((_depth(p) for p in node.parents), default=0)


def layout(tree: LineageNode) -> Layout:
    """Place every node: leaves on consecutive rows, a node level with the middle of its inputs."""
    depth = _depth(tree)
    boxes: list[Box] = []
    edges: list[Edge] = []
    next_row = [0]
    truncated = [False]

    def place(node: LineageNode, level: int) -> tuple[float, float]:
        x = MARGIN + (depth - 1 - level) * COLUMN
        parents = node.parents if len(boxes) < MAX_NODES else []
        truncated[0] = truncated[0] or (bool(node.parents) and not parents)
        anchors = [place(p, level + 1) for p in parents]
        if anchors:
            y = (anchors[0][1] + anchors[-1][1]) / 2
        else:
            y = MARGIN + next_row[0] * ROW
            next_row[0] += 1
        if node.operation:
            detail = operation_summary(node.operation, node.params)
        else:
            detail = (node.format or "") if node.in_catalog else "not in the catalog"
        boxes.append(Box(x, y, node.label, detail, node.tensor_sha256, node.in_catalog, node.repeated))
        for parent, (px, py) in zip(parents, anchors, strict=True):
            weight = "" if parent.weight is None else f"× {parent.weight:g}"
            edges.append(Edge(px + BOX_W, py + BOX_H / 2, x, y + BOX_H / 2, weight))
        return x, y

    place(tree, 0)
    width = 2 * MARGIN + (depth - 1) * COLUMN + BOX_W
    height = 2 * MARGIN + max(0, next_row[0] - 1) * ROW + BOX_H
    return Layout(width, height, boxes, edges, truncated[0])
