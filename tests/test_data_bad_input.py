"""Datasets, bad input: every problem gives its own message (DataError) or is a counted, reported skip."""

import json
import random
import re

import pytest

from conftest import tiny_tokenizer
from test_data_formats import jsonl, write
from lora_app.data import DataError, parse_mapping, prepare_dataset, preview_dataset
from lora_app.data.pipeline import load_samples
from lora_app.data.report import DataReport


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def error_of(source, tokenizer, **options) -> str:
    with pytest.raises(DataError) as err:
        prepare_dataset(source, tokenizer, **options)
    return str(err.value)


# --- empty, binary, missing ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["e.json", "e.jsonl", "e.csv", "e.txt", "e.parquet"])
def test_empty_file(name, tmp_path, tok):
    assert error_of(write(tmp_path / name, b""), tok) == f"{name} is empty (0 bytes)."


def test_whitespace_only_file(tmp_path, tok):
    assert error_of(write(tmp_path / "w.jsonl", "\n  \n\t\n"), tok) == "w.jsonl is empty (only whitespace)."


@pytest.mark.parametrize("content", [[], {"data": []}])
def test_json_without_rows(content, tmp_path, tok):
    assert error_of(write(tmp_path / "n.json", json.dumps(content)), tok) == "n.json holds no rows."


def test_csv_with_header_only(tmp_path, tok):
    assert error_of(write(tmp_path / "h.csv", "prompt,completion\n"), tok) == "h.csv holds no rows."


def test_binary_garbage(tmp_path, tok):
    garbage = random.Random(0).randbytes(4096)
    message = error_of(write(tmp_path / "g.jsonl", garbage), tok)
    assert message == ("g.jsonl looks like a binary file (it contains NUL bytes), not text. "
                       "Datasets must be JSON, JSON Lines, CSV/TSV, Parquet or plain text.")
    no_nul = bytes(b % 255 + 1 for b in garbage)  # control characters, but not one NUL byte
    message = error_of(write(tmp_path / "g.csv", no_nul), tok)
    assert re.fullmatch(r"g\.csv looks like a binary file \(\d+ of its first 4096 bytes are control characters\), "
                        r"not text\. .*", message)


@pytest.mark.parametrize("magic, what", [
    (b"PK\x03\x04", "a ZIP archive (an Excel .xlsx or Word .docx file is one too): unpack it, or export the sheet as CSV"),
    (b"%PDF-1.7", "a PDF document: export its text to a .txt file first"),
    (b"\x1f\x8b\x08", "a gzip-compressed file: decompress it first"),
])
def test_known_binary_formats_under_a_data_suffix(magic, what, tmp_path, tok):
    assert error_of(write(tmp_path / "data.csv", magic + b"rest of the file"), tok) == f"data.csv is {what}."


def test_text_with_a_few_control_characters_is_still_text(tmp_path):
    text = "".join(f"Page {i}\f with a form feed, an \x1b[1mescape\x1b[0m, a bell\x07 and a \x0bvertical tab.\n\n"
                   for i in range(20))
    report = DataReport()
    _, samples = load_samples(write(tmp_path / "t.txt", text), report)
    assert len(samples) == 20 and not report.skipped and "\x07" in samples[0].text


def test_not_a_parquet_file(tmp_path, tok):
    message = error_of(write(tmp_path / "x.parquet", "a,b\n1,2\n"), tok)
    assert message == "x.parquet is not a Parquet file (it does not start with the Parquet signature)."


def test_unsupported_suffix_and_missing_source(tmp_path, tok):
    assert error_of(write(tmp_path / "data.xml", "<rows/>"), tok) == (
        "data.xml: files of type '.xml' are not supported. Use one of: .json, .jsonl, .ndjson, .csv, .tsv, .parquet, .txt."
    )
    missing = tmp_path / "nope.json"
    assert error_of(missing, tok) == f"{missing} was not found: there is no such file or folder."
    (tmp_path / "empty_dir").mkdir()
    assert error_of(tmp_path / "empty_dir", tok).startswith("The folder empty_dir holds no data files (.json, .jsonl,")


