"""Datasets, reading side: every file type and every layout becomes the same conversations.

Conversations are checked through ``load_samples`` (rows -> messages, before any template), and every
layout also goes end to end through ``prepare_dataset`` with the tiny char-level tokenizer.
"""

import csv
import json

import pytest

from conftest import tiny_tokenizer
from lora_app.data import DataError, prepare_dataset
from lora_app.data.pipeline import load_samples
from lora_app.data.report import DataReport

QA = [
    {"prompt": "Name a colour.", "completion": "Blue."},
    {"prompt": "Add 2 and 3, please", "completion": "5"},
    {"prompt": 'A "quoted", comma;\nand a line break', "completion": "Done."},
]
QA_MESSAGES = [
    ({"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}) for row in QA
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# Helpers shared by the tests/test_data_*.py files.


def jsonl(rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def write(path, content):
    """Write text (UTF-8) or bytes to ``path`` and return it."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def write_jsonl(path, rows):
    return write(path, jsonl(rows))


def load(path, **options):
    """(format name, [messages or text per sample], report) for a source."""
    report = DataReport(source=str(path))
    fmt, samples = load_samples(path, report, **options)
    return fmt.name, [s.text if s.kind == "text" else s.messages for s in samples], report


# --- file types ------------------------------------------------------------------------------


def _write_csv(path, rows, delimiter=",", bom=False):
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_saved_dataset(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _write_folder(path, rows):
    path.mkdir()
    (path / "train.jsonl").write_text(jsonl(rows[:2]))
    (path / "train_more.json").write_text(json.dumps(rows[2:]))
    (path / "test.jsonl").write_text(jsonl([{"prompt": "held out", "completion": "not read"}]))
    (path / ".hidden.jsonl").write_text("not a dataset")
    return path


WRITERS = {
    "json array": lambda d, rows: write(d / "qa.json", json.dumps(rows, indent=2)),
    "json object with a list": lambda d, rows: write(d / "qa.json", json.dumps({"version": 2, "data": rows, "n": 3})),
    "json lines in a .json": lambda d, rows: write(d / "qa.json", jsonl(rows)),
    "jsonl": lambda d, rows: write(d / "qa.jsonl", "\n" + jsonl(rows[:2]) + "\n\n" + jsonl(rows[2:])),
    "ndjson": lambda d, rows: write(d / "qa.ndjson", jsonl(rows)),
    "pretty array in a .jsonl": lambda d, rows: write(d / "qa.jsonl", json.dumps(rows, indent=1)),
    "csv": lambda d, rows: _write_csv(d / "qa.csv", rows),
    "csv semicolons": lambda d, rows: _write_csv(d / "qa.csv", rows, delimiter=";"),
    "tsv with BOM": lambda d, rows: _write_csv(d / "qa.tsv", rows, delimiter="\t", bom=True),
    "csv with BOM": lambda d, rows: _write_csv(d / "qa.csv", rows, bom=True),
    "parquet": lambda d, rows: _write_parquet(d / "qa.parquet", rows),
    "parquet without suffix": lambda d, rows: _write_parquet(d / "qa.data", rows),
    "data folder": lambda d, rows: _write_folder(d / "qa", rows),
    "saved dataset folder": lambda d, rows: _write_saved_dataset(d / "qa", rows),
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_every_file_type_gives_the_same_conversations(kind, tmp_path):
    source = WRITERS[kind](tmp_path, QA)
    name, samples, report = load(source)
    assert name == "prompt_completion" and report.mapping == {"prompt": "prompt", "completion": "completion"}
    assert samples == QA_MESSAGES
    assert report.rows_read == 3 and not report.skipped
    if kind == "json lines in a .json":
        assert report.notes == ["qa.json holds one JSON object per line; it was read as JSON Lines."]
    elif kind == "data folder":
        assert report.notes == ["Only the training files in qa were read; test.jsonl were ignored."]
    else:
        assert report.notes == []


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_csv_delimiter_is_found_despite_quoted_delimiters(delimiter, tmp_path):
    """Each delimiter also appears inside quoted fields; csv.Sniffer would take the quotes' comma."""
    rows = [{"question": f'He said "a{d}b", then left', "answer": f"x{d}y"} for d in ",;\t|"]
    _, samples, _ = load(_write_csv(tmp_path / "q.csv", rows, delimiter=delimiter))
    assert [[m["content"] for m in sample] for sample in samples] == [[r["question"], r["answer"]] for r in rows]


def test_one_column_csv(tmp_path):
    name, samples, _ = load(write(tmp_path / "t.csv", 'text\n"Hello, world; again"\nplain\n'))
    assert name == "text" and samples == ["Hello, world; again", "plain"]


def test_one_column_csv_keeps_unquoted_delimiters_in_its_text(tmp_path):
    """The header names one column, so commas (or ; | tabs) in the records are text, however many there are."""
    records = ["Hello, world, again", "One, two", "No comma at all", "semi; colon | pipe\tand, comma", 'He said "hi", twice']
    name, samples, report = load(write(tmp_path / "t.csv", "text\n" + "\n".join(records) + '\n"quoted, ""too"""\n'))
    assert name == "text" and samples == [*records, 'quoted, "too"']
    assert report.rows_read == 6 and not report.skipped


def test_where_rows_are_located(tmp_path):
    """Skipped rows point at a line (text files), a row number (JSON, Parquet) or a file and line (folders)."""
    bad = [*QA, {"prompt": "no answer"}]
    for source, where in [
        (write(tmp_path / "a.jsonl", jsonl(bad)), "line 4"),
        (_write_csv(tmp_path / "a.csv", [{**row, "completion": row.get("completion", "")} for row in bad]), "line 6"),
        (write(tmp_path / "a.json", json.dumps(bad)), "row 4"),
        (_write_parquet(tmp_path / "a.parquet", bad), "row 4"),
    ]:
        _, _, report = load(source)
        assert list(report.first_skipped_at.values()) == [where], source
    folder = tmp_path / "f"
    folder.mkdir()
    write(folder / "part1.jsonl", jsonl(QA))
    write(folder / "part2.jsonl", jsonl(bad))
    _, samples, report = load(folder)
    assert len(samples) == 6 and report.first_skipped_at == {"missing 'completion'": "part2.jsonl line 4"}


def test_large_json_is_streamed_in_chunks(tmp_path, monkeypatch):
    """With a 7-character window the streaming reader still returns exactly what json.load does."""
    import lora_app.data.jsonstream as jsonstream

    rows = [{"instruction": f"Say {i} — ünïcode", "input": "", "output": "ok\n" * (i % 4 + 1)} for i in range(40)]
    path = write(tmp_path / "big.json", json.dumps({"info": {"n": 40}, "rows": rows}, ensure_ascii=False, indent=2))
    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", 7)
    name, samples, _ = load(path)
    assert name == "alpaca" and [m[1]["content"] for m in samples] == [r["output"] for r in rows]


# --- layouts ---------------------------------------------------------------------------------


def test_alpaca_with_input_system_and_history(tmp_path):
    rows = [
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "system": "You translate.",
         "history": [["Hi", "Hello there"], ["Ready?", "Yes"]]},
        {"instruction": "Name a fruit.", "input": "  ", "output": "An apple.", "system": "", "history": []},
    ]
    name, samples, report = load(write(tmp_path / "a.json", json.dumps(rows)))
    assert name == "alpaca"
    assert report.mapping == {"instruction": "instruction", "output": "output", "input": "input",
                              "system": "system", "history": "history"}
    assert [list(s) for s in samples] == [
        [
            {"role": "system", "content": "You translate."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Ready?"},
            {"role": "assistant", "content": "Yes"},
            {"role": "user", "content": "Translate.\n\nBonjour"},
            {"role": "assistant", "content": "Hello"},
        ],
        [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."}],
    ]


def test_alpaca_history_as_json_text_in_csv(tmp_path):
    rows = [{"instruction": "And 3+3?", "output": "6", "history": json.dumps([["2+2?", "4"]])}]
    _, samples, _ = load(_write_csv(tmp_path / "a.csv", rows))
    assert [m["content"] for m in samples[0]] == ["2+2?", "4", "And 3+3?", "6"]


def test_sharegpt_with_system_function_call_and_observation(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "You can call tools."},
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"temp": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
            {"from": "human", "value": "Thanks, that is all."},  # trailing prompt: nothing to learn, dropped
        ],
        "system": "ignored: the turns have their own system prompt",
    }
    name, samples, report = load(write(tmp_path / "s.jsonl", jsonl([row])))
    assert name == "sharegpt" and report.mapping == {"conversations": "conversations", "system": "system"}
    assert [(m["role"], m["content"]) for m in samples[0]] == [
        ("system", "You can call tools."),
        ("user", "Weather in Paris?"),
        ("assistant", '{"name": "weather", "arguments": {"city": "Paris"}}'),
        ("tool", '{"temp": 21}'),
        ("assistant", "It is 21 degrees."),
    ]


def test_sharegpt_system_column(tmp_path):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "system": "Be kind."}
    _, samples, _ = load(write(tmp_path / "s.json", json.dumps([row])))
    assert samples[0][0] == {"role": "system", "content": "Be kind."}


def test_openai_messages_with_string_and_list_content(tmp_path):
    rows = [
        {"messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Both read."}]},
        ]},
        {"messages": [
            {"role": "user", "content": "Call the tool."},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
            {"role": "tool", "content": "42"},
            {"role": "assistant", "content": "The answer is 42."},
        ]},
    ]
    name, samples, _ = load(write(tmp_path / "m.jsonl", jsonl(rows)))
    assert name == "openai"
    assert list(samples[0]) == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "First part.\nSecond part."},
        {"role": "assistant", "content": "Both read."},
    ]
    assert [m["role"] for m in samples[1]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(samples[1][1]["content"]) == rows[1]["messages"][1]["tool_calls"]


def test_content_parts_with_their_text_under_value(tmp_path):
    """Some exports write text parts as {"type": "text", "value": ...}: read like "text"."""
    row = {"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Part one."}, {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": [{"type": "text", "value": "Read."}]},
    ]}
    _, samples, report = load(write(tmp_path / "m.jsonl", jsonl([row])))
    assert not report.skipped
    assert list(samples[0]) == [{"role": "user", "content": "Part one.\nPart two."}, {"role": "assistant", "content": "Read."}]


