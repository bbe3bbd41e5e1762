"""Benchmark harness on a tiny model: files, per-method lr choice, failed rows, resume."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from conftest import build_tiny_model

from lora_da import bench
from lora_da.bench import BenchConfig, parse_variant, run_bench, runner, select_learning_rate
from lora_da.cli import commands, main
from lora_da.methods import METHODS, MethodSpec

LOW_LR, HIGH_LR = 1e-6, 3e-2
BROKEN = "broken"  # a registry method that fails when it runs (bad option values are refused before any run)


def _fail(ctx):
    raise RuntimeError("broken on purpose")


@pytest.fixture(scope="module", autouse=True)
def broken_method():
    """Register BROKEN for this module's grids."""
    METHODS[BROKEN] = MethodSpec(BROKEN, "fails at init", _fail)
    yield
    del METHODS[BROKEN]


@pytest.fixture(scope="module")
def sums_jsonl(tmp_path_factory):
    """40 short question/answer examples (answers end in `#### <number>`)."""
    path = tmp_path_factory.mktemp("bench-data") / "sums.jsonl"
    rows = [{"question": f"{a}+{b}?", "answer": f"#### {a + b}"} for a in range(1, 9) for b in range(1, 6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def tiny_config(model_dir, data, **overrides) -> BenchConfig:
    """A grid small enough for a few seconds on 2 CPU cores."""
    options = dict(
        model=str(model_dir), data=str(data), methods=["lora", "lora_da", BROKEN], ranks=[4],
        seeds=[0], learning_rates=[LOW_LR, HIGH_LR], steps=6, batch_size=4, max_length=64, num_train=24,
        num_val=8, num_test=8, num_accuracy=4, max_new_tokens=6, eval_every=3, calibration_examples=8,
        eval_batch_size=8,
    )
    options.update(overrides)
    return BenchConfig(**options)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, tiny_model_dir, sums_jsonl):
    """One benchmark run: 2 working methods + 1 that must fail, 1 seed, 2 learning rates."""
    out = tmp_path_factory.mktemp("bench-out")
    records = run_bench(out, tiny_config(tiny_model_dir, sums_jsonl), show_progress=False)
    return out, records


def test_bench_writes_all_files(bench_run):
    out, records = bench_run
    for name in ("results.json", "report.md", "loss_curves_r4.png", "metric_vs_rank.png", "init_overhead.png"):
        assert (out / name).stat().st_size > 0, name
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["records"]) == len(records) == 6
    required = {"method", "rank", "seed", "lr", "init_seconds", "final_eval_loss", "accuracy", "status",
                "peak_rss_mb", "train_curve", "eval_curve"}
    for record in payload["records"]:
        if record["status"] == "ok":
            assert required <= set(record)
            assert record["eval_curve"][0][0] == 0 and record["eval_curve"][-1][0] == 6
            assert len(record["train_curve"]) == 6
            assert 0.0 <= record["accuracy"] <= 1.0 and record["peak_rss_mb"] > 0
    report = (out / "report.md").read_text()
    assert "| `lora` |" in report and "| `lora_da` |" in report and "![metric_vs_rank]" in report


def test_bench_picks_the_better_learning_rate(bench_run):
    out, records = bench_run
    config = tiny_config("unused", "unused")
    for method in ("lora", "lora_da"):
        runs = {r["lr"]: r["val_loss"] for r in records if r["method"] == method}
        assert runs[HIGH_LR] < runs[LOW_LR]  # 6 steps at 1e-6 barely move a random model
        assert select_learning_rate(records, method, 4, config)["lr"] == HIGH_LR
    summary = {row["method"]: row for row in json.loads((out / "results.json").read_text())["summary"]}
    assert summary["lora"]["best_lr"] == HIGH_LR and summary["lora"]["seeds_ok"] == 1


