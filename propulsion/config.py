"""What a Propulsion adapter trains: a frozen, validated configuration."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from propulsion.errors import PropulsionConfigError

__all__ = ["PropulsionConfig"]

TargetModules = str | tuple[str, ...] | None


def _names(value: Any) -> tuple[str, ...] | None:
    """``value`` as a tuple of non-empty strings, or None when it is not a list of them."""
    if isinstance(value, str | bytes | dict) or not isinstance(value, Iterable):
        return None
    names = tuple(value)
    return names if all(isinstance(v, str) and v for v in names) else None


@dataclass(frozen=True)
class PropulsionConfig:
    """Configuration of a Propulsion adapter (Kowsher et al., arXiv 2409.10927).

    Each wrapped layer keeps its frozen weights and gains one trainable vector ``z`` (one entry
    per output feature, initialised to ``init_value``); its output becomes
    ``h = (W x + b) * z**degree`` (``E[ids] * z**degree`` for an embedding).

    The default is the clean "z only" variant: every ``nn.Linear`` wrapped (the classification
    head included), degree 5, biases frozen. :meth:`reference` gives the authors' released
    defaults.

    Example:
        >>> cfg = PropulsionConfig(degree=3, target_modules=["query", "value"])
        >>> cfg.target_modules
        ('query', 'value')
        >>> PropulsionConfig(degree=0)
        Traceback (most recent call last):
        ...
        propulsion.errors.PropulsionConfigError: degree must be an integer >= 1, got 0
    """

    degree: int = field(default=5, metadata={"help": "integer power k of z; >= 1"})
    target_modules: TargetModules = field(
        default=None,
        metadata={
            "help": "None: every nn.Linear; a list of names matched as suffixes of the module "
            "path on dot boundaries ('query' matches 'encoder.layer.0.attention.self.query'); "
            "or one string, a regular expression the whole module path must match"
        },
    )
    include_embeddings: bool = field(
        default=False, metadata={"help": "also wrap every nn.Embedding"}
    )
    include_layernorm: bool = field(
        default=False, metadata={"help": "also wrap every nn.LayerNorm (scales its output)"}
    )
    exclude_modules: tuple[str, ...] = field(
        default=(), metadata={"help": "module-path suffixes never wrapped"}
    )
    train_bias: bool = field(
        default=False, metadata={"help": "make the bias of every wrapped layer trainable"}
    )
    modules_to_save: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "module-path suffixes trained in full and never wrapped, e.g. the "
            "classification head ('classifier')"
        },
    )
    init_value: float = field(default=1.0, metadata={"help": "initial value of every z entry"})

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:  # frozen: normalise through object.__setattr__
            object.__setattr__(self, name, value)

        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise PropulsionConfigError(
                f"degree must be an integer >= 1, got {self.degree!r}"
            )
        targets = self.target_modules
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as exc:
                raise PropulsionConfigError(
                    f"target_modules {targets!r} is not a valid regular expression: {exc}"
                ) from exc
        elif targets is not None:
            targets = _names(targets)
            if targets is None:
                raise PropulsionConfigError(
                    f"target_modules must be None, a regex string or a list of non-empty "
                    f"names, got {self.target_modules!r}"
                )
            put("target_modules", targets)
        for name in ("exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            names = (value,) if isinstance(value, str) else _names(() if value is None else value)
            if names is None or not all(names):
                raise PropulsionConfigError(
                    f"{name} must be a list of non-empty names, got {value!r}"
                )
            put(name, names)
        for name in ("include_embeddings", "include_layernorm", "train_bias"):
            if not isinstance(getattr(self, name), bool):
                raise PropulsionConfigError(
                    f"{name} must be True or False, got {getattr(self, name)!r}"
                )
        if not isinstance(self.init_value, int | float) or not (
            self.init_value == self.init_value and abs(self.init_value) != float("inf")
        ):
            raise PropulsionConfigError(f"init_value must be a finite number, got {self.init_value!r}")
        if self.init_value == 0:
            raise PropulsionConfigError(
                "init_value 0 makes every wrapped output zero and its gradient zero for degree "
                "> 1; use a non-zero value (the method uses 1.0)"
            )
        put("init_value", float(self.init_value))

    @classmethod
    def reference(cls, degree: int = 5) -> PropulsionConfig:
        """The authors' released defaults: every Linear and Embedding (head included),
        degree 5, wrapped biases trainable, head weight frozen, LayerNorms untouched."""
        return cls(degree=degree, target_modules=None, include_embeddings=True, train_bias=True)

    def replace(self, **changes: Any) -> PropulsionConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PropulsionConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a file from another tool)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PropulsionConfigError(
                f"unknown PropulsionConfig fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
