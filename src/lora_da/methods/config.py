"""`InitConfig`: the settings of the initialization step, and the method options built from them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lora_da.methods.registry import METHODS, normalize_method


def methods_with_options() -> list[str]:
    """Registry methods that take an options object (sorted)."""
    return sorted(name for name, spec in METHODS.items() if spec.options_type is not None)


def check_method_options(method: str, names) -> None:
    """ValueError unless every name is a field of `method`'s options type."""
    names = set(names)
    if not names:
        return
    options_type = METHODS[normalize_method(method)].options_type
    known = {f.name for f in dataclasses.fields(options_type)} if options_type else set()
    unknown = sorted(names - known)
    if options_type is None or unknown:
        fields = ", ".join(sorted(f.name for f in dataclasses.fields(METHODS["lora_da"].options_type)))
        raise ValueError(f"only {'/'.join(methods_with_options())} take options (fields of LoraDAConfig: {fields})"
                         + (f"; unknown: {', '.join(unknown)}" if unknown else ""))


@dataclass
class InitConfig:
    """How to initialize an adapter: method, adapter shape, calibration data, method options.

    `options` overrides fields of the method's options object (e.g. {"gamma": 256} for lora_da's
    `LoraDAConfig`); the rest keep their defaults, with `population_size` defaulting to the size of the
    training set and `seed` to this config's seed.
    """

    method: str = "lora_da"
    rank: int = 8
    lora_alpha: float = 16.0
    use_rslora: bool = True
    target_modules: str | list[str] = "all-linear"
    num_calibration: int = 256
    calibration_batch_size: int = 8
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    show_progress: bool = True

    def __post_init__(self) -> None:
        self.method = normalize_method(self.method)
        for name in ("rank", "num_calibration", "calibration_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.target_modules, str) and not self.target_modules.strip():
            raise ValueError("target_modules is empty; pass 'all-linear' or names such as q_proj,v_proj")
        self.options = dict(self.options)
        check_method_options(self.method, self.options)
        self.method_options(population_size=1)  # the option values are checked now, not after loading anything

    @property
    def needs_calibration(self) -> bool:
        """Whether the method reads calibration data."""
        return METHODS[self.method].needs_calibration

    def calibration_size(self, num_examples: int) -> int:
        """Calibration examples drawn from `num_examples` training examples."""
        return min(self.num_calibration, num_examples)

    def method_options(self, population_size: int) -> Any:
        """The method's options object (None for methods without options); `population_size` is the default
        size of the fine-tuning set."""
        options_type = METHODS[self.method].options_type
        if options_type is None:
            return None
        known = {f.name for f in dataclasses.fields(options_type)}
        defaults = {"population_size": population_size, "seed": self.seed, "show_progress": self.show_progress}
        values = {k: v for k, v in defaults.items() if k in known}
        values.update(self.options)
        return options_type(**values)

    def to_dict(self) -> dict:
        """JSON-ready settings."""
        return dataclasses.asdict(self)
