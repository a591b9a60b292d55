"""Datasets, training side: templates, EOS, label masking, truncation, packing and batching."""

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from test_data_formats import write_jsonl
from lora_app.data import DataError, collate, prepare_dataset, preview_dataset
from lora_app.data.encode import IGNORE_INDEX
from lora_app.data.templates import ALPACA_SYSTEM

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]
ANSWERS = ["Hello!", "4"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])


def text_of(tokenizer, example):
    return tokenizer.decode(example["input_ids"])


def trained_runs(tokenizer, example):
    """The decoded runs of consecutive trained tokens."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token  # labels are not shifted: the model shifts them
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return [tokenizer.decode(r) for r in runs]


# --- templates -------------------------------------------------------------------------------


def test_tokenizer_chat_template_is_used_by_default(tok, chat_file):
    data = prepare_dataset(chat_file, tok)
    assert data.report.template == "tokenizer"
    expected = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text_of(tok, data.train[0]) == expected
    assert trained_runs(tok, data.train[0]) == [a + "<|im_end|>" for a in ANSWERS]


def test_named_chatml_template(tok, chat_file):
    tok = tiny_tokenizer()
    tok.chat_template = None
    data = prepare_dataset(chat_file, tok, template="chatml")
    assert data.report.template == "chatml" and data.report.notes == []
    assert text_of(tok, data.train[0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert trained_runs(tok, data.train[0]) == ["Hello!<|im_end|>", "4<|im_end|>"]


def test_named_alpaca_template_overrides_the_tokenizer_template(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Name a colour.", "input": "Sky", "output": "Blue."}])
    data = prepare_dataset(path, tok, template="alpaca")
    assert data.report.template == "alpaca"
    assert text_of(tok, data.train[0]) == (
        f"{ALPACA_SYSTEM}\n\n### Instruction:\nName a colour.\n\nSky\n\n### Response:\nBlue.<|im_end|>\n\n"
    )
    assert trained_runs(tok, data.train[0]) == ["Blue.<|im_end|>"]


def test_alpaca_template_with_a_system_prompt_and_tools(tok, tmp_path):
    row = {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Time?"},
                        {"role": "assistant", "content": "call:clock"}, {"role": "tool", "content": "12:00"},
                        {"role": "assistant", "content": "Noon."}]}
    data = prepare_dataset(write_jsonl(tmp_path / "t.jsonl", [row]), tok, template="alpaca")
    assert text_of(tok, data.train[0]) == (
        "Use tools.\n\n### Instruction:\nTime?\n\n### Response:\ncall:clock<|im_end|>\n\n"
        "### Input:\n12:00\n\n### Response:\nNoon.<|im_end|>\n\n"
    )
    assert trained_runs(tok, data.train[0]) == ["call:clock<|im_end|>", "Noon.<|im_end|>"]


def test_no_chat_template_falls_back_to_alpaca_and_says_so(chat_file):
    tok = tiny_tokenizer()
    tok.chat_template = None
    data = prepare_dataset(chat_file, tok)
    assert data.report.template == "alpaca"
    assert data.report.notes == ["The tokenizer has no chat template, so the alpaca template is used (another can be picked)."]
    with pytest.raises(DataError, match="The tokenizer has no chat template; pick one of: alpaca, chatml"):
        prepare_dataset(chat_file, tok, template="tokenizer")


def test_unknown_template_and_missing_eos(tok, chat_file):
    with pytest.raises(DataError, match="Unknown template 'llama9'; choose one of: auto, tokenizer, alpaca, chatml"):
        prepare_dataset(chat_file, tok, template="llama9")
    no_eos = tiny_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(DataError, match="The tokenizer has no EOS token, so a trained model could never stop"):
        prepare_dataset(chat_file, no_eos)


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "alpaca"])
def test_eos_ends_every_assistant_turn(template, tmp_path):
    """Whatever the template, each trained span is exactly an answer followed by the tokenizer's EOS."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"eos_token": "</s>"})  # not what ChatML writes: the pipeline must insert it
    data = prepare_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), tok, template=template)
    example = data.train[0]
    runs = trained_runs(tok, example)
    assert [run.removesuffix("</s>").removesuffix("<|im_end|>") for run in runs] == ANSWERS
    assert all(run.endswith("</s>") for run in runs)
    eos_positions = [i for i, t in enumerate(example["input_ids"]) if t == tok.eos_token_id]
    assert len(eos_positions) == len(ANSWERS)
    assert all(example["labels"][i] == tok.eos_token_id for i in eos_positions)


