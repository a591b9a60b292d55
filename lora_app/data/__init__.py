"""Datasets: from an uploaded file to what the model trains on.

Public API
----------

``prepare_dataset(source, tokenizer, *, format=None, mapping=None, template=None, seq_len=1024,
train_on_prompt=False, packing=False, val_fraction=0.0, val_data=None, seed=0,
max_file_bytes=DEFAULT_MAX_FILE_BYTES, txt_split="blank_line", limit=None) -> PreparedData``
    Read, map, split, render and tokenize a dataset. ``PreparedData`` has ``train`` and ``val``
    (lists of ``{"input_ids", "labels"}``, plus ``position_ids`` when packed; unpadded),
    ``report`` (:class:`DataReport`) and ``lengths`` (token counts before truncation).

``load_split(source, report=None, *, format=None, mapping=None, val_fraction=0.0, val_data=None,
seed=0, max_file_bytes=..., txt_split="blank_line", limit=None) -> (Format, train, val)``
    The first steps of ``prepare_dataset`` alone: read, map and split into ``Sample`` lists, with no
    tokenizer (and no torch), so a wrong file, layout or mapping is found at once.

``preview_dataset(source, tokenizer, *, examples=3, bins=20, **prepare_options) -> Preview``
    The same pipeline, described for the UI: ``preview.report`` (format, columns, mapping,
    template, row counts, skipped rows by reason, notes), ``preview.examples`` (``(text,
    trained)`` spans decoded from the token ids), ``preview.lengths`` (:class:`LengthStats`: min,
    median, p95, max and a histogram as counts and bin edges), ``summary()`` and ``to_html()``
    (trained text marked).

``collate(examples, pad_token_id, width=None) -> dict[str, Tensor]``
    Pad a batch to its longest example (labels -100 on padding). Packed batches come with
    ``position_ids`` and no ``attention_mask``: see :mod:`lora_app.data.packing` for why.

``DataError``
    Raised for every dataset that cannot be used; ``str(err)`` is the message for the user.

Options
-------

* ``source``: a file (``.json .jsonl .ndjson .csv .tsv .parquet .txt``), a folder (a
  ``save_to_disk`` dataset or data files), or a Hub dataset id ``owner/name`` (online only). See
  :mod:`~lora_app.data.readers`; ``txt_split`` is how a ``.txt`` file is cut into examples
  (``"blank_line"``: blank-line-separated documents, ``"line"``: one per line).
* ``format``: ``None``/``"auto"`` (detect) or one of ``FORMATS`` -- ``alpaca``, ``sharegpt``,
  ``openai``, ``prompt_completion``, ``text``; ``mapping``: format field -> column name, to map
  columns by hand. See :mod:`~lora_app.data.formats`.
* ``template``: ``None``/``"auto"`` (the tokenizer's chat template, else ``alpaca``),
  ``"tokenizer"``, or a name in ``NAMED_TEMPLATES`` (``alpaca``, ``chatml``). Every assistant
  turn is trained up to and including the tokenizer's EOS token, except those with a loss weight of
  0 (``weight``/``loss_weight``, see :mod:`~lora_app.data.formats`). See :mod:`~lora_app.data.templates`.
* ``seq_len``: longer examples are truncated (counted in ``report.truncated``);
  ``train_on_prompt``: train on every token, not only assistant turns; ``packing``: concatenate
  short examples into sequences of up to ``seq_len`` tokens (:mod:`~lora_app.data.packing`).
* ``val_fraction`` (under ``seed``) or ``val_data``: the validation set.
* ``max_file_bytes``: larger files are refused; ``limit``: read only the first rows (a quick
  preview of a big file).

``DEMO_DATASET`` is the demo dataset shipped with the app (``assets/demo_captain_byte.jsonl``): a
pirate persona, Captain Byte, whose answers start with "Arr, matey!" and end with his signature line
"-- Captain Byte" (OpenAI messages, one conversation per line).
"""

from pathlib import Path

from lora_app.lazy import exports

DEMO_DATASET = Path(__file__).resolve().parents[2] / "assets" / "demo_captain_byte.jsonl"

__getattr__, __all__ = exports(__name__, {
    "errors": ("DataError",),
    "formats": ("FORMATS", "Sample", "parse_mapping"),
    "tensors": ("collate",),
    "packing": ("pack_examples", "pack_groups"),
    "pipeline": ("DEFAULT_MAX_FILE_BYTES", "DEFAULT_SEQ_LEN", "PreparedData", "load_split", "prepare_dataset"),
    "preview": ("LengthStats", "Preview", "preview_dataset"),
    "report": ("DataReport",),
    "templates": ("NAMED_TEMPLATES", "PromptFormat", "SystemPrompt", "prompt_texts"),
})
__all__ += ["DEMO_DATASET"]
