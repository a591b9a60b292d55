"""A merged model as one GGUF file: the format llama.cpp, Ollama and LM Studio run; with an Ollama
Modelfile beside it and the template check (``template_check.py``) of both.

The tensors are the merged model's (``merged_state_dict``: adapters folded in, any 4/8-bit base
dequantized) under llama.cpp's names (``gguf.get_tensor_name_map``), in the chosen type. Llama-family
attention weights are permuted as llama.cpp's own converter does, since its rotary embedding pairs
dimensions differently from transformers'. The metadata carries the architecture, the whole BPE
tokenizer (tokens, types, merges, special ids) and the chat template the run trained with, so the
file runs with no other file beside it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from lora_app.data import PromptFormat, SystemPrompt
from lora_app.errors import InferenceError
from lora_app.inference.export import refuse_existing
from lora_app.inference.ollama import modelfile_for, write_modelfile
from lora_app.inference.template_check import FALLBACK_CONVERSATIONS, TemplateCheck, check
from lora_app.lora import LoraAdapter, LoraFAAdapter, adapter_modules, merged_state_dict
from lora_app.paths import atomic_file

Quant, FileType = gguf.GGMLQuantizationType, gguf.LlamaFileType
# the types a user may ask for, by llama.cpp's names: how each weight matrix is stored, the file type
# recorded, and the bytes a weight takes (blocks of 32 weights with their scales)
GGUF_TYPES = {
    "f16": (Quant.F16, FileType.MOSTLY_F16, 2.0),
    "bf16": (Quant.BF16, FileType.MOSTLY_BF16, 2.0),
    "q8_0": (Quant.Q8_0, FileType.MOSTLY_Q8_0, 34 / 32),
    "q5_1": (Quant.Q5_1, FileType.MOSTLY_Q5_1, 24 / 32),
    "q5_0": (Quant.Q5_0, FileType.MOSTLY_Q5_0, 22 / 32),
    "q4_1": (Quant.Q4_1, FileType.MOSTLY_Q4_1, 20 / 32),
    "q4_0": (Quant.Q4_0, FileType.MOSTLY_Q4_0, 18 / 32),
    "f32": (Quant.F32, FileType.ALL_F32, 4.0),
}
# transformers model type -> (llama.cpp architecture, whether q/k need llama.cpp's rotary permutation)
ARCHITECTURES = {"llama": (gguf.MODEL_ARCH.LLAMA, True), "mistral": (gguf.MODEL_ARCH.LLAMA, True),
                 "qwen2": (gguf.MODEL_ARCH.QWEN2, False)}
# llama.cpp picks its pre-tokenizer by name; the embedded default's is "smollm"
_PRE_TOKENIZERS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm"}


def write_gguf(model, tokenizer, target: str | os.PathLike, *, gguf_type: str = "f16", chat_template: str | None = None,
               name: str = "model", overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``model`` (its active adapters merged) and ``tokenizer`` as one GGUF file at ``target``.

    ``chat_template``: the template the run trained with (default: the tokenizer's). ``progress(done,
    total)`` is called per tensor. Written to a temporary file and renamed, so ``target`` is whole or
    absent; refused before writing when the disk has no room for it."""
    target = Path(target).expanduser()
    if gguf_type not in GGUF_TYPES:
        raise InferenceError(f"unknown GGUF type {gguf_type!r}; choose one of {', '.join(GGUF_TYPES)}.")
    refuse_existing(target, overwrite)
    config, arch = _architecture(model)
    state = merged_state_dict(model)
    _check_room(target, state, gguf_type)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def fill(writer) -> None:
        _add_model_metadata(writer, config, name, gguf_type)
        _add_tokenizer(writer, tokenizer, model, chat_template)
        for done, (hf_name, tensor) in enumerate(state.items(), 1):
            new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                raise InferenceError(f"GGUF export does not know where {hf_name} goes in a {config.model_type} file.")
            _add_tensor(writer, new_name, _rotary_order(new_name, tensor.detach().float().numpy(), config), gguf_type)
            if progress:
                progress(done, len(state))

    return _write(target, arch, fill)