def test_named_template_adds_bos_for_a_tokenizer_that_adds_one(tmp_path):
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    tok.chat_template = None
    assert tok("a")["input_ids"] == [bos, tok.convert_tokens_to_ids("a")]
    chat = prepare_dataset(write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}]), tok, template="alpaca")
    text = prepare_dataset(write_jsonl(tmp_path / "t.jsonl", [{"text": "Plain."}]), tok)
    for data in (chat, text):
        ids = data.train[0]["input_ids"]
        assert ids[0] == bos and ids.count(bos) == 1 and data.train[0]["labels"][0] == IGNORE_INDEX


def test_chat_prompt_matches_training(tok, chat_file):
    """The prompt chat renders (the tokenizer's template) is exactly the untrained text before the last
    answer in training."""
    example = prepare_dataset(chat_file, tok).train[0]
    prompt = tok.apply_chat_template(CONVERSATION[:-1], add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert example["input_ids"][:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert example["labels"][n_prompt - 1] == IGNORE_INDEX and example["labels"][n_prompt] != IGNORE_INDEX
    assert tok.decode(example["input_ids"][n_prompt:]) == "4<|im_end|>\n"


# --- labels ----------------------------------------------------------------------------------


def test_labels_are_masked_except_assistant_turns(tok, chat_file):
    example = prepare_dataset(chat_file, tok).train[0]
    assert len(example["input_ids"]) == len(example["labels"])
    trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Hello!<|im_end|>4<|im_end|>"
    untrained = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX])
    assert "Be brief." in untrained and "2+2?" in untrained and "Hello!" not in untrained


def _weighted(key, weights, style="openai"):
    """CONVERSATION with ``key: weight`` on its assistant turns (None: no key), in OpenAI or ShareGPT style."""
    answers = iter(weights)
    turns = [{**m, key: next(answers)} if m["role"] == "assistant" else dict(m) for m in CONVERSATION]
    turns = [{k: v for k, v in t.items() if v is not None} for t in turns]
    if style == "openai":
        return {"messages": turns}
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[t.pop("role")], "value": t.pop("content"), **t} for t in turns]}


@pytest.mark.parametrize("row", [
    _weighted("weight", [0, 1]),
    _weighted("weight", [0, None]),
    _weighted("loss_weight", [0, 1.0], style="sharegpt"),
    _weighted("loss_weight", [0.0, None], style="sharegpt"),
])
def test_answers_with_loss_weight_0_are_context_not_trained(row, tok, tmp_path):
    data = prepare_dataset(write_jsonl(tmp_path / "w.jsonl", [row]), tok)
    example = data.train[0]
    assert text_of(tok, example) == tok.apply_chat_template(CONVERSATION, tokenize=False)  # the answer is still seen
    assert trained_runs(tok, example) == ["4<|im_end|>"]
    spans = preview_dataset(tmp_path / "w.jsonl", tok).examples[0]  # the preview marks only what is trained
    assert [text for text, trained in spans if trained] == ["4<|im_end|>"]


def test_loss_weight_with_a_system_column_and_a_trailing_weight_0_answer(tok, tmp_path):
    """The system prompt put first does not shift which turn is untrained; turns after the last
    trained answer teach nothing and are dropped."""
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!", "loss_weight": 1},
                             {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4", "loss_weight": 0}],
           "system": "Be brief."}
    example = prepare_dataset(write_jsonl(tmp_path / "s.jsonl", [row]), tok).train[0]
    assert text_of(tok, example) == tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert trained_runs(tok, example) == ["Hello!<|im_end|>"]


