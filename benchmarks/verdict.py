"""The verdicts of the grid's comparisons beside the method table: per training regime (LoRA-FA, LoRA+), the short
budget and the rank allocations, each method at its validation-chosen rate on both tasks, and whether it beats LoRA
at the same rank (the same trainable parameters) by more than one std on both (3 seeds each), read from the folders
`grid.py merge` writes:

    python benchmarks/grid.py merge
    python benchmarks/verdict.py    # reads benchmarks/results/grid/<task>-{lora-fa,lora-plus,short,ranks}

A cell in brackets is partial: `(2/4 lrs)` of the sweep run so far, `[1 seed]` of 3 at the chosen rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grid import (
    ALLOCATION_RANKS,
    GRID,
    PROTOCOL,
    REGIME_METHODS,
    SHORT_METHODS,
    TASKS,
    set_name,
    task_folder,
)
from grid import (
    STUDIES as GRID_STUDIES,
)

from lora_da.bench import fmt

#: comparison -> (set of the merged folders `<task>-<set>`, variants compared, title, ranks)
STUDIES = {
    "lora_fa": (set_name("lora_fa"), REGIME_METHODS["lora_fa"], "LoRA-FA (A frozen, PEFT's create_lorafa_optimizer)",
                (8,)),
    "lora_plus": (set_name("lora_plus"), REGIME_METHODS["lora_plus"], "LoRA+ (PEFT's create_loraplus_optimizer)",
                  ALLOCATION_RANKS),
    "short": (set_name(budget="short"), SHORT_METHODS, "Short budget (25 steps)", (8,)),
    "ranks": ("ranks", GRID_STUDIES["ranks"], "Rank allocations (standard training)", ALLOCATION_RANKS),
}
SEEDS = len(PROTOCOL["seeds"])


def summaries(results: Path, name: str, rank: int = 8) -> dict[str, dict[str, dict]]:
    """task -> method -> summary row at `rank` of the merged folder `<task>-<name>` (tasks without one left out)."""
    found = {}
    for task in TASKS:
        path = results / f"{task_folder(task)}-{name}" / "results.json"
        if path.exists():
            rows = {row["method"]: row for row in json.loads(path.read_text())["summary"] if row["rank"] == rank}
            if rows:
                found[task] = rows
    return found


def _mean_std(row: dict, metric: str, spec: str) -> str:
    if row.get(metric) is None:
        return "-"
    partial = "" if row["seeds_ok"] >= SEEDS else f" [{row['seeds_ok']} seed{'s' * (row['seeds_ok'] > 1)}]"
    return fmt(row[metric], spec, row[metric + "_std"]) + partial


def _rate(row: dict) -> str:
    if row.get("best_lr") is None:
        return "-"
    grid = len(PROTOCOL["learning_rates"])
    partial = "" if row["lrs_tried"] >= grid else f" ({row['lrs_tried']}/{grid} lrs)"
    return f"{row['best_lr']:g}{partial}"


def compare(row: dict | None, lora: dict | None) -> str:
    """'better' / 'worse' when test losses differ by more than the larger std, 'tie' within it, 'pending' before
    both have every seed."""
    if not row or not lora or row.get("test_loss") is None or lora.get("test_loss") is None:
        return "pending"
    if min(row["seeds_ok"], lora["seeds_ok"]) < SEEDS:
        return "pending"
    margin = max(row["test_loss_std"], lora["test_loss_std"])
    gain = lora["test_loss"] - row["test_loss"]
    return "better" if gain > margin else "worse" if -gain > margin else "tie"


def table(found: dict[str, dict[str, dict]], methods: list[str]) -> str:
    """One markdown table: a row per method, both tasks, and the comparison with LoRA on test loss."""
    lines = ["| method | arith lr | arith test loss | arith exact match | stdlib-code lr | stdlib-code test loss "
             "| vs LoRA (arith / stdlib-code) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    arith, code = found.get("arith", {}), found.get("stdlib-code", {})
    for method in methods:
        a, c = arith.get(method), code.get(method)
        cells = [_rate(a) if a else "not run", _mean_std(a, "test_loss", ".4f") if a else "-",
                 _mean_std(a, "accuracy", ".3f") if a else "-", _rate(c) if c else "not run",
                 _mean_std(c, "test_loss", ".4f") if c else "-"]
        versus = "" if method == "lora" else " / ".join(
            compare(task.get(method), task.get("lora")) for task in (arith, code))
        lines.append(f"| `{method}` | " + " | ".join(cells) + f" | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="?", default=GRID,
                        help="the dest folder of `grid.py merge` (default benchmarks/results/grid)")
    args = parser.parse_args()
    for name, methods, title, ranks in STUDIES.values():
        for rank in ranks:
            found = summaries(args.results, name, rank)
            if found:
                print(verdict(found, methods, title if len(ranks) == 1 else f"{title}, rank {rank}"))


def verdict(found: dict[str, dict[str, dict]], methods: list[str], title: str) -> str:
    """The table of one comparison and which methods beat LoRA by more than one std on both tasks."""
    verdicts = {m: [compare(found.get(task, {}).get(m), found.get(task, {}).get("lora")) for task in TASKS]
                for m in methods if m != "lora"}
    winners = [m for m, seen in verdicts.items() if all(v == "better" for v in seen)]
    none = "none so far" if any("pending" in seen for seen in verdicts.values()) else "none"
    return (f"#### {title}\n\n{table(found, methods)}\n\nBeats LoRA by more than one std on both tasks: "
            f"{', '.join(f'`{m}`' for m in winners) or none}.\n")


if __name__ == "__main__":
    main()
