"""SPP's hyper-parameters: below the layer, the model wrapper and the method, which all read them."""

from __future__ import annotations

from dataclasses import dataclass

from ....errors import PrunetuneError

#: how an SPPLinear computes its forward (see ``layer.py``)
FORWARD_MODES = ("auto", "materialise", "grouped")
#: what a dense input gets
ON_DENSE = ("warn", "error", "ignore")


@dataclass
class SPPConfig:
    """SPP hyper-parameters. ``scaling = alpha / r``; ``r`` only enters through that ratio."""

    r: int = 16
    alpha: float = 32.0
    groups: int = 16
    dropout: float = 0.05
    #: linear names relative to a decoder layer ("self_attn.q_proj", ...); None = every linear of the adapter
    targets: list[str] | None = None
    forward: str = "auto"
    #: what a dense input gets: "warn", "error" or "ignore" (no effect on the weights)
    on_dense: str = "warn"

    def __post_init__(self):
        if int(self.r) <= 0:
            raise PrunetuneError(f"SPP r must be positive (got {self.r})")
        if int(self.groups) <= 0:
            raise PrunetuneError(f"SPP groups must be positive (got {self.groups})")
        if not 0.0 <= self.dropout < 1.0:
            raise PrunetuneError(f"SPP dropout must be in [0, 1) (got {self.dropout})")
        if self.forward not in FORWARD_MODES:
            raise PrunetuneError(f"unknown SPP forward '{self.forward}' (use {', '.join(FORWARD_MODES)})")
        if self.on_dense not in ON_DENSE:
            raise PrunetuneError(f"on_dense must be {', '.join(ON_DENSE)} (got {self.on_dense})")
        if self.targets is not None:
            self.targets = list(self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
