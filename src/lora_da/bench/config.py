"""What a benchmark runs: the grid's variants and `BenchConfig`, which builds each run's step settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lora_da.evaluate import EvalConfig
from lora_da.methods import InitConfig, check_method_options, normalize_method
from lora_da.models import DEFAULT_MODEL
from lora_da.train import TrainConfig

CALIBRATION_KEY = "calibration"

#: Named LoRA-DA ablations: name -> (method, overrides). Overrides are LoraDAConfig fields, plus
#: `calibration` (number of calibration examples).
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora_da-bias-only": ("lora_da", {"variance_weight": 0.0}),
    "lora_da-variance-only": ("lora_da", {"bias_weight": 0.0}),
    "lora_da-identity-fisher": ("lora_da", {"fisher": "identity"}),
    "lora_da-calib32": ("lora_da", {CALIBRATION_KEY: 32}),
    "lora_da-calib64": ("lora_da", {CALIBRATION_KEY: 64}),
    "lora_da-calib256": ("lora_da", {CALIBRATION_KEY: 256}),
    "lora_da-gamma64": ("lora_da", {"gamma": 64.0}),
    "lora_da-gamma256": ("lora_da", {"gamma": 256.0}),
    "lora_da-gamma4096": ("lora_da", {"gamma": 4096.0}),
}

#: Settings that change what a run measures; a resumed results.json must agree on all of them.
PROTOCOL_FIELDS = (
    "model", "data", "steps", "batch_size", "max_length", "num_train", "num_val", "num_test", "num_accuracy",
    "max_new_tokens", "calibration_examples", "calibration_batch_size", "lora_alpha", "use_rslora",
    "target_modules", "warmup_ratio", "schedule", "weight_decay", "dtype", "data_seed", "grad_accum", "regime",
)


def clean_rate(lr: float) -> float:
    """`lr` rounded to 12 significant digits: a computed rate (3e-3 / 10 = 0.00030000000000000003) then equals
    the written one (3e-4), in run keys and in every comparison of rates."""
    return float(f"{lr:.12g}")


@dataclass(frozen=True)
class Variant:
    """One row of the grid: a registry method plus its option overrides and a calibration size."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    calibration: int | None = None


