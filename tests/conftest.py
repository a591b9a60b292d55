"""Shared fixtures: tiny random-weight models built from configs (no network), and an isolated
LORA_APP_HOME so tests never touch the user's cache (the converted default model is shared across
the session through a cache folder inside the pytest temp root)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(kind: str, seed: int = 0):
    """A random-weight causal LM of family ``kind`` (llama, qwen2, gpt2), fp32, eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    else:
        raise ValueError(kind)
    return model.eval()


def adapter_grads(model, ids, *, fused: bool, checkpointing: bool = False, grouped: bool | None = False,
                  dropout: float = 0.1):
    """``model``'s adapter gradients, ``fuse``d (or not) before its adapter (LoRA rank 4, ``dropout``,
    every linear layer, random B) is attached, its siblings on one input grouped (or not: ``grouped``
    False; True moves their base weights side by side, None as the device decides), with or without
    gradient checkpointing; fixed seeds, so that two calls differ only in those choices.
    Returns (gradients by name, what fuse swapped)."""
    from lora_app.lora import LoraConfig, adapter_modules, add_adapter, group_shared_inputs
    from lora_app.training.fused import fuse

    swapped = fuse(model) if fused else None
    torch.manual_seed(0)
    add_adapter(model, LoraConfig(rank=4, alpha=8, dropout=dropout, targets="all-linear"), "a")
    torch.manual_seed(1)
    for adapter in adapter_modules(model, "a").values():
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.1)  # B = 0 would give A no gradient
    if grouped is not False:
        group_shared_inputs(model, move=grouped)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(3)
    model.train()(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, swapped


def adapter_grads_plain_and_fused(build, ids):
    """The adapter gradients of two models from ``build()``, the second one ``fuse``d (``adapter_grads``)."""
    plain, _ = adapter_grads(build(), ids, fused=False)
    fused, swapped = adapter_grads(build(), ids, fused=True)
    return plain, fused, swapped


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A character-level fast tokenizer with < 128 ids (fits the tiny models) and a ChatML template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>",
                                        bos_token="<|im_start|>", unk_token="<unk>")
    tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny(kind: str, folder, seed: int = 0):
    """A tiny model plus tokenizer saved as a normal Hugging Face folder, like a user's local model."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(kind, seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny llama folder, once per test module."""
    return str(save_tiny("llama", tmp_path_factory.mktemp("model") / "tiny-llama"))


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def model_kind(request):
    return request.param


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def app_home(tmp_path_factory):
    home = os.environ.get("LORA_APP_TEST_HOME") or str(tmp_path_factory.mktemp("lora_app_home"))
    os.environ["LORA_APP_HOME"] = home
    return home