def test_failed_cell_is_a_row_with_its_error(bench_run):
    out, records = bench_run
    failed = [r for r in records if r["method"] == BROKEN]
    assert len(failed) == 2 and all(r["status"] == "failed" for r in failed)
    assert all("broken on purpose" in r["error"] for r in failed)
    assert all(r["status"] == "ok" for r in records if r["method"] in ("lora", "lora_da"))
    assert f"{BROKEN}\\|r4" in (out / "report.md").read_text()


def test_resume_skips_finished_cells_and_runs_only_new_ones(bench_run, tmp_path, tiny_model_dir, sums_jsonl,
                                                           monkeypatch):
    out, _ = bench_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "results.json").write_text((out / "results.json").read_text())
    calls = []
    real = runner.run_cell

    def counting(*args, **kwargs):
        calls.append(bench.cell_key(args[4].name, *args[5:]))
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", counting)
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora", BROKEN],
                         learning_rates=[LOW_LR, HIGH_LR, 1e-3])
    records = run_bench(resumed, config, show_progress=False)
    # only the new learning rate runs; finished and failed cells are kept as they were
    expected = [bench.cell_key("lora", 4, 1e-3, 0), bench.cell_key(BROKEN, 4, 1e-3, 0)]
    assert sorted(calls) == sorted(expected)
    assert len(records) == 8
    calls.clear()
    run_bench(resumed, config, show_progress=False, retry_failed=True)
    assert sorted(calls) == sorted(bench.cell_key(BROKEN, 4, lr, 0) for lr in (LOW_LR, HIGH_LR, 1e-3))


def test_resume_refuses_a_different_protocol(bench_run, tmp_path, tiny_model_dir, sums_jsonl):
    out, _ = bench_run
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    with pytest.raises(ValueError, match="steps"):
        run_bench(tmp_path, tiny_config(tiny_model_dir, sums_jsonl, steps=7), show_progress=False)


def test_resume_refuses_runs_on_other_data(bench_run, tmp_path, tiny_model_dir, sums_jsonl):
    out, records = bench_run
    assert len({r["data_hash"] for r in records}) == 1
    payload = json.loads((out / "results.json").read_text())
    payload["records"][0]["data_hash"] = "0123456789abcdef"
    (tmp_path / "results.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="other data"):
        run_bench(tmp_path, tiny_config(tiny_model_dir, sums_jsonl), show_progress=False)


def test_resume_refuses_runs_of_other_weights_at_the_same_path(bench_run, tmp_path, tiny_model_dir, sums_jsonl,
                                                               tiny_tokenizer):
    """Runs are keyed by the weights, not the model's name: a replaced model never mixes with the old runs."""
    out, records = bench_run
    assert len({r["model_hash"] for r in records}) == 1
    (tmp_path / "results.json").write_text((out / "results.json").read_text())
    with pytest.raises(ValueError, match="another model.*its weights changed"):
        run_bench(tmp_path, tiny_config(tiny_model_dir, sums_jsonl), base_model=build_tiny_model(seed=1),
                  tokenizer=tiny_tokenizer, show_progress=False)


def test_a_diverging_learning_rate_is_a_diverged_row(tmp_path, tiny_model_dir, sums_jsonl):
    records = run_bench(tmp_path, tiny_config(tiny_model_dir, sums_jsonl, methods=["lora"], learning_rates=[1e4],
                                              num_accuracy=0, eval_every=0), show_progress=False, plots=False)
    assert [r["status"] for r in records] == ["diverged"] and "training diverged" in records[0]["error"]


@pytest.mark.parametrize(("statuses", "exit_status"), [(["failed", "diverged"], 1), (["ok", "failed"], 0)])
def test_bench_command_exit_status_and_retry_flag(statuses, exit_status, tmp_path, monkeypatch, capsys):
    """A grid in which no run finished exits 1; --retry-failed reaches run_bench."""
    seen = {}

    def fake_run_bench(output, config, retry_failed=False, statistics_cache=None):
        seen["retry_failed"] = retry_failed
        return [{"key": f"lora|r8|lr0.001|s{i}", "status": s, "error": None if s == "ok" else "boom"}
                for i, s in enumerate(statuses)]

    monkeypatch.setattr(commands, "run_bench", fake_run_bench)
    assert main(["bench", "--output", str(tmp_path), "--retry-failed"]) == exit_status
    err = capsys.readouterr().err
    assert seen["retry_failed"] is True
    assert ("lora-da: error: no run of the grid finished" in err) == (exit_status == 1)


def test_sweep_seeds_run_extra_seeds_only_at_the_chosen_rate(tmp_path, tiny_model_dir, sums_jsonl):
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora"], seeds=[0, 1], sweep_seeds=1,
                         num_accuracy=0, steps=3)
    records = run_bench(tmp_path, config, show_progress=False)
    assert sorted((r["seed"], r["lr"]) for r in records) == [(0, LOW_LR), (0, HIGH_LR), (1, HIGH_LR)]
    assert all(r["accuracy"] is None for r in records)
    row = json.loads((tmp_path / "results.json").read_text())["summary"][0]
    assert row["seeds_ok"] == 2 and row["test_loss_std"] > 0