def _parse_value(text: str) -> Any:
    """'0' -> 0, '1e-3' -> 0.001, 'true' -> True, anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def parse_variant(spec: str) -> Variant:
    """A method name, a named ablation (see ABLATIONS) or 'method@key=value,key=value' -> Variant."""
    spec = str(spec).strip()
    if spec in ABLATIONS:
        method, overrides = ABLATIONS[spec]
    else:
        method, _, options = spec.partition("@")
        overrides = {}
        for item in filter(None, (part.strip() for part in options.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"bad method option {item!r} in {spec!r}: write key=value, e.g. lora_da@gamma=256")
            overrides[key.strip()] = _parse_value(value)
    method = normalize_method(method)
    overrides = dict(overrides)
    calibration = overrides.pop(CALIBRATION_KEY, None)
    if calibration is not None and (not isinstance(calibration, int) or calibration < 1):
        raise ValueError(f"{CALIBRATION_KEY} must be a positive integer in {spec!r}, got {calibration!r}")
    try:
        check_method_options(method, overrides)
    except ValueError as err:
        raise ValueError(f"bad options in {spec!r}: {err}; and '{CALIBRATION_KEY}'") from None
    return Variant(spec, method, overrides, calibration)


@dataclass
class BenchConfig:
    """The grid and the training/evaluation budget of a benchmark.

    Settings shared with a single run take their defaults from `TrainConfig` and `InitConfig`; the budget
    (steps, batch size, lengths, split sizes) is the benchmark's own, smaller than a real fine-tuning run.
    """

    model: str = DEFAULT_MODEL
    data: str = "arith"
    methods: list[str] = field(default_factory=lambda: ["lora", "lora_da"])
    ranks: list[int] = field(default_factory=lambda: [8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    learning_rates: list[float] = field(default_factory=lambda: [2e-4, 1e-3, 3e-3])
    sweep_seeds: int | None = None  # seeds used to pick the lr (first k); None = every seed at every lr
    extend_edges: bool = False  # best sweep rate at an end of learning_rates: also sweep one step beyond it
    steps: int = TrainConfig.steps
    batch_size: int = 4
    max_length: int = 128
    num_train: int = 1000
    num_val: int = 64
    num_test: int = 128
    num_accuracy: int = 64  # test examples scored by greedy generation (QA data); 0 = skip
    max_new_tokens: int = 64
    eval_every: int = 20
    calibration_examples: int = 32
    calibration_batch_size: int = InitConfig.calibration_batch_size
    lora_alpha: float = InitConfig.lora_alpha
    use_rslora: bool = InitConfig.use_rslora
    target_modules: str | list[str] = InitConfig.target_modules
    warmup_ratio: float = TrainConfig.warmup_ratio
    schedule: str = TrainConfig.schedule
    weight_decay: float = TrainConfig.weight_decay
    dtype: str = TrainConfig.dtype
    data_seed: int = 0
    eval_batch_size: int = 16
    grad_accum: int = TrainConfig.grad_accum
    regime: str = TrainConfig.regime  # how adapters are trained (lora_da.train.REGIMES); one per output folder
    generate_batch_size: int | None = None  # None: eval_batch_size
    detailed_records: bool = False  # also record the step history, init report and metrics before/after training

    def __post_init__(self) -> None:
        for name in ("methods", "ranks", "seeds", "learning_rates"):
            values = list(getattr(self, name))
            if not values:
                raise ValueError(f"bench needs at least one value in {name}")
            if len(set(map(str, values))) != len(values):
                raise ValueError(f"{name} has duplicates: {values}")
            setattr(self, name, values)
        if any(int(r) != r or r < 1 for r in self.ranks):
            raise ValueError(f"ranks must be positive integers, got {self.ranks}")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in self.learning_rates):
            raise ValueError(f"learning rates must be positive numbers, got {self.learning_rates}")
        if self.sweep_seeds is not None and not 1 <= self.sweep_seeds <= len(self.seeds):
            raise ValueError(f"sweep_seeds must be between 1 and the number of seeds ({len(self.seeds)})")
        for name in ("num_train", "num_val", "num_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        # the step settings validate the rest, once, with their own messages
        self.train_config(self.learning_rates[0], self.seeds[0])
        self.eval_config()
        for spec in self.methods:
            self.init_config(parse_variant(spec), self.ranks[0], self.seeds[0])

    def rate_beyond(self, lr: float) -> float | None:
        """With `extend_edges`, the rate one step past `lr` when it is the smallest or largest of the sweep, else None.

        The step repeats the ratio of the two rates at that end, rounded to the decade pattern of a half-decade
        sweep (1e-4, 3e-4, 1e-3, 3e-3 -> 3e-5 and 1e-2, not 3.3e-5 and 9e-3).
        """
        rates = sorted(self.learning_rates)
        if not self.extend_edges or len(rates) < 2:
            return None

        def past(end: float, inner: float) -> float:
            geometric = end * end / inner
            decade = inner * 10 if end > inner else inner / 10
            return decade if 2 / 3 < decade / geometric < 1.5 else geometric

        below, above = clean_rate(past(rates[0], rates[1])), clean_rate(past(rates[-1], rates[-2]))
        return {rates[0]: below, rates[-1]: above}.get(lr)

    def train_config(self, lr: float, seed: int) -> TrainConfig:
        """The fine-tuning settings of one run."""
        return TrainConfig(
            steps=self.steps, lr=lr, batch_size=self.batch_size, grad_accum=self.grad_accum, schedule=self.schedule,
            warmup_ratio=self.warmup_ratio, weight_decay=self.weight_decay, dtype=self.dtype,
            eval_every=self.eval_every, eval_batch_size=self.eval_batch_size, seed=seed, show_progress=False,
            regime=self.regime,
        )

    def eval_config(self) -> EvalConfig:
        """The evaluation settings of every run."""
        return EvalConfig(
            batch_size=self.eval_batch_size, dtype=self.dtype, num_generate=self.num_accuracy,
            generate_batch_size=self.generate_batch_size or self.eval_batch_size,
            max_new_tokens=self.max_new_tokens, max_length=self.max_length, show_progress=False,
        )

    def init_config(self, variant: Variant, rank: int, seed: int) -> InitConfig:
        """The initialization settings of one run of `variant`."""
        return InitConfig(
            method=variant.method, rank=rank, lora_alpha=self.lora_alpha, use_rslora=self.use_rslora,
            target_modules=self.target_modules, num_calibration=variant.calibration or self.calibration_examples,
            calibration_batch_size=self.calibration_batch_size, seed=seed, options=variant.overrides,
            show_progress=False,
        )

    def to_dict(self) -> dict:
        """JSON-ready settings."""
        return dataclasses.asdict(self)
