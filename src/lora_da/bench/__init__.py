"""A fair comparison of LoRA initializations: methods x ranks x seeds x learning rates, lr tuned per method.

Protocol: every (method, rank) gets its own learning rate, picked by the mean validation loss over the sweep
seeds; test metrics are reported at that rate as mean +- std over seeds. Every run is a record in
`results.json` (written atomically after each run, so a rerun resumes); failed runs stay as rows with their
error. `report.md` and PNG plots are regenerated from the records.

Modules: `config` (variants, BenchConfig), `task` (the data splits), `runner` (one cell, the grid, resume),
`summary` (lr choice, mean +- std), `report` (report.md, results.json), `plots`, `memory` (peak RSS).
"""

from lora_da.bench.config import ABLATIONS, CALIBRATION_KEY, PROTOCOL_FIELDS, BenchConfig, Variant, parse_variant
from lora_da.bench.memory import PeakRSS
from lora_da.bench.plots import plot_training_curves, write_plots
from lora_da.bench.report import REPORT_FILE, RESULTS_FILE, before_after_table, fmt, write_outputs, write_report
from lora_da.bench.runner import cell_key, run_bench, run_cell
from lora_da.bench.summary import mean_std, select_learning_rate, summarize, sweep_seeds_of
from lora_da.bench.task import BenchTask, load_bench_task

__all__ = [
    "ABLATIONS",
    "CALIBRATION_KEY",
    "PROTOCOL_FIELDS",
    "REPORT_FILE",
    "RESULTS_FILE",
    "BenchConfig",
    "BenchTask",
    "PeakRSS",
    "Variant",
    "before_after_table",
    "cell_key",
    "fmt",
    "load_bench_task",
    "mean_std",
    "parse_variant",
    "plot_training_curves",
    "run_bench",
    "run_cell",
    "select_learning_rate",
    "summarize",
    "sweep_seeds_of",
    "write_outputs",
    "write_plots",
    "write_report",
]