def write_adapter_gguf(model, adapter: str, target: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Adapter ``adapter`` alone in llama.cpp's LoRA GGUF layout, for ``llama-server --lora`` beside the
    base model's GGUF: ``<weight>.lora_a`` (rank x in) and ``<weight>.lora_b`` (out x rank) per adapted
    weight, and ``adapter.lora.alpha`` set so that llama.cpp's alpha / rank is this adapter's scaling.
    Only plain low-rank updates translate (lora, rslora, lora-fa): DoRA, VeRA and Delta-LoRA do not."""
    target = Path(target).expanduser()
    refuse_existing(target, overwrite)
    config, arch = _architecture(model)
    modules = adapter_modules(model, adapter)
    plain = {path: m for path, m in modules.items() if type(m) in (LoraAdapter, LoraFAAdapter)}
    if not modules or len(plain) != len(modules):
        raise InferenceError(f"adapter {adapter!r} is not a plain LoRA (lora, rslora, lora-fa): llama.cpp's adapter "
                             "format cannot hold it; export the merged model instead.")
    first = next(iter(plain.values()))
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)

    def fill(writer) -> None:
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, first.scaling * first.config.rank)
        for path, module in plain.items():
            weight = names.get_name(f"{path}.weight", try_suffixes=(".weight",))
            writer.add_tensor(f"{weight}.lora_a", module.lora_A.weight.detach().float().numpy())
            # B's rows are the weight's rows, so they take the weight's rotary order
            writer.add_tensor(f"{weight}.lora_b", _rotary_order(weight, module.lora_B.weight.detach().float().numpy(),
                                                                config))

    return _write(target, arch, fill)


def _architecture(model):
    """(the text config, llama.cpp's architecture) of a model GGUF export supports."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if config.model_type not in ARCHITECTURES:
        raise InferenceError(f"GGUF export supports {', '.join(ARCHITECTURES)} models, not {config.model_type}.")
    return config, ARCHITECTURES[config.model_type][0]


def _write(target: Path, arch, fill: Callable) -> Path:
    """A GGUF file at ``target`` holding what ``fill(writer)`` adds, written whole or not at all."""
    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        return atomic_file(target, write)
    except OSError as err:
        raise InferenceError(f"could not write {target}: {err}") from err


def _rotary_order(name: str, rows: np.ndarray, config) -> np.ndarray:
    """Rows of a Llama-family q/k projection in llama.cpp's rotary order; anything else as it is."""
    if not ARCHITECTURES[config.model_type][1] or not name.endswith(("attn_q.weight", "attn_k.weight")):
        return rows
    heads = config.num_attention_heads
    return _permute(rows, heads, config.num_key_value_heads if name.endswith("attn_k.weight") else heads)


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: rotary pairs from transformers' halves to interleaved."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_tensor(writer, name: str, data: np.ndarray, gguf_type: str) -> None:
    """Matrices in the chosen type; vectors (norms, biases) stay f32, as llama.cpp keeps them; a
    matrix whose rows do not split into blocks of 32 falls back to f16."""
    qtype = GGUF_TYPES[gguf_type][0] if data.ndim > 1 else Quant.F32
    if qtype == Quant.F32:
        writer.add_tensor(name, data.astype(np.float32))
        return
    try:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    except gguf.QuantError:
        writer.add_tensor(name, data.astype(np.float16))


def _add_model_metadata(writer, config, name: str, gguf_type: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(GGUF_TYPES[gguf_type][1])


def _add_tokenizer(writer, tokenizer, model, chat_template: str | None) -> None:
    """A byte-level BPE tokenizer ("gpt2" in llama.cpp's terms), read from its tokenizer.json."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise InferenceError(f"GGUF export handles BPE tokenizers, not {spec['model']['type']}.")
    vocab_size = model.config.vocab_size
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added.get(token) else
                         gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZERS.get(getattr(model, "name_or_path", ""), "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


def _check_room(target: Path, state: dict, gguf_type: str) -> None:
    """Refuse before writing when the target's disk cannot hold the file (and a margin)."""
    needed = sum(t.numel() for t in state.values()) * GGUF_TYPES[gguf_type][2] * 1.05 + 64 * 2**20
    folder = target.parent if target.parent.exists() else Path.cwd()
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise InferenceError(f"the GGUF file needs about {needed / 2**30:.1f} GiB but {folder} has "
                             f"{free / 2**30:.1f} GiB free; free some space or write it elsewhere.")


@dataclass
class GgufExport:
    """What an export wrote and what the template check found."""

    gguf: Path
    modelfile: Path | None
    checks: list[TemplateCheck]
    notes: list[str] = field(default_factory=list)

    def ollama_command(self, name: str) -> str | None:
        return f"cd {self.gguf.parent} && ollama create {name} -f {self.modelfile.name}" if self.modelfile else None

    @property
    def identical(self) -> bool:
        return all(check.identical for check in self.checks)


def export_gguf(model, tokenizer, target: str | os.PathLike, prompt_format: PromptFormat | None, *,
                gguf_type: str = "f16", conversations=FALLBACK_CONVERSATIONS, name: str = "model",
                overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> GgufExport:
    """The GGUF file (the run's template with its system prompt choice built in), an Ollama Modelfile
    beside it where the template translates, and the template check of both against training."""
    trained = prompt_format or PromptFormat("tokenizer", tokenizer.chat_template or "", SystemPrompt())
    template = trained.standalone_template(tokenizer) if trained.chat_template else None
    path = write_gguf(model, tokenizer, target, gguf_type=gguf_type, chat_template=template, name=name,
                      overwrite=overwrite, progress=progress)
    result = GgufExport(path, None, [])
    if not trained.chat_template:
        result.notes.append("no chat template: the model was trained on raw text, so there is nothing to check")
        return result
    written = gguf.GGUFReader(path).fields["tokenizer.chat_template"].contents()
    result.checks.append(check("GGUF chat template", lambda messages: tokenizer.apply_chat_template(
        messages, chat_template=written, tokenize=False, add_generation_prompt=True), trained, tokenizer,
        conversations))
    modelfile, why = modelfile_for(trained, tokenizer)
    if modelfile is None:
        result.notes.append(why)
        return result
    result.modelfile = write_modelfile(modelfile, path)
    result.checks.append(check("Ollama Modelfile", modelfile.prompt, trained, tokenizer, conversations))
    return result
