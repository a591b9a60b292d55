"""`python -m lora_app generate ...` and `python -m lora_app export ...`.

generate prints only the completion on stdout (streamed as it is produced), so it composes with
pipes and scripts; progress bars, warnings and the tokens/s line go to stderr. Any bad input ends
with one line on stderr and exit code 2, never a traceback.

    python -m lora_app generate --model default --adapter runs/a/adapter --prompt "Hi"
    python -m lora_app generate --adapter A --adapter B --weights 0.7 0.3 --merge --prompt "Hi"
    python -m lora_app generate --raw --prompt "Once upon a time" --max-new-tokens 40
    python -m lora_app export --adapter runs/a/adapter --merged-out merged/ [--push-to-hub me/model]
    python -m lora_app export --adapter runs/a/adapter --zip-out a.zip
    python -m lora_app export --adapter runs/a --gguf-out export/a-q8_0.gguf --gguf-type q8_0
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from lora_app import hardware
from lora_app.data import PromptFormat, SystemPrompt
from lora_app.errors import AdapterLoadError, InferenceError, UserError
from lora_app.inference.devices import DEVICE_CHOICES
from lora_app.inference.engine import InferenceEngine, default_work_dir
from lora_app.inference.export import push_to_hub, refuse_existing, zip_adapter
from lora_app.inference.gguf_export import GGUF_TYPES
from lora_app.inference.template_check import run_conversations
from lora_app.inference.modes import Mode
from lora_app.inference.settings import GenerationSettings
from lora_app.inference.sources import resolve_source
from lora_app.lora import read_adapter
from lora_app.lora.config import QUANTIZATIONS
from lora_app.model_source import DEFAULT_MODEL

# --dtype takes the short names (fp32) and torch's (float32)
DTYPES = {**hardware.DTYPES, **{str(dtype).removeprefix("torch."): dtype for dtype in hardware.DTYPES.values()}}


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'default' (SmolLM2-135M-Instruct, offline), a local folder or a hub id")
    parser.add_argument("--adapter", action="extend", nargs="+", default=[], metavar="DIR",
                        help="an adapter folder, a run folder holding one, or a .zip (repeat for a mix)")
    parser.add_argument("--weights", action="extend", nargs="+", type=float, default=[], metavar="W",
                        help="mixing weight per --adapter, in order (default 1 each)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none")
    parser.add_argument("--device", default="auto", help=f"{', '.join(DEVICE_CHOICES)} or cuda:N; use cpu "
                        "while a training job holds the GPU")


def generate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_app generate",
                                     description="Generate a reply; prints only the completion on stdout.")
    _model_arguments(parser)
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the weights first")
    parser.add_argument("--prompt", required=True, help="the user message (or text to continue with --raw); "
                        "'-' reads it from stdin")
    parser.add_argument("--system", default=None, help="a system prompt (chat mode only; default: the one the "
                        "first --adapter was trained with)")
    parser.add_argument("--no-default-system-prompt", action="store_true",
                        help="without --system, leave out the chat template's default system prompt")
    parser.add_argument("--raw", action="store_true", help="plain text completion, no chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", *hardware.DTYPES), default="auto",
                        help="what the base's weights are held in; auto: the fastest on this machine "
                             "(bf16 weights on a CPU without native bf16, with prompts computed in fp32)")
    return parser


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_app export",
                                     description="Export a merged model folder and/or an adapter zip.")
    _model_arguments(parser)
    parser.add_argument("--merged-out", metavar="DIR", help="write the base with the adapters merged in here")
    parser.add_argument("--zip-out", metavar="FILE", help="write the (single) adapter as a zip here")
    parser.add_argument("--gguf-out", metavar="FILE", help="write the merged model as one GGUF file here (for "
                        "llama.cpp, LM Studio), with an Ollama Modelfile beside it; the chat templates are checked")
    parser.add_argument("--gguf-type", choices=tuple(GGUF_TYPES), default="q8_0", help="how the GGUF stores weights")
    parser.add_argument("--gguf-adapter-out", metavar="FILE", help="write the (single, plain LoRA) adapter alone as "
                        "a llama.cpp LoRA GGUF here, for `llama-server -m BASE.gguf --lora FILE`")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the merged weights (default: the model's)")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                        help="upload the merged folder (or the adapter folder) to this Hub repo; needs HF_TOKEN")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default private)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


class _Trimmed:
    """Writes streamed pieces with the reply's leading and trailing whitespace left out (the final
    text is then exactly ``Generation.text``), flushing as it goes."""

    def __init__(self, out):
        self.out, self.started, self.pending = out, False, ""

    def write(self, piece: str) -> None:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        body = (self.pending + piece).rstrip()
        self.pending = (self.pending + piece)[len(body):]
        if body:
            self.out.write(body)
            self.out.flush()


def _mode_weights(args) -> dict[str, float] | None:
    if args.weights and len(args.weights) != len(args.adapter):
        raise InferenceError(f"--weights gives {len(args.weights)} weight(s) for {len(args.adapter)} adapter(s); "
                             "give one per --adapter, in the same order.")
    return None if not args.weights else args.weights


def _adapter_folders(args) -> list:
    """Each --adapter as a folder (zips unpacked), checked before the model is loaded."""
    return [resolve_source(source, default_work_dir() / "unzipped") for source in args.adapter]


def _system(args, folders) -> SystemPrompt:
    """--system and --no-default-system-prompt as given, else what the first adapter was trained with."""
    if args.system is not None or args.no_default_system_prompt:
        return SystemPrompt.typed(args.system, not args.no_default_system_prompt)
    for folder in folders:
        trained = PromptFormat.load(folder)
        if trained is not None:
            return trained.system
    return SystemPrompt()


def _engine_base(args, folders, dtype: torch.dtype | None = None, for_export: bool = False):
    weights = _mode_weights(args)
    base = InferenceEngine(device=args.device, dtype=dtype).base(args.model, args.quantization, for_export=for_export)
    names = [base.load_adapter(folder) for folder in folders]
    if len(set(names)) != len(names):
        raise InferenceError("the same adapter was given twice.")
    mix = dict(zip(names, weights)) if weights else names
    return base, mix


def run_generate(args, out) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                  seed=args.seed)
    if args.merge and not args.adapter:
        raise InferenceError("--merge needs at least one --adapter to merge.")
    if args.weights and not args.adapter:
        raise InferenceError("--weights needs an --adapter for each weight.")
    if not prompt.strip():
        raise InferenceError("The prompt is empty: give some text with --prompt.")
    folders = _adapter_folders(args)
    base, mix = _engine_base(args, folders, None if args.precision == "auto" else hardware.DTYPES[args.precision])
    system = args.system if args.raw else _system(args, folders)  # raw refuses a system prompt
    stream = base.stream(prompt, system=system, raw=args.raw, settings=settings,
                         mode=Mode.of(mix, merged=args.merge))
    writer = _Trimmed(out)
    for piece in stream:
        writer.write(piece)
    out.write("\n")
    out.flush()
    g = stream.result
    print(f"[{g.new_tokens} tokens in {g.seconds:.2f} s, {g.tokens_per_s:.1f} tokens/s, mode {g.mode}, "
          f"stopped at {g.finish_reason}]", file=sys.stderr)
    return 0


def run_export(args, out) -> int:
    if not (args.merged_out or args.zip_out or args.gguf_out or args.gguf_adapter_out):
        raise InferenceError("nothing to export: give --merged-out DIR, --gguf-out FILE, --gguf-adapter-out FILE "
                             "and/or --zip-out FILE.")
    if not args.adapter:
        raise InferenceError("give the adapter to export with --adapter DIR.")
    if args.gguf_adapter_out and len(args.adapter) != 1:
        raise InferenceError("--gguf-adapter-out writes one adapter; give exactly one --adapter.")
    for out_file in (args.gguf_out, args.gguf_adapter_out):
        if out_file:
            refuse_existing(Path(out_file), args.overwrite)  # before minutes of loading and merging
    folders = _adapter_folders(args)
    written, push_folder = [], None
    if args.zip_out:
        if len(args.adapter) != 1:
            raise InferenceError("--zip-out packs one adapter; give exactly one --adapter (or use --merged-out).")
        try:
            read_adapter(folders[0])  # a corrupt adapter is refused here, not discovered by whoever unzips it
        except AdapterLoadError as err:
            raise InferenceError(f"Could not read the adapter in {folders[0]}: {err}") from err
        written.append(zip_adapter(folders[0], args.zip_out, overwrite=args.overwrite))
        push_folder = folders[0]
    if args.merged_out or args.gguf_out or args.gguf_adapter_out:
        base, mix = _engine_base(args, folders, for_export=True)
    if args.merged_out:
        dtype = DTYPES[args.dtype] if args.dtype else None
        written.append(base.export_merged(args.merged_out, mix, dtype=dtype, overwrite=args.overwrite))
        push_folder = written[-1]
    if args.gguf_out:
        name = Path(args.gguf_out).stem
        done = base.export_gguf(args.gguf_out, mix, PromptFormat.load(folders[0]), gguf_type=args.gguf_type,
                                conversations=run_conversations(folders[0]), name=name, overwrite=args.overwrite)
        written += [done.gguf] + ([done.modelfile] if done.modelfile else [])
        for line in [check.line() for check in done.checks] + done.notes:
            print(line, file=sys.stderr)
        if done.modelfile:
            print(f"Ollama: {done.ollama_command(name)}", file=sys.stderr)
    if args.gguf_adapter_out:
        written.append(base.export_adapter_gguf(args.gguf_adapter_out, list(mix)[0], overwrite=args.overwrite))
    for path in written:
        print(path, file=out)
    if args.push_to_hub:
        if push_folder is None:
            raise InferenceError("--push-to-hub uploads a merged folder or an adapter: add --merged-out or --zip-out.")
        print(push_to_hub(push_folder, args.push_to_hub, private=not args.public), file=out)
    return 0


def main(argv=None) -> int:
    """``argv[0]`` is the command (generate or export), as ``lora_app.__main__`` passes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("generate", "export"):
        print("usage: python -m lora_app {generate,export} [options]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    parser = generate_parser() if command == "generate" else export_parser()
    try:
        args = parser.parse_args(rest)
    except SystemExit as exit_:  # --help (0) or a usage error (2, already printed by argparse)
        return int(exit_.code or 0)
    out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):  # anything a library prints must not mix with the reply
            return run_generate(args, out) if command == "generate" else run_export(args, out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
