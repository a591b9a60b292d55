"""Dataset layouts: recognising which one a file uses, and turning each row into a :class:`Sample`.

Every layout ends up as one of two things:

* a conversation -- a list of ``{"role": "system" | "user" | "assistant" | "tool", "content": str}``
  that ends with an assistant turn; training targets the assistant turns;
* a raw text (layout ``text``), for continued pre-training; training targets all of it.

Layouts (``FORMATS``, in detection order), with their fields (optional ones after the semicolon):

* ``sharegpt``: conversations (turns with ``from``/``value``); system
* ``openai``: messages (turns with ``role``/``content``, content a string or a list of parts); system
* ``alpaca``: instruction, output; input (appended to the instruction), system, history
  (``[[question, answer], ...]`` turns before the instruction)
* ``prompt_completion``: prompt, completion -- also found as question/answer, input/output,
  query/response; system
* ``text``: text -- also found as a ``content`` column

Column names match case-insensitively. The user can name the layout (``format=``) and map fields to
columns by hand (``mapping={"prompt": "Frage", "completion": "Antwort"}``, typed as
``prompt=Frage,completion=Antwort``: :func:`parse_mapping` reads it, :func:`format_mapping` writes
it); a mapping alone is enough when its fields belong to one layout. Conversation turns are read
whichever key style they use (``role``/``content`` or ``from``/``value``) and role vocabulary
(human/gpt/function_call/observation as ShareGPT writes them, user/assistant/tool/developer as OpenAI
does); a content given as a list of parts keeps the text parts (``{"type": "text", "text": ...}``,
or ``"value"`` for the text). A turn's loss weight -- ``"weight"`` as OpenAI fine-tuning writes it,
``"loss_weight"`` as ShareGPT files for LLaMA-Factory do -- is 0 or 1: an assistant turn weighted 0
stays in the conversation as context but is not trained. In a CSV file a list field (history,
conversations, messages) can be a JSON string.
"""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import DataError, RowSkip
from .jsonstream import MAX_DEPTH, TooDeep, loads

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",  # the model's call is something it must learn to write
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}


@dataclass(frozen=True)
class Sample:
    """One usable row: a conversation (``messages``) or, for the text layout, ``text``.

    ``untrained``: indices in ``messages`` of the assistant turns with loss weight 0, rendered as
    part of the prompt rather than trained (so ``train_on_prompt``, which trains every token, trains
    them too). ``messages`` themselves hold only ``role`` and ``content``, which is what chat
    templates expect.
    """

    where: str
    messages: tuple[dict[str, str], ...] = ()
    text: str | None = None
    untrained: frozenset[int] = frozenset()

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "chat"


@dataclass(frozen=True)
class Format:
    """A layout: its fields, how columns are recognised, and how a row becomes a sample."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    # Each candidate maps the required fields to lower-case column names that identify the layout.
    candidates: tuple[dict[str, str], ...]
    convert: Callable[[Mapping[str, Any], dict[str, str], str], Sample]

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional

    def describe(self) -> str:
        names = " + ".join(self.required)
        alternatives = [" + ".join(c.values()) for c in self.candidates if list(c.values()) != list(self.required)]
        if alternatives:
            names += f" (or {', '.join(alternatives)})"
        return f"{self.name}: {names}" + (f"; optional {', '.join(self.optional)}" if self.optional else "")

    def match(self, columns: list[str], fixed: dict[str, str]) -> dict[str, str] | None:
        """The field -> column mapping for these columns, keeping ``fixed`` entries; None if it doesn't fit."""
        by_lower = {column.lower(): column for column in columns}
        for candidate in self.candidates:
            mapping = {f: by_lower[c] for f, c in candidate.items() if c in by_lower and f not in fixed}
            mapping.update(fixed)
            if all(f in mapping for f in self.required):
                break
        else:
            return None
        for field in self.optional:
            column = by_lower.get(field)
            if field not in mapping and column is not None and column not in mapping.values():
                mapping[field] = column
        return mapping


# --- reading fields --------------------------------------------------------------------------


def _text(row: Mapping[str, Any], column: str | None, *, required: bool) -> str:
    """A string field; a required one must be non-blank. Problems raise RowSkip, naming the column."""
    value = row.get(column) if column is not None else None
    if value is None:
        if required:
            raise RowSkip(f"missing {column!r}")
        return ""
    if not isinstance(value, str):
        raise RowSkip(f"{column!r} is not text (it is {type(value).__name__})")
    if required and not value.strip():
        raise RowSkip(f"empty {column!r}")
    return value


