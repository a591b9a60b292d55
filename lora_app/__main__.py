"""`python -m lora_app {train,generate,export} ...`: everything the UI does, headless."""

import importlib
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "lora_app.training.cli",
        "generate": "lora_app.inference.cli",
        "export": "lora_app.inference.cli",
    }
    if not argv or argv[0] not in commands:
        print("usage: python -m lora_app {train,generate,export} [options]  (add --help to a command)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(commands[argv[0]])
    return module.main(argv)


if __name__ == "__main__":
    sys.exit(main())