@pytest.mark.parametrize("prompt, completion", [("prompt", "completion"), ("question", "answer"),
                                                ("input", "output"), ("query", "response"), ("Question", "ANSWER")])
def test_prompt_completion_and_its_aliases(prompt, completion, tmp_path, tok):
    rows = [{prompt: "What is 2+2?", completion: "4", "system": "Be exact."}]
    path = write(tmp_path / "p.jsonl", jsonl(rows))
    name, samples, report = load(path)
    assert name == "prompt_completion"
    assert report.mapping == {"prompt": prompt, "completion": completion, "system": "system"}
    assert [m["role"] for m in samples[0]] == ["system", "user", "assistant"]
    assert prepare_dataset(path, tok).report.train_rows == 1


@pytest.mark.parametrize("column", ["text", "content", "Text"])
def test_raw_text_column(column, tmp_path):
    name, samples, report = load(write(tmp_path / "t.jsonl", jsonl([{column: "Once upon a time."}, {column: "The end."}])))
    assert name == "text" and report.kind == "text" and samples == ["Once upon a time.", "The end."]


def test_json_array_of_strings_is_raw_text(tmp_path):
    name, samples, _ = load(write(tmp_path / "t.json", json.dumps(["first text", "second text"])))
    assert name == "text" and samples == ["first text", "second text"]