def test_shards_without_plots_merge_into_one_report(tmp_path, tiny_model_dir, sums_jsonl):
    """Two shards (lora at ranks 2 and 4, lora_da at rank 4) merge into rows only for cells that ran."""
    base = dict(seeds=[0], learning_rates=[HIGH_LR], num_accuracy=0, steps=2)
    lora = run_bench(tmp_path / "a", tiny_config(tiny_model_dir, sums_jsonl, methods=["lora"], ranks=[2, 4], **base),
                     show_progress=False, plots=False)
    lora_da = run_bench(tmp_path / "b", tiny_config(tiny_model_dir, sums_jsonl, methods=["lora_da"], **base),
                        show_progress=False, plots=False)
    assert not list(tmp_path.glob("*/*.png"))
    assert all(r["device"] == "cpu" for r in lora + lora_da)
    merged = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora", "lora_da"], ranks=[2, 4], **base)
    bench.write_outputs(tmp_path / "merged", lora + lora_da, merged)
    summary = json.loads((tmp_path / "merged" / "results.json").read_text())["summary"]
    assert sorted((row["method"], row["rank"]) for row in summary) == [("lora", 2), ("lora", 4), ("lora_da", 4)]
    assert (tmp_path / "merged" / "metric_vs_rank.png").stat().st_size > 0
    assert "![init_overhead](init_overhead.png)" in (tmp_path / "merged" / "report.md").read_text()


def test_parse_variant_named_ablations_and_options():
    assert parse_variant("lora_da-bias-only").overrides == {"variance_weight": 0.0}
    identity = parse_variant("lora_da-identity-fisher")
    assert identity.method == "lora_da" and identity.overrides == {"fisher": "identity"}
    custom = parse_variant("lora_da@gamma=256,calibration=64,fisher=identity")
    assert custom.overrides == {"gamma": 256, "fisher": "identity"} and custom.calibration == 64
    assert parse_variant("LoRA-DA").method == "lora_da"
    with pytest.raises(ValueError, match="unknown"):
        parse_variant("lora_da@nonsense=1")
    with pytest.raises(ValueError, match="only lora_da/lora_gradient_ranks/lora_one"):
        parse_variant("pissa@gamma=4")
    with pytest.raises(ValueError, match="unknown init method"):
        parse_variant("nope")


def test_bench_config_validates():
    with pytest.raises(ValueError, match="duplicates"):
        BenchConfig(learning_rates=[1e-3, 1e-3])
    with pytest.raises(ValueError, match="sweep_seeds"):
        BenchConfig(seeds=[0, 1], sweep_seeds=3)