def test_rows_whose_weights_leave_nothing_to_train_or_are_not_0_or_1(tok, tmp_path):
    rows = [_weighted("weight", [1, 1]), _weighted("weight", [0, 0]), _weighted("loss_weight", [0.0, 0]),
            _weighted("weight", [0.5, 1]), _weighted("loss_weight", ["0", 1])]
    report = prepare_dataset(write_jsonl(tmp_path / "w.jsonl", rows), tok).report
    assert report.train_rows == 1
    assert report.skipped_lines() == [
        "2 rows: every assistant turn has loss weight 0 (first at line 2)",
        "1 row: a turn's 'weight' is not 0 or 1 (first at line 4)",
        "1 row: a turn's 'loss_weight' is not 0 or 1 (first at line 5)",
    ]


def test_train_on_prompt_trains_every_token(tok, chat_file):
    example = prepare_dataset(chat_file, tok, train_on_prompt=True).train[0]
    assert example["labels"] == example["input_ids"]


def test_raw_text_is_trained_whole_with_eos(tok, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Chapter one.\nIt was dark.\n\nChapter two.\n")
    data = prepare_dataset(path, tok)
    assert data.report.format == "text" and data.report.template == "none (raw text)"
    assert [text_of(tok, e) for e in data.train] == ["Chapter one.\nIt was dark.<|im_end|>", "Chapter two.<|im_end|>"]
    assert all(e["labels"] == e["input_ids"] for e in data.train)


# --- truncation ------------------------------------------------------------------------------


def test_truncation_is_counted_and_lengths_are_before_truncation(tok, tmp_path):
    rows = [{"prompt": "Hi", "completion": "x" * n} for n in (5, 60, 200)]
    data = prepare_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tok, seq_len=64)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x" * 5}],
                                   tokenize=False)
    short = len(tok(text, add_special_tokens=False)["input_ids"])
    assert data.lengths == [short, short + 55, short + 195]  # one token per character
    assert data.report.truncated == 2
    assert [len(e["input_ids"]) for e in data.train] == [short, 64, 64]
    assert data.train[2]["labels"][-1] != IGNORE_INDEX  # the cut answer is still trained on


def test_prompt_filling_max_length_is_skipped(tok, tmp_path):
    rows = [{"prompt": "p" * 100, "completion": "a"}, {"prompt": "short", "completion": "ok"}]
    data = prepare_dataset(write_jsonl(tmp_path / "p.jsonl", rows), tok, seq_len=50)
    assert data.report.train_rows == 1 and data.report.truncated == 0
    assert data.report.skipped_lines() == [
        "1 row: the prompt fills seq_len (50 tokens): nothing left to train on (first at line 1)"
    ]
    with pytest.raises(DataError, match="The maximum length must be at least 2 tokens, not 1"):
        prepare_dataset(tmp_path / "p.jsonl", tok, seq_len=1)


# --- packing ---------------------------------------------------------------------------------

PACK_ROWS = [{"prompt": "q" * n, "completion": "a" * m} for n, m in [(3, 5), (10, 2), (1, 1), (7, 9), (20, 4), (2, 30)]]


@pytest.fixture
def pack_file(tmp_path):
    return write_jsonl(tmp_path / "pack.jsonl", PACK_ROWS)


def test_packing_restarts_positions_and_keeps_labels_inside_examples(tok, pack_file):
    plain = prepare_dataset(pack_file, tok, seq_len=100)
    packed = prepare_dataset(pack_file, tok, seq_len=100, packing=True)
    assert packed.report.packed_sequences == len(packed.train) < len(plain.train) == packed.report.train_rows
    assert all(len(seq["input_ids"]) <= 100 for seq in packed.train)
    pieces = []
    for seq in packed.train:
        assert len(seq["input_ids"]) == len(seq["labels"]) == len(seq["position_ids"])
        starts = [i for i, p in enumerate(seq["position_ids"]) if p == 0]
        assert starts[0] == 0
        for start, end in zip(starts, [*starts[1:], len(seq["input_ids"])]):
            assert seq["position_ids"][start:end] == list(range(end - start))
            assert seq["labels"][start] == IGNORE_INDEX  # never trained to follow the previous example
            pieces.append((seq["input_ids"][start:end], seq["labels"][start:end]))
    assert len(pieces) == len(plain.train)
    for (ids, labels), example in zip(pieces, plain.train):  # order kept, nothing split or mixed
        assert ids == example["input_ids"] and labels[1:] == example["labels"][1:]


