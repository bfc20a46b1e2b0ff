"""What a backbone name resolves to (`BackboneSpec`), shared by the registry and `timm_names`."""
from __future__ import annotations

import dataclasses


class UnknownBackboneError(ValueError):
    """A backbone name that is neither a registry name nor a usable timm model."""


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """One registry entry.

    source: "timm" or "torchxrayvision"; arch: the timm architecture, or the
    torchxrayvision weights key (e.g. "densenet121-res224-all"); tag: the timm pretrained
    tag (``a1_in1k``; "" for torchxrayvision and for timm models without weights); target_layer: dotted
    module name inside the built ``model`` whose output equals ``model(x)``;
    min_input_size: the smallest square input the architecture accepts (used by tests).
    """

    name: str
    source: str
    arch: str
    target_layer: str
    paper: str
    note: str = ""
    min_input_size: int = 64
    aliases: tuple[str, ...] = ()
    tag: str = ""

    @property
    def timm_name(self) -> str | None:
        """The exact timm name, ``arch.tag`` (what timm.create_model is given); None for torchxrayvision."""
        if self.source != "timm":
            return None
        return f"{self.arch}.{self.tag}" if self.tag else self.arch
