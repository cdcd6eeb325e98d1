"""The ``medsaga`` command line (built with fire). Each command lives beside the code it runs.

A failing command prints one line, ``medsaga <command>: error: <what is wrong>``, and exits with
status 1; ``--debug`` (anywhere on the line) shows the Python traceback instead. A command's
module is imported only when that command runs, so ``medsaga --help`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import fire

DEBUG_FLAG = "--debug"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C


def main(argv: Sequence[str] | None = None) -> None:
    commands = {
        "demo-data": _lazy("medsaga_components.data.demo", "write_demo_dataset"),
        "fewshot": _lazy("medsaga_components.data.fewshot", "fewshot_command"),
        "benchmark": _lazy("medsaga_components.benchmark", "benchmark_command"),
        "baseline": _lazy("medsaga_components.baselines", "baseline_command"),
        "plan": _lazy("medsaga_components.planner", "plan_command"),
        "plan-fit": _lazy("medsaga_components.planner", "plan_fit_command"),
        "prompt-sources": _lazy("medsaga_components.evaluation.prompt_sources", "prompt_sources_command"),
        "package": _lazy("medsaga_components.packaging", "package_command"),
    }
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args
    args = [a for a in args if a != DEBUG_FLAG]
    name = args[0] if args else None
    if name in commands:
        # The real function, so that fire sees its parameters: `--help`, a missing required argument
        # and an unknown flag are then answered by fire itself (usage text, exit status 2).
        commands[name] = commands[name].load()
    try:
        fire.Fire(commands, command=args, name="medsaga")
    except fire.core.FireExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"medsaga {name}: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 -- every failure becomes one sentence, not a traceback
        if debug:
            raise
        print(f"medsaga {name}: error: {_sentence(exc)}\n(run again with {DEBUG_FLAG} for the traceback)",
              file=sys.stderr)
        sys.exit(EXIT_ERROR)


def _sentence(exc: BaseException) -> str:
    """What went wrong, as the exception says it; its type too where the message alone is unclear
    (a KeyError's message is only the key)."""
    message = str(exc).strip()
    if isinstance(exc, KeyError) or not message:
        return f"{type(exc).__name__}: {message}".rstrip(": ")
    return message


def _lazy(module: str, attr: str) -> Callable:
    """A command whose module is imported only when it runs (keeps ``medsaga --help`` fast);
    ``.load()`` gives the real function."""
    import importlib

    def load() -> Callable:
        return getattr(importlib.import_module(module), attr)

    def command(*args, **kwargs):
        return load()(*args, **kwargs)

    command.__doc__ = f"See {module}.{attr}."
    command.__name__ = attr
    command.load = load
    return command


if __name__ == "__main__":
    main()