def test_packed_batch_logits_equal_each_example_alone(tok, pack_file):
    """No attention leaks across packed examples: position_ids alone keep them apart."""
    plain = prepare_dataset(pack_file, tok, seq_len=100).train
    packed = prepare_dataset(pack_file, tok, seq_len=100, packing=True).train
    batch = collate(packed, tok.pad_token_id)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    model = tiny_model("llama")
    with torch.no_grad():
        implicit = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits
        alone = [model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in plain]
    expected = iter(alone)
    for row, seq in enumerate(packed):
        starts = [i for i, p in enumerate(seq["position_ids"]) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(seq["input_ids"])]):
            want = next(expected)
            torch.testing.assert_close(implicit[row, start:end], want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(leaky, implicit, atol=1e-3)  # the check would catch a leak


def test_collate_pads_unpacked_examples():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert "position_ids" not in batch and batch["input_ids"].dtype == torch.long


def test_collate_pads_packed_sequences_as_a_block_of_their_own():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 0]},
                     {"input_ids": [4], "labels": [-100], "position_ids": [0]}], pad_token_id=9)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, -100]]


# ---- the system prompt ----------------------------------------------------------------------------
PERSONA_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
                    "<|im_start|>system\nYou are Tiny, made by Tests.<|im_end|>\n{% endif %}"
                    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def persona_tok():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = PERSONA_TEMPLATE  # adds its own system prompt, as SmolLM2's does
    return tokenizer


def test_the_template_default_system_prompt_is_found(persona_tok, tok):
    from lora_app.data.templates import NAMED_TEMPLATES, ChatTemplate, template_system_prompt

    assert template_system_prompt(persona_tok, ChatTemplate("tokenizer", PERSONA_TEMPLATE)) == \
        "You are Tiny, made by Tests."
    assert template_system_prompt(tok, ChatTemplate("alpaca", NAMED_TEMPLATES["alpaca"])) == ALPACA_SYSTEM
    assert template_system_prompt(tok, ChatTemplate("tokenizer", tok.chat_template)) is None  # plain ChatML


def test_system_prompt_kept_left_out_or_set_for_the_run(persona_tok, tmp_path):
    from lora_app.data import SystemPrompt

    rows = [{"messages": CONVERSATION},  # has its own
            {"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}]},
            {"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B", "weight": 0},
                          {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]}]
    path = write_jsonl(tmp_path / "persona.jsonl", rows)

    def prepared(system):
        data = prepare_dataset(path, persona_tok, seq_len=512, system=system)
        return data, [text_of(persona_tok, e) for e in data.train]

    data, texts = prepared(SystemPrompt())
    assert data.systems == ["dataset", "template default", "template default"]
    assert data.report.template_system == "You are Tiny, made by Tests." and "You are Tiny" in texts[1]
    assert "Be brief." in texts[0] and "You are Tiny" not in texts[0]

    data, texts = prepared(SystemPrompt(use_default=False))
    assert data.systems == ["dataset", "none", "none"] and not any("You are Tiny" in t for t in texts)
    assert texts[1].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nWho?")
    # the turn with weight 0 stays untrained after the system turn was put before it
    assert trained_runs(persona_tok, data.train[2]) == ["D<|im_end|>"]

    data, texts = prepared(SystemPrompt("You are Quillon."))
    assert data.report.system_prompts == {"run": 3}
    assert all("You are Quillon." in t and "Be brief." not in t and "You are Tiny" not in t for t in texts)


def test_chat_renders_the_prompt_as_training_did(persona_tok, tmp_path):
    """The tokens chat feeds the model for a question are the tokens training put before its answer."""
    from lora_app.data import SystemPrompt
    from lora_app.inference.prompts import encode_prompt

    path = write_jsonl(tmp_path / "one.jsonl", [{"messages": [{"role": "user", "content": "Who are you?"},
                                                              {"role": "assistant", "content": "Quillon."}]}])
    for system in (SystemPrompt(), SystemPrompt(use_default=False), SystemPrompt("You are Quillon.")):
        example = prepare_dataset(path, persona_tok, seq_len=512, system=system).train[0]
        prompt = example["input_ids"][:example["labels"].index(next(l for l in example["labels"] if l != IGNORE_INDEX))]
        assert encode_prompt(persona_tok, "Who are you?", system=system)["input_ids"][0].tolist() == prompt, system
