"""The ``medsaga`` command line (built with fire). Each command lives beside the code it runs."""

from __future__ import annotations

import fire


def main() -> None:
    fire.Fire(
        {
            "demo-data": _lazy("medsaga_components.data.demo", "write_demo_dataset"),
            "fewshot": _lazy("medsaga_components.data.fewshot", "fewshot_command"),
            "benchmark": _lazy("medsaga_components.benchmark", "benchmark_command"),
            "baseline": _lazy("medsaga_components.baselines", "baseline_command"),
        },
        name="medsaga",
    )


def _lazy(module: str, attr: str):
    """Import a command's module only when that command runs (keeps ``--help`` fast)."""
    import importlib

    def command(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    command.__doc__ = f"See {module}.{attr}."
    command.__name__ = attr
    return command


if __name__ == "__main__":
    main()
