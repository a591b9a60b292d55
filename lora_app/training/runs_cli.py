"""`lora-app probes RUN` and `lora-app promote RUN STEP`: a run's probe answers, and which of its
adapters chat, compare and exports use, from the command line as in the studio's Runs tab.

RUN is a run id, a run name or a run folder. Torch-free: both read and write only the run store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lora_app.errors import NoSuchRun, UserError
from lora_app.training.probes import by_prompt, step_label
from lora_app.training.rating import ratings
from lora_app.training.store import Run, RunStore


def find_run(store: RunStore, key: str) -> Run:
    """The run named by ``key``: its id, its name (the newest of that name) or its folder."""
    if Path(key).is_dir():
        found = store.find_by_output(key)
        if found:
            return found
    for run in store.list():
        if key in (run.id, run.name):
            return run
    raise NoSuchRun(key, store.root)


def probes_text(store: RunStore, run: Run) -> str:
    """Each probe prompt with the run's answer at every step, scored where a reference exists, and the
    blind-vote rating of each step that has votes."""
    answers = store.probe_answers(run.id)
    if not answers:
        return f"Run {run.name} has no probe answers: train with --probe-prompts FILE or --probe-rows N."
    rated = {step: rating for (run_id, step), rating in ratings(store.votes(run.id)).items()}
    lines = [f"# {run.name}: probe answers ({run.status})"]
    for prompt, timeline in by_prompt(answers).items():
        lines += ["", f"## {prompt}"]
        if timeline[0]["reference"] is not None:
            lines.append(f"   reference: {timeline[0]['reference']}")
        for a in timeline:
            extra = [f"F1 {a['score']:.2f}"] if a["score"] is not None else []
            extra += [f"rating {rated[a['step']]:.0f}"] if a["step"] in rated else []
            shown = a["answer"].replace("\n", " ") or "(empty)"
            lines.append(f"   {step_label(a['step']):>14}: {shown}" + (f"   [{', '.join(extra)}]" if extra else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("probes", "promote") else "probes"
    p = argparse.ArgumentParser(prog=f"python -m lora_app {command}",
                                description="List a run's probe answers at every step." if command == "probes" else
                                "Make a checkpoint the run's adapter for chat, compare and exports ('final': "
                                "the final adapter again).")
    p.add_argument("run", help="run id, run name or run folder")
    if command == "promote":
        p.add_argument("step", help="a step with a checkpoint, or 'final'")
    else:
        p.add_argument("--json", action="store_true", help="the answers as JSON lines")
    p.add_argument("--store", help="run store folder (default: the app's runs folder)")
    args = p.parse_args(argv)
    store = RunStore(args.store)
    try:
        run = find_run(store, args.run)
        if command == "probes":
            if args.json:
                for answer in store.probe_answers(run.id):
                    print(json.dumps(answer))
            else:
                print(probes_text(store, run))
            return 0
        if args.step != "final" and not args.step.isdigit():
            raise UserError(f"the step must be a whole number or 'final', not {args.step!r}")
        run = store.promote(run.id, None if args.step == "final" else int(args.step))
        print(f"{run.name}: chat, compare and exports now use {run.adapter_path}")
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
