"""Named special cases of GM-Softmax, shared by the single-process and class-parallel losses."""

from __future__ import annotations

from typing import TypeVar

# name -> (defaults, the constructor argument that `margin=` sets)
_PRESETS: dict[str, tuple[dict[str, float], str | None]] = {
    "normface": ({"scale": 20.0}, None),
    "sphereface": ({"scale": 64.0, "m1": 4.0}, "m1"),
    "cosface": ({"scale": 64.0, "m3": 0.35}, "m3"),
    "arcface": ({"scale": 64.0, "m2": 0.5}, "m2"),
}

_Loss = TypeVar("_Loss", bound="MarginPresetsMixin")


class MarginPresetsMixin:
    """``preset(name, num_classes, embedding_size, ...)`` for a loss whose constructor takes
    ``(num_classes, embedding_size, scale=, m1=, m2=, m3=, ...)``."""

    @classmethod
    def preset(
        cls: type[_Loss], name: str, num_classes: int, embedding_size: int, **kwargs
    ) -> _Loss:
        """A named special case; ``margin=`` sets its margin, other arguments go to ``__init__``."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(_PRESETS)}")
        defaults, margin_argument = _PRESETS[name]
        if "margin" in kwargs:
            if margin_argument is None:
                raise ValueError(f"preset {name!r} has no margin")
            kwargs[margin_argument] = kwargs.pop("margin")
        return cls(num_classes, embedding_size, **{**defaults, **kwargs})

    @classmethod
    def preset_names(cls) -> list[str]:
        return sorted(_PRESETS)