def _list(row: Mapping[str, Any], column: str, *, required: bool) -> list:
    """A list field; in CSV files lists arrive as JSON strings, which are decoded."""
    value = row.get(column)
    if value is None or value == "":
        if required:
            raise RowSkip(f"missing {column!r}")
        return []
    if isinstance(value, str):
        try:
            value = loads(value)
        except json.JSONDecodeError:
            raise RowSkip(f"{column!r} is not a list") from None
        except TooDeep:
            raise RowSkip(f"{column!r} is nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not isinstance(value, (list, tuple)):
        raise RowSkip(f"{column!r} is not a list")
    return list(value)


def _with_system(row: Mapping[str, Any], mapping: dict[str, str], messages: list[dict[str, str]]) -> list[dict]:
    """Put the row's system column (if any and not blank) first, unless the turns already have one."""
    system = _text(row, mapping.get("system"), required=False)
    if system.strip() and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _conversation(where: str, messages: list[dict[str, str]], untrained: frozenset[int] = frozenset()) -> Sample:
    """Check a conversation can be trained on; trailing turns after the last trained answer teach nothing.

    ``untrained``: indices in ``messages`` of the assistant turns with loss weight 0.
    """
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise RowSkip("no assistant turn")
    if roles[0] == "assistant":
        raise RowSkip("conversation starts with an assistant turn, before any prompt")
    trained = [i for i, role in enumerate(roles) if role == "assistant" and i not in untrained]
    if not trained:
        raise RowSkip("every assistant turn has loss weight 0")
    end = trained[-1] + 1
    return Sample(where=where, messages=tuple(messages[:end]), untrained=frozenset(i for i in untrained if i < end))


def _turn_content(turn: Mapping[str, Any]) -> str:
    content = turn["content"] if "content" in turn else turn.get("value")
    if content is None and turn.get("tool_calls"):
        return json.dumps(turn["tool_calls"], ensure_ascii=False)
    if isinstance(content, list):  # content parts, as OpenAI writes them
        return "\n".join(_part_text(part) for part in content)
    if not isinstance(content, str):
        raise RowSkip("a turn's content is missing or not text")
    return content


def _part_text(part: Any) -> str:
    """The text of one content part: a string, or ``{"type": "text"}`` with its ``text`` or ``value``."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RowSkip(f"a turn has non-text content ({type(part).__name__})")
    if part.get("type") != "text":
        raise RowSkip(f"a turn has non-text content ({part.get('type')})")
    text = part.get("text", part.get("value"))
    if not isinstance(text, str):
        raise RowSkip("a turn has a text part without a 'text' or 'value' string")
    return text


def _is_trained(turn: Mapping[str, Any]) -> bool:
    """A turn's loss weight (OpenAI's ``weight``, LLaMA-Factory's ``loss_weight``): 1 or absent trains it.

    Labels can only train a token or not, so a weight between 0 and 1 cannot be honoured; such a
    row is skipped rather than trained as if the weight were 1.
    """
    key = "weight" if "weight" in turn else "loss_weight"
    weight = turn.get(key, 1)
    if not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise RowSkip(f"a turn's {key!r} is not 0 or 1")
    return weight == 1


# --- the layouts -----------------------------------------------------------------------------


def _alpaca(row: Mapping[str, Any], mapping: dict[str, str], where: str) -> Sample:
    messages = []
    for pair in _list(row, mapping["history"], required=False) if "history" in mapping else []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) and t.strip() for t in pair)):
            raise RowSkip(f"{mapping['history']!r} is not a list of [question, answer] pairs")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction = _text(row, mapping["instruction"], required=True)
    extra = _text(row, mapping.get("input"), required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _text(row, mapping["output"], required=True)},
    ]
    return _conversation(where, _with_system(row, mapping, messages))


def _turns(row: Mapping[str, Any], mapping: dict[str, str], where: str) -> Sample:
    column = mapping.get("conversations") or mapping["messages"]
    messages, untrained = [], set()
    for turn in _list(row, column, required=True):
        if not isinstance(turn, dict):
            raise RowSkip(f"a turn in {column!r} is not an object")
        name = turn.get("role", turn.get("from"))
        role = ROLES.get(str(name).lower())
        if role is None:
            raise RowSkip(f"unknown role {name!r}")
        content = _turn_content(turn)
        if content.strip():
            # Only answers are trained, so a weight on another turn changes nothing.
            if role == "assistant" and not _is_trained(turn):
                untrained.add(len(messages))
            messages.append({"role": role, "content": content})
        elif role != "system":  # an empty system prompt is simply no system prompt
            raise RowSkip("a turn is empty")
    with_system = _with_system(row, mapping, messages)
    shift = len(with_system) - len(messages)  # a system turn put first moves every index
    return _conversation(where, with_system, frozenset(i + shift for i in untrained))


def _prompt_completion(row: Mapping[str, Any], mapping: dict[str, str], where: str) -> Sample:
    messages = [
        {"role": "user", "content": _text(row, mapping["prompt"], required=True)},
        {"role": "assistant", "content": _text(row, mapping["completion"], required=True)},
    ]
    return _conversation(where, _with_system(row, mapping, messages))


def _raw_text(row: Mapping[str, Any], mapping: dict[str, str], where: str) -> Sample:
    return Sample(where=where, text=_text(row, mapping["text"], required=True))


_PROMPT_COMPLETION_PAIRS = [("prompt", "completion"), ("question", "answer"), ("input", "output"), ("query", "response")]

# In detection order: the most specific layouts first (an alpaca file also has an "input" and an
# "output" column, and many files carry a pre-rendered "text" column next to their real fields).
FORMATS: dict[str, Format] = {
    f.name: f
    for f in [
        Format("sharegpt", ("conversations",), ("system",), ({"conversations": "conversations"},), _turns),
        Format("openai", ("messages",), ("system",), ({"messages": "messages"},), _turns),
        Format("alpaca", ("instruction", "output"), ("input", "system", "history"),
               ({"instruction": "instruction", "output": "output"},), _alpaca),
        Format("prompt_completion", ("prompt", "completion"), ("system",),
               tuple({"prompt": p, "completion": c} for p, c in _PROMPT_COMPLETION_PAIRS), _prompt_completion),
        Format("text", ("text",), (), ({"text": "text"}, {"text": "content"}), _raw_text),
    ]
}


def resolve_format(
    columns: list[str], source: str, format: str | None = None, mapping: Mapping[str, str] | None = None
) -> tuple[Format, dict[str, str]]:
    """Pick the layout and the field -> column mapping for a dataset with these ``columns``.

    ``format`` (a name in ``FORMATS``, or None/"auto") and ``mapping`` (field -> column) override
    detection. Every failure is a :class:`DataError` that lists the columns and what would fit.
    """
    fixed = dict(mapping or {})
    if format in (None, "", "auto"):
        candidates = [f for f in FORMATS.values() if set(fixed) <= set(f.fields)] if fixed else list(FORMATS.values())
        if not candidates:
            raise DataError(f"No layout has all the fields {', '.join(fixed)}. {_layouts_help()}")
    elif format in FORMATS:
        candidates = [FORMATS[format]]
    else:
        raise DataError(f"Unknown format {format!r}; choose one of: {', '.join(FORMATS)} (or auto).")
    for field, column in fixed.items():
        if column not in columns:
            raise DataError(
                f"The column {column!r} (mapped to {field!r}) is not in {source}. Its columns are: {_listing(columns)}."
            )
    for fmt in candidates:
        unknown = set(fixed) - set(fmt.fields)
        if unknown:
            raise DataError(
                f"{', '.join(sorted(unknown))} {'is not a field' if len(unknown) == 1 else 'are not fields'} "
                f"of the {fmt.name} format; its fields are {', '.join(fmt.fields)}."
            )
        found = fmt.match(columns, fixed)
        if found is not None:
            return fmt, found
    if len(candidates) == 1:
        fmt = candidates[0]
        missing = [f for f in fmt.required if f not in fixed]
        raise DataError(
            f"{source} does not fit the {fmt.name} format: no column found for {', '.join(missing)}. "
            f"Its columns are: {_listing(columns)}. Map the fields to columns by hand, e.g. "
            f"{format_mapping({field: '<column>' for field in missing})}."
        )
    raise DataError(
        f"Could not recognise the layout of {source}. Its columns are: {_listing(columns)}. "
        f"{_layouts_help()}{_suggestions(columns)}"
    )


def parse_mapping(text: str | None) -> dict[str, str] | None:
    """A column mapping typed by a person -> ``{field: column}`` (None when empty).

    ``"prompt=Frage,completion=Antwort"`` (commas or line breaks between pairs, spaces around them
    ignored) or a JSON object; :func:`format_mapping` writes it.
    """
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"The column mapping is not valid JSON: {err.msg} (column {err.colno}).") from err
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise DataError('The column mapping must look like {"prompt": "question", "completion": "answer"}.')
        return {str(k).strip(): v.strip() for k, v in mapping.items()}
    mapping = {}
    for part in text.replace("\n", ",").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise DataError(f"Cannot read {part.strip()!r} in the column mapping: write field=column, "
                            f"e.g. {format_mapping({'prompt': 'question', 'completion': 'answer'})}.")
        field, column = (s.strip() for s in part.split("=", 1))
        if not field or not column:
            raise DataError(f"Cannot read {part.strip()!r} in the column mapping: both sides of = are needed.")
        mapping[field] = column
    return mapping


def format_mapping(mapping: Mapping[str, str]) -> str:
    """A mapping as a person types it (``--data-mapping``, the studio's column mapping box).

    ``field=column,field=column``; a JSON object when a column name cannot be written that way
    (a comma or line break in it, or spaces around it), since :func:`parse_mapping` reads both.
    """
    columns = mapping.values()
    if any("," in c or "\n" in c or c != c.strip() for c in columns):
        return json.dumps(dict(mapping), ensure_ascii=False)
    return ",".join(f"{field}={column}" for field, column in mapping.items())


def _listing(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns) if columns else "(none: the rows are not objects)"


def _layouts_help() -> str:
    return "Supported layouts: " + " | ".join(f.describe() for f in FORMATS.values()) + "."


def _suggestions(columns: list[str]) -> str:
    """Concrete mappings the user could pick for these columns (each alone picks its layout)."""
    options = []
    if len(columns) >= 2:
        options.append(f"{format_mapping({'prompt': columns[0], 'completion': columns[1]})} (prompt_completion layout)")
    if columns:
        options.append(f"{format_mapping({'text': columns[0]})} (text layout)")
    return f" Possible column mappings: {'; '.join(options)}." if options else ""
