"""Settings of the embedded backend: how its HNSW graph is built and searched, and how filters are met."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twostage.server.config import Config

METRICS = ("cos", "ip", "l2sq")
DTYPES = ("f32", "f16", "i8")


@dataclass(frozen=True)
class IndexSettings:
    """How the HNSW graph is built and searched (the metric also fixes what scores mean). `view`: map the saved
    graph read-only. `filter_overfetch`: a filtered search first asks the graph for k times this many."""

    metric: str = "cos"
    dtype: str = "f32"
    connectivity: int = 16
    expansion_add: int = 128
    expansion_search: int = 128
    view: bool = False
    filter_overfetch: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.metric not in METRICS:
            problems.append(f"metric {self.metric!r} not one of {METRICS}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} not one of {DTYPES}")
        for name in ("connectivity", "expansion_add", "expansion_search", "filter_overfetch"):
            if int(getattr(self, name)) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if problems:
            raise ValueError("invalid index settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Config) -> IndexSettings:
        """Read the index_* knobs (and filter_overfetch) of a `Config`."""
        return cls(
            metric=config.index_metric,
            dtype=config.index_dtype,
            connectivity=int(config.index_connectivity),
            expansion_add=int(config.index_expansion_add),
            expansion_search=int(config.index_expansion_search),
            view=bool(config.index_view),
            filter_overfetch=int(config.filter_overfetch),
        )