TXT = "First document,\nstill the first.\n\n\n  \nSecond document.\n\nThird.\n"


def test_txt_split_on_blank_lines(tmp_path):
    name, samples, report = load(write(tmp_path / "book.txt", TXT))
    assert name == "text" and report.mapping == {"text": "text"}
    assert samples == ["First document,\nstill the first.", "Second document.", "Third."]


def test_txt_split_on_lines(tmp_path):
    _, samples, _ = load(write(tmp_path / "book.txt", TXT), txt_split="line")
    assert samples == ["First document,", "still the first.", "Second document.", "Third."]
    with pytest.raises(DataError, match="Unknown text split rule 'words'; choose one of blank_line, line"):
        load(tmp_path / "book.txt", txt_split="words")


def test_detection_prefers_real_fields_over_a_rendered_text_column(tmp_path):
    rows = [{"text": "### Instruction: Hi ### Response: Hello", "instruction": "Hi", "output": "Hello"}]
    path = write(tmp_path / "a.jsonl", jsonl(rows))
    assert load(path)[0] == "alpaca"
    name, samples, _ = load(path, format="text")  # the user overrides the detection
    assert name == "text" and samples == [rows[0]["text"]]


# --- mapping columns by hand -----------------------------------------------------------------


def test_mapping_columns_by_hand(tmp_path, tok):
    rows = [{"Frage": "Wie spät ist es?", "Antwort": "Zeit zu lernen.", "Rolle": "Sei freundlich."}]
    path = _write_csv(tmp_path / "de.csv", rows)
    mapping = {"prompt": "Frage", "completion": "Antwort", "system": "Rolle"}
    for format in (None, "prompt_completion"):  # a mapping alone is enough when its fields fit one layout
        name, samples, report = load(path, format=format, mapping=mapping)
        assert name == "prompt_completion" and report.mapping == mapping
        assert [m["content"] for m in samples[0]] == ["Sei freundlich.", "Wie spät ist es?", "Zeit zu lernen."]
    data = prepare_dataset(path, tok, mapping=mapping)
    assert data.report.mapping == mapping and data.report.train_rows == 1


def test_partial_mapping_keeps_detected_fields(tmp_path):
    rows = [{"instruction": "Hi", "answer_v2": "Hello", "output": "old answer"}]
    _, samples, report = load(write(tmp_path / "a.jsonl", jsonl(rows)), mapping={"output": "answer_v2"})
    assert report.mapping == {"instruction": "instruction", "output": "answer_v2"}
    assert samples[0][1]["content"] == "Hello"


def test_mapping_a_column_to_another_layout(tmp_path):
    path = write(tmp_path / "a.jsonl", jsonl([{"instruction": "Hi", "output": "Hello"}]))
    name, samples, _ = load(path, format="text", mapping={"text": "output"})
    assert name == "text" and samples == ["Hello"]


def test_messages_as_json_text_in_a_csv_column(tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    name, samples, _ = load(_write_csv(tmp_path / "c.csv", [{"chat": json.dumps(conversation)}]),
                            mapping={"messages": "chat"})
    assert name == "openai" and list(samples[0]) == conversation
