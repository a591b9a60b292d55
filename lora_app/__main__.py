"""`lora-app COMMAND ...` (or `python -m lora_app COMMAND ...`): the studio, and everything it does, headless.

A command's module is imported only when that command runs, so the list of commands (``--help``)
comes back at once, without loading torch or gradio.
"""

import importlib
import sys

from lora_app import allocator

# the environment a command's process starts again in (see ``allocator``): training on jemalloc,
# generation on huge pages, where the machine has them
ENVIRONMENTS = {"train": allocator.training_environment, "sweep": allocator.training_environment,
                "plan": allocator.training_environment, "generate": allocator.generation_environment,
                "studio": allocator.generation_environment}
# command -> (the module whose main(argv) runs it, argv starting with the command; what it does)
COMMANDS = {
    "train": ("lora_app.training.cli", "train a LoRA adapter (the run is recorded where the studio shows it)"),
    "sweep": ("lora_app.training.sweep", "train one adapter per combination of a few settings' values, and compare"),
    "plan": ("lora_app.training.plan", "measure what a run needs (peak memory, time) on a few real steps, and what "
                                       "fits instead"),
    "probes": ("lora_app.training.runs_cli", "list a run's probe answers at every step, with scores and ratings"),
    "promote": ("lora_app.training.runs_cli", "make one of a run's checkpoints its adapter for chat and exports"),
    "generate": ("lora_app.inference.cli", "generate a reply with a base model and adapters"),
    "export": ("lora_app.inference.cli", "write a merged model folder and/or an adapter zip, or push to the Hub"),
    "studio": ("lora_app.studio", "serve the studio in the browser (as `python app.py` does)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(["usage: lora-app COMMAND [options]   (or: python -m lora_app COMMAND [options])", "",
                      "commands:", *lines, "", "`lora-app COMMAND --help` lists a command's options."])


def main(argv=None) -> int:
    """``argv`` None: this process's own arguments (a training or generating command may then start
    the process again: see ``ENVIRONMENTS``); a list: run that command here, as it is."""
    program, argv = argv is None, list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if program and argv[0] in ENVIRONMENTS:
        allocator.relaunch(["-m", "lora_app", *argv], ENVIRONMENTS[argv[0]])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
