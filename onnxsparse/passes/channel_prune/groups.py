"""The units of channel removal: coupled producers (a group) and the channels removed together (a unit)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...channels import Analysis, Producer
from ...layerwise import ReadingLayer


@dataclass
class Unit:
    """Root channels removed together (one channel of every coupled tensor)."""

    members: list[int]
    group: int
    importance: float = 0.0
    pinned: str = ""


@dataclass(frozen=True)
class Plan:
    """Channels per group for one budget goal; ``achieved``: what the whole plan saves, when known."""

    taken: dict[int, int]
    chosen: list[Unit]
    achieved: float | None
    at_caps: bool


@dataclass
class Reader:
    """A layer that reads a group's channels, as criterion=reconstruction costs it: what a sensitivity
    probe needs to make up for a removal in its weights, as the refit will after the real one."""

    output: str  # the node's first output (nodes may be unnamed)
    weight_index: int
    axis: int
    weight_shape: tuple[int, ...]
    alpha: float  # a Gemm's alpha: the bias shift is in output units
    layer: ReadingLayer


@dataclass
class Group:
    """Producers whose channels are coupled, and their units."""

    producers: list[Producer]
    units: list[Unit] = field(default_factory=list)
    # criterion=reconstruction: what removing the k cheapest free units costs the reading layers after
    # compensation, k = 0..free (rises faster than k² where the group runs out of redundant channels)
    removal_costs: np.ndarray | None = None
    readers: list[Reader] = field(default_factory=list)  # criterion=reconstruction: the layers costed
    slots: dict[int, int] = field(default_factory=dict)  # id(unit) -> its row in the readers' positions

    @property
    def label(self) -> str:
        return ", ".join(p.node.name or p.node.outputs[0].name for p in self.producers)


def unit_label(unit: Unit, analysis: Analysis) -> str:
    producer = analysis.producer_of(unit.members[0])
    return f"{producer.node.name}[{unit.members[0] - producer.base}]" if producer else str(unit.members[0])
