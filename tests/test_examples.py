"""Every script in `examples/` runs as a user runs it (a subprocess, `torchrun` for the distributed ones), on the
tiny model folder, and writes what it promises; a script without a test here fails `test_every_example_is_tested`."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ranks import free_port
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lora_da import LoraDAConfig, LoraDAStatistics, initialize_lora_da

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY_LAYERS = 14  # 2 decoder layers x 7 linear layers
# Two splits of the same data sum the statistics in another order; the tiny random model's nearly singular input
# factors amplify that float32 rounding well above 1e-5 in a few layers.
SPLIT_TOLERANCE = 1e-3


def run_example(script: str, *args, cwd: Path, ranks: int = 1) -> str:
    """Run `examples/<script>` with `args` (under torchrun with `ranks` > 1); its stdout, or a failure with its
    output."""
    command = [str(EXAMPLES / script), *map(str, args)]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port()),
                   *command]
    # One thread per process (two ranks share the CPUs), no GPU (two NCCL ranks cannot share one) and no hub.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, *command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a saved PEFT adapter folder, checked to be LoRA-DA's (every B nonzero: PEFT's own
    init leaves B at zero)."""
    assert (folder / "adapter_config.json").is_file()
    tensors = load_file(folder / "adapter_model.safetensors")
    assert len(tensors) == 2 * TINY_LAYERS
    assert all(torch.count_nonzero(v) > 0 for k, v in tensors.items() if "lora_B" in k)
    return tensors


def assert_close(tensors: dict, reference: dict) -> None:
    assert tensors.keys() == reference.keys()
    for key, value in reference.items():
        error = float((tensors[key].double() - value.double()).norm() / value.double().norm())
        assert error <= SPLIT_TOLERANCE, (key, error)


def test_every_example_is_tested():
    scripts = sorted(path.stem for path in EXAMPLES.glob("*.py"))
    assert scripts, EXAMPLES
    untested = [name for name in scripts if not callable(globals().get(f"test_{name}"))]
    assert not untested, f"examples without a test_<name> in {Path(__file__).name}: {untested}"
    for name in scripts:  # each says how to run it, and defaults to a real model
        text = (EXAMPLES / f"{name}.py").read_text()
        assert f"examples/{name}.py" in (ast.get_docstring(ast.parse(text)) or ""), name
        assert f'"--model", default="{HUB_MODEL}"' in text, name


def test_quickstart(tiny_model_dir, tmp_path):
    out = tmp_path / "adapter"
    stdout = run_example("quickstart.py", "--model", tiny_model_dir, "--output-dir", out, cwd=tmp_path)
    assert f"initialized {TINY_LAYERS} layers from 8 examples" in stdout
    assert f"{2 * TINY_LAYERS} LoRA tensors equal" in stdout
    saved = adapter(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["use_rslora"]
    # Stock PEFT in this process too: the loaded model holds exactly the saved factors.
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())


@pytest.mark.parametrize("trainer", ["transformers", "trl"])
def test_trainer_callback(tiny_model_dir, tmp_path, trainer):
    flags = []
    if trainer == "trl":
        pytest.importorskip("trl")
        flags = ["--trl"]
    out = tmp_path / "run"
    stdout = run_example("trainer_callback.py", "--model", tiny_model_dir, "--output-dir", out, "--examples", 16,
                         "--num-samples", 8, "--steps", 2, "--batch-size", 4, *flags, cwd=tmp_path)
    assert "mean training loss over 2 steps" in stdout
    report = json.loads((out / "lora_da_report.json").read_text())
    assert report["num_examples"] == 8 and len(report["layers"]) == TINY_LAYERS
    assert report["config"]["population_size"] == 16  # len(train_dataset)
    adapter(out)


def test_statistics_once(tiny_model_dir, tmp_path):
    out = tmp_path / "ranks"
    stdout = run_example("statistics_once.py", "--model", tiny_model_dir, "--output-dir", out, "--examples", 8,
                         "--population-size", 100, cwd=tmp_path)
    stats = LoraDAStatistics.load(out / "statistics.safetensors")
    assert stats.num_examples == 8 and len(stats.layer_names) == TINY_LAYERS
    for rank in (4, 8, 16):
        assert f"rank {rank}: {TINY_LAYERS} layers solved" in stdout
        tensors = adapter(out / f"rank-{rank}")
        assert json.loads((out / f"rank-{rank}" / "adapter_config.json").read_text())["r"] == rank
        assert all(v.shape[0] == rank for k, v in tensors.items() if "lora_A" in k)
    # The rank-8 adapter is the solve of the saved statistics: solving the file here gives the same factors.
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"))
    initialize_lora_da(model, [], LoraDAConfig(population_size=100, show_progress=False),
                       statistics=out / "statistics.safetensors")
    solved, saved = get_peft_model_state_dict(model), load_file(out / "rank-8" / "adapter_model.safetensors")
    assert solved.keys() == saved.keys()
    assert all(torch.equal(solved[k], v) for k, v in saved.items())


@pytest.fixture(scope="module")
def one_process_adapter(tiny_model_dir, tmp_path_factory):
    """`data_parallel.py` run as one plain process: the reference for the two-rank runs."""
    out = tmp_path_factory.mktemp("one-process")
    stdout = run_example("data_parallel.py", "--model", tiny_model_dir, "--output-dir", out / "adapter",
                         "--examples", 8, cwd=out)
    assert "on 1 rank(s)" in stdout
    return adapter(out / "adapter")


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The checksum `data_parallel.py` prints, of a saved adapter's tensors."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_data_parallel(tiny_model_dir, tmp_path, one_process_adapter):
    out = tmp_path / "adapter"
    stdout = run_example("data_parallel.py", "--model", tiny_model_dir, "--output-dir", out, "--examples", 8,
                         cwd=tmp_path, ranks=2)
    assert f"on 2 rank(s): {TINY_LAYERS} layers from 8 examples" in stdout
    match = re.search(r"LoRA checksums per rank: (\w+) (\w+); ranks agree: True", stdout)
    assert match, stdout
    saved = adapter(out)
    assert match[1] == match[2] == checksum(saved)  # both ranks hold exactly what rank 0 saved
    assert_close(saved, one_process_adapter)


def test_fsdp2(tiny_model_dir, tmp_path, one_process_adapter):
    out = tmp_path / "adapter"
    stdout = run_example("fsdp2.py", "--model", tiny_model_dir, "--output-dir", out, "--examples", 8,
                         cwd=tmp_path, ranks=2)
    assert f"on 2 ranks, 2 FSDP2 decoder layers: {TINY_LAYERS} LoRA layers from 8 examples" in stdout
    assert_close(adapter(out), one_process_adapter)