def _grid_module():
    """benchmarks/grid.py (a script, not part of the package), loaded by path."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "grid.py"
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # its own imports: _harness, as when run as a script
    spec = importlib.util.spec_from_file_location("grid", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["grid"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_grid_subset_narrows_lrs_and_seeds_but_keeps_the_sweep_seed():
    grid = _grid_module()
    full = grid.bench_config("arith", ["lora"], [8])
    assert full.learning_rates == grid.PROTOCOL["learning_rates"] and full.seeds == [0, 1, 2]
    screen = grid.bench_config("arith", ["lora"], [8], learning_rates=[1e-3], seeds=[0])
    assert screen.learning_rates == [1e-3] and screen.seeds == [0]
    assert grid.bench_config("arith", ["lora"], [8], learning_rates=None).learning_rates == full.learning_rates
    with pytest.raises(ValueError, match="not in the grid"):
        grid.bench_config("arith", ["lora"], [8], learning_rates=[5e-4])
    with pytest.raises(ValueError, match="sweep seeds"):  # seed 1 alone would sweep every lr on seed 1
        grid.bench_config("arith", ["lora"], [8], seeds=[1, 2])


def test_grid_keeps_stdlib_code_of_each_python_version_in_its_own_folder():
    grid = _grid_module()
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    shard = grid.Shard("stdlib-code", "lora_da@gamma=64", (2, 32))
    assert shard.folder == f"stdlib-code-{version}/lora_da_gamma_64-r2-32"
    assert grid.Shard("arith", "lora", (8,)).folder == "arith/lora-r8"  # arith is the same data everywhere


def test_grid_reports_list_only_the_invocations_that_could_have_run_their_shards():
    grid = _grid_module()
    versions = dict(torch="2", transformers="5", peft="0.21", device="cpu")
    env = [
        dict(python="3.12.3", command="grid.py run --out g --deadline-s 470, resumed with --deadline-s 9", **versions),
        dict(python="3.11.7", command="grid.py run --out g --lrs 0.001 --only arith/lora-r8 arith/eva-r8", **versions),
        dict(python="3.11.7", command="grid.py run --out g --only stdlib-code/pissa-r8 --seeds 0", **versions),
        dict(python="3.11.7", command="grid.py run --out g --only stdlib-code-py3.11/lora-r2-32", **versions),
    ]

    def commands(task_dir, shard_names):
        return [e["command"] for e in grid.invocations_of(env, task_dir, shard_names)]

    assert commands("arith", ["lora-r8"]) == [env[0]["command"], env[1]["command"]]
    assert commands("arith", ["pissa-r8"]) == [env[0]["command"]]  # the whole grid, not the arith/eva screen
    assert commands("stdlib-code-py3.11", ["pissa-r8", "lora-r8"]) == [env[2]["command"]]  # 3.12 ran other data
    assert commands("stdlib-code-py3.12", ["lora-r2-32"]) == [env[0]["command"]]
    assert commands("stdlib-code-py3.11", ["lora-r2-32"]) == [env[3]["command"]]


def test_the_sweep_continues_one_step_past_an_end_only_when_the_best_rate_is_there():
    grid_like = BenchConfig(learning_rates=[1e-4, 3e-4, 1e-3, 3e-3], extend_edges=True)
    assert grid_like.rate_beyond(3e-3) == pytest.approx(1e-2) and grid_like.rate_beyond(1e-4) == pytest.approx(3e-5)
    assert grid_like.rate_beyond(3e-4) is None and grid_like.rate_beyond(1e-3) is None
    assert BenchConfig(learning_rates=[1e-3, 2e-3], extend_edges=True).rate_beyond(2e-3) == pytest.approx(4e-3)
    assert BenchConfig(learning_rates=[1e-4, 3e-3]).rate_beyond(3e-3) is None  # off by default


def test_best_rate_at_an_end_gets_a_run_beyond_it_that_competes(tmp_path, tiny_model_dir, sums_jsonl):
    rates = [1e-2, 3e-2]
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora"], learning_rates=rates, extend_edges=True,
                         num_accuracy=0, steps=3)
    records = run_bench(tmp_path, config, show_progress=False, plots=False)
    by_lr = {r["lr"]: r["val_loss"] for r in records}
    best_of_grid = min(rates, key=by_lr.get)  # with two rates the best is always at an end
    beyond = config.rate_beyond(best_of_grid)
    assert sorted(by_lr) == sorted(rates + [beyond])
    choice = select_learning_rate(records, "lora", 4, config)
    assert choice["lr"] == min(by_lr, key=by_lr.get) and f"{beyond:g}" in choice["by_lr"]
    assert f"lr {beyond:g}" in (tmp_path / "report.md").read_text()


def test_runs_of_one_init_at_other_rates_reuse_it_and_match_a_fresh_init(tmp_path, tiny_model_dir, sums_jsonl):
    """The lr sweep initializes once per (variant, rank, seed); reusing it changes no number."""
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora_da"], learning_rates=[LOW_LR, HIGH_LR],
                         num_accuracy=0, steps=3)
    swept = run_bench(tmp_path / "sweep", config, show_progress=False, plots=False)
    assert [r.get("init_reused", False) for r in swept] == [False, True]
    alone = run_bench(tmp_path / "alone", tiny_config(tiny_model_dir, sums_jsonl, methods=["lora_da"],
                                                      learning_rates=[HIGH_LR], num_accuracy=0, steps=3),
                      show_progress=False, plots=False)
    assert "init_reused" not in alone[0]
    for metric in ("val_loss", "test_loss", "train_curve"):
        assert swept[1][metric] == alone[0][metric]


def test_bench_command_passes_extend_edges(tmp_path, monkeypatch):
    seen = {}

    def fake_run_bench(output, config, retry_failed=False, statistics_cache=None):
        seen.update(config=config, statistics_cache=statistics_cache)
        return [{"key": "lora|r8|lr0.001|s0", "status": "ok", "error": None}]

    monkeypatch.setattr(commands, "run_bench", fake_run_bench)
    assert main(["bench", "--output", str(tmp_path), "--lrs", "1e-3,3e-3", "--extend-edges"]) == 0
    assert seen["config"].extend_edges and seen["config"].rate_beyond(3e-3) == pytest.approx(1e-2)
    assert seen["statistics_cache"] is None
    assert main(["bench", "--output", str(tmp_path), "--statistics-cache", str(tmp_path / "stats")]) == 0
    assert seen["statistics_cache"] == str(tmp_path / "stats")


def test_variants_and_seeds_share_cached_statistics(tmp_path, tiny_model_dir, sums_jsonl):
    """With a statistics cache, data-aware variants of one seed gather the calibration statistics once."""
    methods = ["lora_da", "lora_da@factor_balance=kaiming", "lora_one"]
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=methods, seeds=[0, 1], sweep_seeds=1,
                         learning_rates=[HIGH_LR], num_accuracy=0, steps=2)
    records = run_bench(tmp_path / "out", config, show_progress=False, plots=False,
                        statistics_cache=tmp_path / "stats")
    assert all(r["status"] == "ok" for r in records)
    reused = {(r["method"], r["seed"]): r.get("statistics_reused", False) for r in records}
    first = {("lora_da", 0): False, ("lora_da", 1): False}
    assert reused == {**first, **{(method, seed): True for method in methods[1:] for seed in (0, 1)}}
    assert len(list((tmp_path / "stats").glob("statistics-*.safetensors"))) == 2


def test_grid_merge_sweeps_every_rate_that_some_call_ran(tmp_path, tiny_model_dir, sums_jsonl):
    """A shard run with `--lrs 1e-3` and later `--lrs 3e-3` keeps only the last subset in its config; the merged
    report still sweeps both rates and picks the better."""
    import argparse

    grid = _grid_module()
    shard = tmp_path / "raw" / "arith" / "lora-r4"
    records = []
    for lr in (1e-3, 3e-3):
        config = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora"], learning_rates=[lr], num_accuracy=0,
                             steps=2)
        records = run_bench(shard, config, show_progress=False, plots=False)
    assert json.loads((shard / "results.json").read_text())["config"]["learning_rates"] == [3e-3]
    written = grid.merge(argparse.Namespace(raw=str(tmp_path / "raw"), dest=str(tmp_path / "merged")))
    assert [path.name for path in written] == ["arith-standard"]  # <task>-<set>; the other studies have no own run
    merged = json.loads((tmp_path / "merged" / "arith-standard" / "results.json").read_text())
    (row,) = merged["summary"]
    best = min(records, key=lambda r: r["val_loss"])
    assert sorted(float(lr) for lr in row["lr_sweep"]) == [1e-3, 3e-3] and row["best_lr"] == best["lr"]
    lines = (tmp_path / "merged" / "arith-standard" / "report.md").read_text().splitlines()
    assert lines[0].startswith("# ") and lines[2].startswith("Hardware: ")  # no invocation recorded: "not recorded"


def test_grid_merged_folders_are_named_task_and_set():
    grid = _grid_module()
    assert list(grid.STUDIES) == ["standard", "lora-da-options", "ranks"]
    assert grid.set_name() == "standard" and grid.set_name(study="lora-da-options") == "lora-da-options"
    assert grid.set_name("lora_fa") == "lora-fa" and grid.set_name("lora_plus") == "lora-plus"
    assert grid.set_name(budget="short") == "short" and grid.set_name("lora_fa", "short") == "lora-fa-short"
    assert grid.RUNS == grid.GRID / "runs" and grid.GRID.parts[-3:] == ("benchmarks", "results", "grid")


def test_grid_report_names_hardware_versions_and_commits_of_its_invocations():
    grid = _grid_module()
    cpu = dict(python="3.11.7", torch="2.13", transformers="5.24", peft="0.21", device="cpu", hardware="CPU, 2 cores")
    gpu = dict(python="3.12.3", torch="2.11", transformers="5.24", peft="0.21", device="cuda", gpu="NVIDIA H200")
    line = grid.provenance_line([dict(gpu, committed_at="aaa1111"), dict(cpu, committed_at="bbb2222"),
                                 dict(cpu, commit="ccc3333")])
    assert line.startswith("Hardware: NVIDIA H200; CPU, 2 cores. Software: Python 3.12.3, torch 2.11")
    assert "(NVIDIA H200); Python 3.11.7" in line
    assert line.endswith("Commit: ccc3333; otherwise not recorded (run records committed at aaa1111 to bbb2222).")
    assert grid.provenance_line([dict(cpu, commit="ccc3333")]).endswith("Commit: ccc3333.")
    records = [{"device": "cpu"}, {"device": "cpu"}]
    assert grid.on_devices([gpu, cpu], records) == [cpu]  # the H200 invocation ran none of these records
    assert grid.on_devices([gpu, cpu], [{"device": "cuda (NVIDIA H200)"}]) == [gpu]
    assert grid.with_line("# T\n\nHardware: old\n\nbody\n", "Hardware: new") == "# T\n\nHardware: new\n\nbody\n"


def _harness_module():
    """benchmarks/_harness.py, loaded by path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_harness.py"
    spec = importlib.util.spec_from_file_location("_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_results_name_hardware_versions_and_commit_without_machine_paths(tmp_path):
    harness = _harness_module()
    root = str(harness.ROOT)
    results = {"command": harness.command_line(["--released", "/somewhere/else/lora_da.py", "--out",
                                                 f"{root}/benchmarks/results/x"]),
               "file": f"{root}/src/lora_da/solver.py", "site": f"{sys.prefix}/lib/x.py"}
    harness.write_results(tmp_path / "bench", results, f"# Title\n\nran on {root}/src/lora_da/solver.py\n")
    payload = json.loads((tmp_path / "bench" / "results.json").read_text())
    record = payload["provenance"]
    assert list(payload)[0] == "provenance" and record["python"] and record["torch"] and record["hardware"]
    assert payload["command"] == "--released PATH/lora_da.py --out benchmarks/results/x"
    assert payload["file"] == "src/lora_da/solver.py" and payload["site"] == "lib/x.py"
    report = (tmp_path / "bench" / "report.md").read_text()
    assert report.splitlines()[:3] == ["# Title", "", harness.provenance_line(record)]
    assert root not in report and "ran on src/lora_da/solver.py" in report
    line = harness.provenance_line({"hardware": "NVIDIA H200", "torch": "2.11", "committed_at": "abc1234"})
    assert line == ("Hardware: NVIDIA H200. Software: torch 2.11; Python, transformers, peft not recorded. "
                    "Commit: not recorded; committed at abc1234.")


def test_every_committed_benchmark_report_names_hardware_versions_and_commit():
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    reports = sorted(results.glob("*/report.md")) + sorted(results.glob("grid/*/report.md"))
    assert len(reports) >= 20
    for report in reports:
        head = report.read_text().splitlines()[:5]
        assert any(line.startswith("Hardware: ") and " Software: " in line and " Commit: " in line
                   for line in head), report


def test_verdict_calls_a_gain_only_beyond_the_larger_std_over_every_seed():
    import importlib.util
    from pathlib import Path

    _grid_module()  # verdict.py imports it by name
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verdict.py"
    spec = importlib.util.spec_from_file_location("verdict", path)
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)

    def row(loss, std, seeds=3):
        return {"test_loss": loss, "test_loss_std": std, "seeds_ok": seeds}

    lora = row(0.050, 0.001)
    assert verdict.compare(row(0.0485, 0.0012), lora) == "better"
    assert verdict.compare(row(0.0495, 0.0004), lora) == "tie"
    assert verdict.compare(row(0.0515, 0.0002), lora) == "worse"
    assert verdict.compare(row(0.040, 0.0, seeds=1), lora) == "pending"
    assert verdict.compare(None, lora) == "pending"


