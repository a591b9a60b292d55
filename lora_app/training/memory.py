"""Memory: an estimate before the run, and what the process holds while it runs.

The estimate adds up, for the chosen settings:

    weights      parameters x bytes per parameter (4 fp32, 2 bf16/fp16, ~1.03 int8, ~0.62 NF4 in training)
    loading      a quantized base on a CPU: the full-precision copy it was quantized from
    adapter      trainable parameters x 4 bytes, their gradients (x 4) and AdamW's two moments (x 8)
    activations  what autograd keeps per token and layer (about 5 hidden-size and 2 intermediate-size
                 vectors; about four hidden-size vectors with gradient checkpointing),
                 plus one layer's backward, x batch x sequence length, plus one chunk of fp32 logits for the loss;
                 as many times over as lanes train micro-batches at once (training/lanes.py)
    runtime      the framework itself (a measured constant)

It is a planning figure, stored next to the measured peak so both can be compared in the UI.
"""

from __future__ import annotations

import functools
import json
import resource

import psutil
import torch

from lora_app.errors import TargetError
from lora_app.hardware import Precision
from lora_app.lora import LoraConfig, add_adapter, count_parameters
from lora_app.models import load_config, meta_model
from lora_app.training.lanes import lane_count, lane_share
from lora_app.training.loss import chunk_rows, workspace_row_bytes

# 4-bit: NF4 with double quantization keeps ~0.53 bytes a weight, and training adds the per-block
# scales dequantized once (training/fused.py: 4 bytes per 64 weights)
BYTES_PER_WEIGHT = {"none": None, "8bit": 1.03, "4bit": 0.62}
RUNTIME_BYTES = {"cpu": 450 * 2**20, "cuda": 600 * 2**20}
# On a CPU, activations dominate memory and smaller micro-batches cost no speed: the trainer caps them
# at this many (padded) tokens by default. On a GPU the batch size alone decides. Measured on a 2-core
# AVX2 EPYC, default model, batch 4, seq-len 256, 12 steps: a cap of 2048 / 512 / 256 tokens gave
# 3.2 / 2.5 / 1.8 GiB peak RSS at the same speed (83-95 useful tokens/s, within noise).
CPU_BATCH_TOKENS = 512
# A CPU process's peak RSS also holds what the backward pass freed and glibc's allocator kept for reuse:
# measured 1.3-1.7x the activations' own bytes (bench/bench_plan.py: default model, seq-len 256 LoRA and
# QLoRA, packed to 1024). A GPU's peak is the CUDA allocator's count of live tensors. Not worth undoing:
# glibc serving every block over 128 KB from mmap (MALLOC_MMAP_THRESHOLD_=131072) brought the bench_train
# run from 2.25 to 1.55 GiB but from 109 to 59 useful tokens/s (page faults), and malloc_trim after each
# backward pass cost 20 % of the speed for 14 % of the memory.
CPU_HELD_FACTOR = 1.5


def token_budget(config, device: str) -> int:
    """Padded tokens per micro-batch (0: no cap): the setting, else the CPU default or no cap on a GPU."""
    if config.max_batch_tokens is not None:
        return config.max_batch_tokens
    return CPU_BATCH_TOKENS if device == "cpu" else 0


@functools.lru_cache(maxsize=16)
def parameter_counts(model: str, trust_remote_code: bool, lora: str) -> tuple[int, int]:
    """(trainable adapter parameters, base parameters) for the model named ``model`` with the adapter
    ``lora`` (a LoraConfig as JSON) attached: exact, from an empty-weight model built on the meta
    device. Cached per (model, adapter settings): optimizer settings never rebuild it."""
    meta = meta_model(load_config(model, trust_remote_code))
    add_adapter(meta, LoraConfig(**json.loads(lora)), "estimate")
    trainable, total = count_parameters(meta)
    return trainable, total - trainable


