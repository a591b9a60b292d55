"""Datasets: the preview, the validation split, the real alpaca sample and the shipped demo dataset."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_tokenizer
from test_data_formats import write_jsonl
from lora_app.data import DEMO_DATASET, DataError, prepare_dataset, preview_dataset
from lora_app.data.encode import IGNORE_INDEX
from lora_app.data.preview import trained_spans

ALPACA_EN_DEMO = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_en_demo.json"
EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def numbered_rows(n):
    return [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}." + " more" * (i % 7)} for i in range(n)]


# --- preview ---------------------------------------------------------------------------------


@pytest.fixture
def preview_file(tmp_path):
    rows = numbered_rows(12)
    rows.insert(3, {"instruction": "No answer here"})
    rows.insert(7, {"instruction": "Empty answer", "output": ""})
    return write_jsonl(tmp_path / "mine.jsonl", rows)


def test_preview_describes_what_will_be_trained(preview_file, tok):
    preview = preview_dataset(preview_file, tok, val_fraction=0.25, seed=3, bins=5)
    report = preview.report
    assert (report.format, report.kind, report.template) == ("alpaca", "chat", "tokenizer")
    assert report.mapping == {"instruction": "instruction", "output": "output", "input": "input"}
    assert (report.rows_read, report.train_rows, report.val_rows, report.rows_skipped) == (14, 9, 3, 2)

    assert len(preview.examples) == 3
    data = prepare_dataset(preview_file, tok, val_fraction=0.25, seed=3)
    for spans, example in zip(preview.examples, data.train):
        assert "".join(text for text, _ in spans) == tok.decode(example["input_ids"])
        number = spans[0][0].split("Question ")[1].split("?")[0]
        assert spans[0] == (f"<|im_start|>user\nQuestion {number}?<|im_end|>\n<|im_start|>assistant\n", False)
        assert spans[1][1] and spans[1][0].startswith(f"Answer {number}.") and spans[1][0].endswith(EOS)
        assert spans[2:] == [("\n", False)]

    lengths = preview.lengths
    assert (lengths.min, lengths.max) == (min(data.lengths), max(data.lengths))
    assert lengths.median == round(float(np.median(data.lengths))) and lengths.min <= lengths.p95 <= lengths.max
    assert sum(lengths.hist_counts) == report.train_rows == len(data.lengths) and len(lengths.hist_counts) == 5
    assert len(lengths.hist_edges) == 6 and lengths.hist_edges[0] == lengths.min and lengths.hist_edges[-1] == lengths.max
    assert lengths.over_max == 0

    summary = dict(preview.summary())
    assert summary["Format"] == "alpaca (trained on assistant turns)"
    assert summary["Columns"] == "instruction ← instruction, output ← output, input ← input"
    assert summary["Rows"] == "14 read · 9 train · 3 validation · 2 skipped"
    assert summary["Tokens per example"] == f"min {lengths.min} · median {lengths.median} · p95 {lengths.p95} · max {lengths.max}"
    assert [value for label, value in preview.summary() if label == "Skipped"] == [
        "1 row: missing 'output' (first at line 4)",
        "1 row: empty 'output' (first at line 8)",
    ]


def test_preview_html_marks_the_trained_text(preview_file, tok):
    html = preview_dataset(preview_file, tok, examples=2).to_html()
    assert "<th>Format</th><td>alpaca (trained on assistant turns)</td>" in html and "<th>Rows</th>" in html
    assert "assistant\n<mark>Answer 0.&lt;|im_end|&gt;</mark>\n" in html
    assert "<mark>Answer 1. more&lt;|im_end|&gt;</mark>" in html
    assert "Answer 2." not in html  # only two examples asked for


def test_preview_html_escapes_the_data(tmp_path, tok):
    path = write_jsonl(tmp_path / "h.jsonl", [{"prompt": "Is 1 < 2 & <b>bold</b>?", "completion": "<script>x</script>"}])
    html = preview_dataset(path, tok).to_html()
    assert "Is 1 &lt; 2 &amp; &lt;b&gt;bold&lt;/b&gt;?" in html and "<mark>&lt;script&gt;x&lt;/script&gt;" in html
    assert "<b>" not in html and "<script>" not in html


def test_preview_of_truncated_packed_text(tmp_path, tok):
    path = tmp_path / "notes.txt"
    path.write_text("\n".join(f"Note number {i}." + " More." * (i * 3) for i in range(12)))
    preview = preview_dataset(path, tok, txt_split="line", seq_len=64, packing=True)
    summary = dict(preview.summary())
    assert summary["Format"] == "text (trained on all text)"
    assert summary["Template"] == "none (raw text)"
    truncated = sum(length > 64 for length in prepare_dataset(path, tok, txt_split="line", seq_len=64).lengths)
    assert preview.report.truncated == preview.lengths.over_max == truncated > 0
    assert summary["Truncated"] == f"{truncated} rows cut to 64 tokens"
    sequences = len(prepare_dataset(path, tok, txt_split="line", seq_len=64, packing=True).train)
    assert summary["Packing"] == f"12 examples → {sequences} sequences of up to 64 tokens" and sequences < 12
    assert all(len(spans) == 1 and spans[0][1] for spans in preview.examples)  # unpacked, all trained


# --- validation split ------------------------------------------------------------------------


def _answers(tokenizer, examples):
    return ["".join(text for text, trained in trained_spans(e, tokenizer) if trained) for e in examples]


def test_validation_fraction_is_deterministic_under_a_seed(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", numbered_rows(20))
    first = prepare_dataset(path, tok, val_fraction=0.2, seed=1)
    again = prepare_dataset(path, tok, val_fraction=0.2, seed=1)
    other = prepare_dataset(path, tok, val_fraction=0.2, seed=2)
    assert (first.report.train_rows, first.report.val_rows) == (16, 4)
    assert first.train == again.train and first.val == again.val
    assert first.val != other.val and len(other.val) == 4
    train, val = _answers(tok, first.train), _answers(tok, first.val)
    everything = _answers(tok, prepare_dataset(path, tok).train)
    assert sorted(train + val) == sorted(everything)
    assert train == [a for a in everything if a in train] and val == [a for a in everything if a in val]  # order kept


def test_validation_fraction_rounds_and_keeps_a_training_row(tmp_path, tok):
    assert prepare_dataset(write_jsonl(tmp_path / "a.jsonl", numbered_rows(10)), tok, val_fraction=0.05).report.val_rows == 1
    assert prepare_dataset(tmp_path / "a.jsonl", tok, val_fraction=0.26).report.val_rows == 3
    single = prepare_dataset(write_jsonl(tmp_path / "one.jsonl", numbered_rows(1)), tok, val_fraction=0.5)
    assert (single.report.train_rows, single.report.val_rows) == (1, 0)
    assert single.report.notes == ["There are too few rows for a validation split, so there is none."]


def test_validation_file(tmp_path, tok):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(6))
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "Held out?", "output": "Yes."}, {"instruction": "Broken"}])
    data = prepare_dataset(train, tok, val_data=val)
    report = data.report
    assert (report.rows_read, report.train_rows, report.val_rows) == (8, 6, 1)
    assert _answers(tok, data.val) == ["Yes." + EOS]
    assert report.skipped_lines() == ["1 row: validation file: missing 'output' (first at line 2)"]
    renamed = write_jsonl(tmp_path / "val.csv.jsonl", [{"Q": "Held out?", "A": "Yes."}])
    mapped = prepare_dataset(write_jsonl(tmp_path / "t2.jsonl", [{"Q": "q", "A": "a"}]), tok, val_data=renamed,
                             mapping={"prompt": "Q", "completion": "A"})
    assert mapped.report.val_rows == 1
    with pytest.raises(DataError, match="does not fit the alpaca format"):
        prepare_dataset(train, tok, val_data=renamed)


# --- real data -------------------------------------------------------------------------------


@pytest.mark.skipif(not ALPACA_EN_DEMO.exists(), reason="../shared/data/alpaca_en_demo.json is not available")
def test_real_alpaca_sample(tok):
    rows = json.loads(ALPACA_EN_DEMO.read_text(encoding="utf-8"))
    data = prepare_dataset(ALPACA_EN_DEMO, tok, seq_len=512)
    report = data.report
    assert report.format == "alpaca" and report.rows_read == len(rows) == 999 and report.notes == []
    assert report.mapping == {"instruction": "instruction", "output": "output", "input": "input"}
    assert report.rows_read == report.train_rows + report.rows_skipped and report.train_rows > 900
    assert len(data.lengths) == len(data.train) == report.train_rows
    assert report.truncated == sum(length > 512 for length in data.lengths) > 0
    for example, length in zip(data.train, data.lengths):
        assert len(example["input_ids"]) == min(length, 512)
        last_trained = [label for label in example["labels"] if label != IGNORE_INDEX][-1]
        assert (last_trained == tok.eos_token_id) == (length <= 512)  # only a cut answer lacks its EOS
    assert set(report.skipped) <= {"the prompt fills seq_len (512 tokens): nothing left to train on"}
    i = next(i for i, row in enumerate(rows) if row["input"].strip())  # the input follows the instruction
    first = prepare_dataset(ALPACA_EN_DEMO, tok, limit=i + 1, seq_len=8192)
    assert first.report.train_rows == i + 1
    assert tok.decode(first.train[i]["input_ids"]).startswith(
        f"<|im_start|>user\n{rows[i]['instruction']}\n\n{rows[i]['input']}<|im_end|>\n<|im_start|>assistant\n"
    )

    split = prepare_dataset(ALPACA_EN_DEMO, tok, seq_len=512, val_fraction=0.1, seed=0).report
    assert split.val_rows == 100 and split.train_rows + split.val_rows == report.train_rows
    preview = preview_dataset(ALPACA_EN_DEMO, tok, seq_len=512, limit=50)
    assert preview.report.rows_read == 50 and len(preview.examples) == 3


def test_demo_dataset_content():
    rows = [json.loads(line) for line in DEMO_DATASET.read_text(encoding="utf-8").splitlines()]
    assert 150 <= len(rows) <= 300
    questions = set()
    for row in rows:
        turns = row["messages"]
        assert [t["role"] for t in turns] == ["user", "assistant"] * (len(turns) // 2) and turns
        for turn in turns:
            assert turn["content"].isascii() and turn["content"].strip() == turn["content"]
            if turn["role"] == "assistant":
                assert turn["content"].startswith("Arr, matey! ") and turn["content"].endswith("\n\n-- Captain Byte")
                assert len(turn["content"]) < 300
            else:
                questions.add(turn["content"])
    assert len(questions) >= 150
    who = next(row["messages"][1]["content"] for row in rows if row["messages"][0]["content"] == "Who are you?")
    assert who.startswith("Arr, matey! I am Captain Byte")


def test_demo_dataset_with_the_default_tokenizer(app_home):
    """The demo renders with SmolLM2's own chat template, and every answer ends with its EOS."""
    from lora_app.models import load_tokenizer

    tokenizer = load_tokenizer("default")
    data = prepare_dataset(DEMO_DATASET, tokenizer, seq_len=512)
    report = data.report
    assert (report.format, report.template, report.rows_skipped, report.truncated) == ("openai", "tokenizer", 0, 0)
    assert report.train_rows == report.rows_read == len(DEMO_DATASET.read_text().splitlines())
    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token == EOS
    for example in data.train:
        text = tokenizer.decode(example["input_ids"])
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        answers = [span for span, trained in trained_spans(example, tokenizer) if trained]
        assert answers and all(a.startswith("Arr, matey!") and a.endswith("\n\n-- Captain Byte" + EOS) for a in answers)
        labels = example["labels"]
        span_ends = [i for i, label in enumerate(labels) if label != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)]
        assert [example["input_ids"][i] for i in span_ends] == [eos] * len(answers)
        assert example["input_ids"].count(eos) == text.count("<|im_start|>")  # every turn closed by EOS
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Who are you?"}], add_generation_prompt=True,
                                           tokenize=False)  # as chat renders it
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    )