def test_hub_id_while_offline(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = error_of("someone/no-such-dataset", tok)
    assert message.startswith("someone/no-such-dataset is not a local file or folder, and loading it as a "
                              "Hugging Face Hub dataset failed:")
    assert message.endswith("The app is offline (HF_HUB_OFFLINE is set): use a local file.")


# --- invalid JSON ----------------------------------------------------------------------------


def test_invalid_json_reports_line_and_column(tmp_path, tok):
    text = '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c", "completion": "d",}\n]'
    assert error_of(write(tmp_path / "bad.json", text), tok) == (
        "bad.json is not valid JSON: Expecting property name enclosed in double quotes at line 3, column 37."
    )


@pytest.mark.parametrize("text, message", [
    ('[{"prompt": "a"}', "expected ',' or ']' at line 1, column 17"),  # cut off
    ('[{"prompt": "a"}]\n] trailing', "extra data after the end of the document at line 2, column 1"),
    ('[{"prompt": "a",\n  "completion": b}]', "Expecting value at line 2, column 17"),
    ('"just a string"', "expected an array '[' or an object '{' at the start at line 1, column 1"),
    ('[{"a": 1} {"a": 2}]', "expected ',' or ']' at line 1, column 11"),
])
def test_invalid_json_documents(text, message, tmp_path, tok):
    assert error_of(write(tmp_path / "bad.json", text), tok) == f"bad.json is not valid JSON: {message}."


def test_invalid_json_deep_in_a_large_file(tmp_path, tok, monkeypatch):
    """Line and column stay right when the error lies beyond the first chunks read."""
    import lora_app.data.jsonstream as jsonstream

    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", 16)
    rows = ",\n".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(50))
    text = "[\n" + rows + ",\n  {oops}\n]"
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    expected = f"at line {reference.value.lineno}, column {reference.value.colno}."
    assert error_of(write(tmp_path / "big.json", text), tok).endswith(expected) and reference.value.lineno == 52


def test_json_object_without_a_list_or_with_two(tmp_path, tok):
    assert error_of(write(tmp_path / "o.json", '{"prompt": "a", "completion": "b", "n": 1}'), tok).startswith(
        "o.json is a JSON object without a list of rows."
    )
    assert error_of(write(tmp_path / "o.json", '{"train": [{"text": "a"}], "test": [{"text": "b"}]}'), tok) == (
        "o.json holds more than one list ('train' and 'test'), so it is unclear which one holds the rows. "
        "Keep one list per file; a validation set can be a second file."
    )


def test_invalid_json_lines_are_skipped_with_line_and_column(tmp_path, tok):
    text = jsonl([{"prompt": "a", "completion": "b"}]) + '{"prompt": "c", completion: "d"}\n' + jsonl([{"prompt": "e", "completion": "f"}])
    data = prepare_dataset(write(tmp_path / "l.jsonl", text), tok)
    assert data.report.train_rows == 2
    assert data.report.skipped_lines() == [
        "1 row: invalid JSON (first at line 2, column 17: Expecting property name enclosed in double quotes)"
    ]


# --- schema ----------------------------------------------------------------------------------


def test_unknown_schema_lists_columns_and_possible_mappings(tmp_path, tok):
    message = error_of(write(tmp_path / "u.jsonl", jsonl([{"frage": "q", "antwort": "a", "id": 1}])), tok)
    assert message == (
        "Could not recognise the layout of u.jsonl. Its columns are: 'frage', 'antwort', 'id'. Supported layouts: "
        "sharegpt: conversations; optional system | openai: messages; optional system | "
        "alpaca: instruction + output; optional input, system, history | "
        "prompt_completion: prompt + completion (or question + answer, input + output, query + response); optional system | "
        "text: text (or content). "
        "Possible column mappings: prompt=frage,completion=antwort (prompt_completion layout); text=frage (text layout)."
    )


def test_mapping_hints_are_written_as_the_mapping_option_reads_them(tmp_path, tok):
    """The hints use --data-mapping's field=column syntax, and what they suggest parses back as meant."""
    path = write(tmp_path / "u.csv", "Frage,Antwort\nq,a\n")
    hint = error_of(path, tok).split("Possible column mappings: ")[1]
    suggested = hint.split(" (prompt_completion layout)")[0]
    assert suggested == "prompt=Frage,completion=Antwort"
    assert parse_mapping(suggested) == {"prompt": "Frage", "completion": "Antwort"}
    assert prepare_dataset(path, tok, mapping=parse_mapping(suggested)).report.train_rows == 1
    # A column name the field=column syntax cannot hold is suggested as JSON, which the option also reads.
    path = write(tmp_path / "c.csv", '"Frage, kurz",Antwort\nq,a\n')
    suggested = error_of(path, tok).split("Possible column mappings: ")[1].split(" (prompt_completion layout)")[0]
    assert suggested == '{"prompt": "Frage, kurz", "completion": "Antwort"}'
    assert parse_mapping(suggested) == {"prompt": "Frage, kurz", "completion": "Antwort"}