def estimate_memory(config, model_config, device: str, precision: Precision, tokens: int | None = None,
                    lanes: int | None = None) -> dict:
    """Bytes by component for a run of ``config`` (a TrainConfig) on ``model_config``, on a
    ``device`` of type "cpu" or "cuda", in ``precision`` (see ``hardware.choose_precision``).
    ``tokens``: the padded tokens of the largest micro-batch once the data is known; before that,
    the worst case the settings allow. ``lanes``: micro-batches trained at once (by default as a
    single process would)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", 0)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 0)
    vocab = getattr(text, "vocab_size", 0)

    lora = config.lora_config()
    try:
        trainable, params = parameter_counts(config.model, config.trust_remote_code,
                                             json.dumps(lora.to_dict(), sort_keys=True))
    except TargetError:
        raise  # the user's targets are wrong: say so, don't estimate something else
    except Exception:  # an architecture that cannot be built on the meta device: the rank formula
        trainable = 2 * lora.rank * hidden * 7 * layers
        params = 12 * hidden * hidden * layers + vocab * hidden
    per_weight = BYTES_PER_WEIGHT[config.quantization] or (2 if precision.name == "bf16" else 4)
    act_bytes = 4 if precision.name == "fp32" else 2
    lanes = lanes or lane_count(device, precision, config.gradient_checkpointing, config.cpu_lanes)
    if tokens is None:  # as the trainer cuts micro-batches (see Recipe._setup_plan and batches.StepPlan)
        rows, budget = lane_share(config.batch_size, token_budget(config, device), lanes)
        tokens = rows * config.seq_len
        if budget:
            tokens = min(tokens, max(budget, config.seq_len))
    # What autograd keeps per token and layer, counted with saved-tensor hooks on Llama shapes (fused
    # norms and MLP, one node per LoRA layer, adapters rebuilding their inputs, see training/fused.py and
    # lora/functional.py): the two norms' inputs, q, k, v and the attention's output, gate and up. A
    # batch with padding or packed rows has an attention mask, and then transformers repeats k and v to
    # every head (6 hidden-size vectors in all) and torch's attention keeps a copy of the mask in the
    # activations' dtype in every layer (measured: default model, 964 packed tokens, bf16: 44 and 53
    # MiB). The backward pass of one layer holds a few more at once.
    kept = (6 * hidden + 2 * inter) * act_bytes
    one_layer = kept + (8 * hidden + 4 * inter) * act_bytes
    if config.gradient_checkpointing:  # measured: about four hidden-size vectors per layer stay alive
        per_token = 4 * hidden * act_bytes * layers + one_layer
    else:  # with a row of the mask a layer
        per_token = (kept + min(tokens, config.seq_len) * act_bytes) * layers + one_layer
    loss_rows = min(tokens, chunk_rows(vocab, torch.device(device), precision.dtype))
    activations = lanes * (tokens * per_token + loss_rows * workspace_row_bytes(vocab, precision.dtype))
    if device == "cpu":
        activations *= CPU_HELD_FACTOR
    # A quantized base is loaded in full precision first; on a CPU the freed copy stays with the process
    # (measured: QLoRA peak RSS 2.6 GiB against 1.8 GiB without it, default model, batch 4, seq-len 256)
    loading = params * (2 if precision.name == "bf16" else 4) if config.quantization != "none" and device == "cpu" else 0
    parts = dict(weights_bytes=int(params * per_weight), loading_bytes=int(loading), adapter_bytes=trainable * 4,
                 gradients_bytes=trainable * 4, optimizer_bytes=trainable * 8,
                 activations_bytes=int(activations), runtime_bytes=RUNTIME_BYTES[device])
    parts["total_bytes"] = sum(parts.values())
    parts["trainable_params"] = trainable
    parts["total_params"] = params
    parts["precision"], parts["precision_reason"] = precision.name, precision.reason
    return parts


def memory_now(device: torch.device | str = "cpu") -> dict:
    """Process RSS (now and peak) always; CUDA allocated / reserved / peak on a GPU."""
    values = dict(rss_bytes=psutil.Process().memory_info().rss,
                  peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if torch.device(device).type == "cuda":
        values.update(cuda_allocated_bytes=torch.cuda.memory_allocated(device),
                      cuda_reserved_bytes=torch.cuda.memory_reserved(device),
                      cuda_peak_bytes=torch.cuda.max_memory_allocated(device))
    return values