def test_a_rate_past_the_sweep_equals_the_written_rate_and_old_unrounded_records_match_it(tmp_path, tiny_model_dir,
                                                                                           sums_jsonl):
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=["lora"], learning_rates=[1e-3, 3e-3],
                         extend_edges=True, num_accuracy=0, steps=2)
    assert config.rate_beyond(1e-3) == 3e-4 and config.rate_beyond(3e-3) == 1e-2  # 3e-3 / 10 is 0.00030000000000000003
    screen = dataclasses.replace(config, learning_rates=[1e-3], extend_edges=False)
    run_bench(tmp_path, screen, show_progress=False, plots=False)
    path = tmp_path / "results.json"
    payload = json.loads(path.read_text())
    (record,) = payload["records"]
    record.update(lr=3e-3 / 10, key=runner.cell_key("lora", 4, 3e-4, 0))  # as older versions stored a rate past a sweep
    path.write_text(json.dumps(payload))
    resumed = run_bench(tmp_path, dataclasses.replace(screen, learning_rates=[3e-4]), show_progress=False, plots=False)
    assert [r["lr"] for r in resumed] == [3e-4]  # found, not run again
    choice = select_learning_rate(resumed, "lora", 4, dataclasses.replace(screen, learning_rates=[3e-4]))
    assert choice is not None and choice["lr"] == 3e-4


def test_rank_allocation_methods_run_in_the_bench(tmp_path, tiny_model_dir, sums_jsonl):
    """The grid's rank-allocation variants go through the whole bench: init, training (AdaLoRA's schedule),
    evaluation and the report."""
    methods = ["lora_da@rank_allocation=lora_da", "lora_gradient_ranks", "adalora"]
    config = tiny_config(tiny_model_dir, sums_jsonl, methods=methods, learning_rates=[HIGH_LR], num_accuracy=0)
    records = run_bench(tmp_path / "out", config, show_progress=False, plots=False)
    assert {r["method"]: r["status"] for r in records} == dict.fromkeys(methods, "ok")