def test_forced_format_that_does_not_fit(tmp_path, tok):
    path = write(tmp_path / "a.csv", "a;b\n1;2\n")
    assert error_of(path, tok, format="alpaca") == (
        "a.csv does not fit the alpaca format: no column found for instruction, output. Its columns are: 'a', 'b'. "
        "Map the fields to columns by hand, e.g. instruction=<column>,output=<column>."
    )


def test_bad_mappings_and_options(tmp_path, tok):
    path = write(tmp_path / "a.csv", "q,a\nhi,yo\n")
    assert error_of(path, tok, mapping={"prompt": "question", "completion": "a"}) == (
        "The column 'question' (mapped to 'prompt') is not in a.csv. Its columns are: 'q', 'a'."
    )
    assert error_of(path, tok, format="alpaca", mapping={"prompt": "q"}) == (
        "prompt is not a field of the alpaca format; its fields are instruction, output, input, system, history."
    )
    assert error_of(path, tok, mapping={"colour": "q"}).startswith("No layout has all the fields colour. Supported layouts:")
    assert error_of(path, tok, format="yaml") == (
        "Unknown format 'yaml'; choose one of: sharegpt, openai, alpaca, prompt_completion, text (or auto)."
    )


def test_rows_that_are_not_objects(tmp_path, tok):
    assert error_of(write(tmp_path / "n.json", "[[1, 2], 3]"), tok) == (
        "No usable rows in n.json: 2 rows read, none can be trained on. Skipped: "
        "1 row: a row is not an object (it is list) (first at row 1); "
        "1 row: a row is not an object (it is int) (first at row 2)."
    )


# --- bad rows: skipped, counted, reported ----------------------------------------------------


def test_missing_empty_and_non_string_fields_are_skipped_counted_and_reported(tmp_path, tok):
    rows = [
        {"instruction": "Good row", "output": "fine"},
        {"instruction": "No output"},
        {"instruction": "Null output", "output": None},
        {"instruction": "   ", "output": "empty instruction"},
        {"instruction": "Number output", "output": 42},
        {"instruction": "List input", "input": ["a"], "output": "x"},
        {"instruction": "Another good row", "output": "fine", "input": ""},
        {"instruction": "Bad history", "output": "x", "history": [["only a question"]]},
    ]
    path = write(tmp_path / "a.jsonl", jsonl(rows))
    data = prepare_dataset(path, tok)
    report = data.report
    assert report.rows_read == 8 and report.train_rows == 2 and report.rows_skipped == 6
    assert report.skipped_lines() == [
        "2 rows: missing 'output' (first at line 2)",
        "1 row: empty 'instruction' (first at line 4)",
        "1 row: 'output' is not text (it is int) (first at line 5)",
        "1 row: 'input' is not text (it is list) (first at line 6)",
        "1 row: 'history' is not a list of [question, answer] pairs (first at line 8)",
    ]
    summary = preview_dataset(path, tok).summary()
    assert ("Skipped", "2 rows: missing 'output' (first at line 2)") in summary
    assert ("Rows", "8 read · 2 train · 0 validation · 6 skipped") in summary


def test_bad_conversation_turns_are_skipped(tmp_path, tok):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    rows = [
        good,
        {"messages": [{"role": "user", "content": "Anyone there?"}]},
        {"messages": [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Hi"}, {"role": "user", "content": "?"}]},
        {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}]},
        {"messages": [{"role": "wizard", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": "not a list"},
        {"messages": ["not a turn"]},
    ]
    report = prepare_dataset(write(tmp_path / "m.jsonl", jsonl(rows)), tok).report
    assert report.train_rows == 1
    assert report.skipped_lines() == [
        "2 rows: no assistant turn (first at line 2)",
        "1 row: conversation starts with an assistant turn, before any prompt (first at line 4)",
        "1 row: unknown role 'wizard' (first at line 5)",
        "1 row: a turn has non-text content (image_url) (first at line 6)",
        "1 row: a turn is empty (first at line 7)",
        "1 row: 'messages' is not a list (first at line 8)",
        "1 row: a turn in 'messages' is not an object (first at line 9)",
    ]


def test_non_text_content_parts_are_skipped_naming_their_type(tmp_path, tok):
    def turns(*parts):
        return {"messages": [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": "Seen."}]}

    rows = [
        turns({"type": "text", "value": "What is this?"}),
        turns({"type": "text", "value": "And this?"}, {"type": "image", "image": "cat.png"}),
        turns({"type": "input_audio", "input_audio": {"data": "..."}}),
        turns({"type": "text"}),
        turns(3),
    ]
    report = prepare_dataset(write(tmp_path / "m.jsonl", jsonl(rows)), tok).report
    assert report.train_rows == 1
    assert report.skipped_lines() == [
        "1 row: a turn has non-text content (image) (first at line 2)",
        "1 row: a turn has non-text content (input_audio) (first at line 3)",
        "1 row: a turn has a text part without a 'text' or 'value' string (first at line 4)",
        "1 row: a turn has non-text content (int) (first at line 5)",
    ]


def test_conversation_with_no_assistant_turn_only(tmp_path, tok):
    rows = [{"conversations": [{"from": "human", "value": "Hello?"}]}] * 3
    assert error_of(write(tmp_path / "s.json", json.dumps(rows)), tok) == (
        "No usable rows in s.json: 3 rows read, none can be trained on. "
        "Skipped: 3 rows: no assistant turn (first at row 1)."
    )


def test_zero_usable_rows(tmp_path, tok):
    rows = [{"prompt": "q1", "completion": ""}, {"prompt": "q2"}, {"prompt": "q3", "completion": 3}]
    assert error_of(write(tmp_path / "z.jsonl", jsonl(rows)), tok) == (
        "No usable rows in z.jsonl: 3 rows read, none can be trained on. Skipped: "
        "1 row: empty 'completion' (first at line 1); 1 row: missing 'completion' (first at line 2); "
        "1 row: 'completion' is not text (it is int) (first at line 3)."
    )


def test_zero_usable_rows_after_tokenizing(tmp_path, tok):
    rows = [{"prompt": "a long question " * 10, "completion": "yes"}]
    assert error_of(write(tmp_path / "z.jsonl", jsonl(rows)), tok, seq_len=20) == (
        "No usable rows in z.jsonl: 1 row read, none can be trained on. Skipped: "
        "1 row: the prompt fills seq_len (20 tokens): nothing left to train on (first at line 1)."
    )


# --- nesting ---------------------------------------------------------------------------------

ROW = {"prompt": "q", "completion": "a"}


def nested(depth: int) -> str:
    """JSON text of lists and objects nested ``depth`` levels deep."""
    odd = depth % 2
    return '{"a": [' * (depth // 2) + "[" * odd + "1" + "]" * odd + "]}" * (depth // 2)


@pytest.mark.parametrize("name, text, where", [
    ("deep.json", "[" * 5000 + "]" * 5000, "deep.json"),
    ("deep.json", '[{"a": ' * 3000 + "1" + "}]" * 3000, "deep.json"),
    ("deep.json", json.dumps([ROW])[:-1] + ", " + nested(5000) + "]", "deep.json"),
    ("deep.json", '{"data": ' + nested(5000) + "}", "deep.json"),
    ("deep.jsonl", "[" * 5000 + "]" * 5000, "deep.jsonl"),  # read as one JSON document
    ("deep.jsonl", '{"a": ' * 5000 + "1" + "}" * 5000 + "\n", "deep.jsonl line 1"),
    ("deep.jsonl", jsonl([ROW]) + nested(5000) + "\n", "deep.jsonl line 2"),
])
def test_json_nested_too_deeply(name, text, where, tmp_path, tok):
    assert error_of(write(tmp_path / name, text), tok) == (
        f"{where} is nested too deeply (more than 100 levels of lists and objects) — flatten it: "
        "a dataset row needs only a few levels."
    )


def test_json_nested_too_deeply_across_chunks(tmp_path, tok, monkeypatch):
    import lora_app.data.jsonstream as jsonstream

    monkeypatch.setattr(jsonstream, "CHUNK_CHARS", 64)
    assert error_of(write(tmp_path / "deep.json", "[" * 5000 + "]" * 5000), tok).startswith(
        "deep.json is nested too deeply (more than 100 levels"
    )


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_json_nesting_limit_is_exact(suffix, tmp_path, tok):
    """100 levels (the row object counts as one) are read; 101 are refused, far from any RecursionError."""
    def rows(depth):
        return [ROW, {**ROW, "extra": json.loads(nested(depth - 1))}]

    def path(name, depth):
        return write(tmp_path / f"{name}.{suffix}", json.dumps(rows(depth)) if suffix == "json" else jsonl(rows(depth)))

    assert prepare_dataset(path("ok", 100), tok).report.train_rows == 2
    where = "deep.json" if suffix == "json" else "deep.jsonl line 2"
    assert error_of(path("deep", 101), tok).startswith(f"{where} is nested too deeply (more than 100 levels")


def test_csv_cell_with_json_nested_too_deeply_is_skipped(tmp_path, tok):
    conversation = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    text = "chat\n" + "\n".join('"' + cell.replace('"', '""') + '"' for cell in [conversation, "[" * 5000 + "]" * 5000])
    report = prepare_dataset(write(tmp_path / "c.csv", text + "\n"), tok, mapping={"messages": "chat"}).report
    assert report.train_rows == 1
    assert report.skipped_lines() == ["1 row: 'chat' is nested too deeply (more than 100 levels) (first at line 3)"]


def test_csv_row_with_too_many_values(tmp_path, tok):
    report = prepare_dataset(write(tmp_path / "c.csv", "prompt,completion\nq,a\nq,a,extra\n"), tok).report
    assert report.skipped_lines() == ["1 row: more values than columns in the header (first at line 3)"]


# --- encodings -------------------------------------------------------------------------------


def test_non_utf8_text_falls_back_and_says_so(tmp_path, tok):
    text = "prompt,completion\nHello,Hi\nCafé?,Crème brûlée – 5 €\n"
    path = write(tmp_path / "win.csv", text.encode("cp1252"))
    report = DataReport()
    _, samples = load_samples(path, report)
    assert [m["content"] for m in samples[1].messages] == ["Café?", "Crème brûlée – 5 €"]
    note = ("win.csv is not valid UTF-8 (first bad byte on line 3); it was read as cp1252. "
            "Check accented characters in the preview, or save the file as UTF-8.")
    assert report.notes == [note]
    assert ("Note", note) in preview_dataset(path, tok).summary()


def test_bytes_cp1252_cannot_decode_fall_back_to_latin1(tmp_path):
    path = write(tmp_path / "l1.txt", "line one\n".encode() + b"caf\xe9 \x81\x8d\n")
    report = DataReport()
    _, samples = load_samples(path, report, txt_split="line")
    assert samples[1].text == "café \x81\x8d"
    assert report.notes[0].startswith("l1.txt is not valid UTF-8 (first bad byte on line 2); it was read as iso8859-1.")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_text_with_a_byte_order_mark(encoding, tmp_path):
    path = write(tmp_path / "bom.jsonl", jsonl([{"text": "Grüße"}]).encode(encoding))
    report = DataReport()
    _, samples = load_samples(path, report)
    assert samples[0].text == "Grüße" and report.notes == []


# --- size limit ------------------------------------------------------------------------------


def test_file_over_the_size_limit(tmp_path, tok):
    path = write(tmp_path / "big.txt", "A long document.\n" * 180 + "x" * 12)  # 3072 bytes
    assert error_of(path, tok, max_file_bytes=2048) == (
        "big.txt is 3.0 KiB, over the 2.0 KiB limit for a dataset. "
        "Use a smaller sample of it, or raise the file size limit (max_file_bytes)."
    )
    assert prepare_dataset(path, tok, max_file_bytes=3072).report.train_rows == 1


def test_folder_over_the_size_limit(tmp_path, tok):
    """The limit applies to the files read together, each under it."""
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(3):
        write(folder / f"part{i}.txt", "y" * 511 + "\n")
    assert error_of(folder, tok, max_file_bytes=1024) == (
        "parts is 1.5 KiB, over the 1.0 KiB limit for a dataset. "
        "Use a smaller sample of it, or raise the file size limit (max_file_bytes)."
    )


# --- option errors ---------------------------------------------------------------------------


def test_validation_option_errors(tmp_path, tok):
    path = write(tmp_path / "p.jsonl", jsonl([{"prompt": "q", "completion": "a"}] * 4))
    assert error_of(path, tok, val_fraction=0.2, val_data=path) == (
        "Use either a validation fraction or a validation file, not both."
    )
    assert error_of(path, tok, val_fraction=1.0) == "The validation fraction must be at least 0 and below 1, not 1.0."
    assert error_of(path, tok, val_data=tmp_path / "missing.jsonl").endswith("there is no such file or folder.")
