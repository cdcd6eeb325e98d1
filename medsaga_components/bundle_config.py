"""Glue between a bundle's configs and the package: finding the bundle folder, and refusing
misspelled keys on a bundle's command line.

``python -m monai.bundle run training --config_file train.json --shot 3`` adds a new key ``shot``
to the config and trains with the default ``shots``: MONAI accepts any override. A bundle run
checks its own command line instead (``check_bundle_command_line``), before anything is read or
written, and refuses a key that is neither one of ``monai.bundle run``'s own arguments nor an id
of the config files, suggesting the nearest key.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from monai.bundle import ConfigParser
from monai.bundle.scripts import create_workflow, run
from monai.bundle.workflows import ConfigWorkflow

ID_SEP = "#"


class UnknownConfigKeyError(KeyError):
    """A ``--key`` on the command line that the bundle's configs do not have."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _run_arguments() -> set[str]:
    """Names ``monai.bundle run`` takes itself (not config overrides)."""
    names: set[str] = set()
    for function in (run, create_workflow, ConfigWorkflow.__init__):
        names |= {p.name for p in inspect.signature(function).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return names - {"self", "kwargs", "override"}


def config_ids(config: Any, prefix: str = "") -> Iterable[str]:
    """Every id of a parsed config: ``key``, ``key#sub``, ``key#0``, ..."""
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        key_id = f"{prefix}{ID_SEP}{key}" if prefix else str(key)
        yield key_id
        yield from config_ids(value, key_id)


def check_override_keys(config_files: Sequence[str | Path], keys: Iterable[str]) -> None:
    """Raise ``UnknownConfigKeyError`` for the first of ``keys`` that the merged ``config_files``
    lack. A nested id (``a#b``) may add an argument to a component ``a`` that exists."""
    config = ConfigParser.load_config_files([str(f) for f in config_files])
    known = set(config_ids(config))
    allowed = _run_arguments()
    for key in keys:
        if key in allowed or key in known:
            continue
        parent = key.rsplit(ID_SEP, 1)[0] if ID_SEP in key else None
        if parent in known:
            continue
        suggestion = difflib.get_close_matches(key, sorted(k for k in known if ID_SEP not in k), n=1)
        hint = f"; did you mean --{suggestion[0]}?" if suggestion else ""
        raise UnknownConfigKeyError(
            f"unknown config key --{key} on the command line: {', '.join(str(f) for f in config_files)} "
            f"has no key {key!r}{hint} (expected a key of the config, e.g. --shots, --epochs, --dataset_dir)"
        )


def _flags(argv: Sequence[str]) -> dict[str, str | None]:
    """``--name value`` / ``--name=value`` pairs of a fire command line, by name."""
    flags: dict[str, str | None] = {}
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            continue
        name, equals, value = token[2:].partition("=")
        if not equals:
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = following if following is not None and not following.startswith("--") else None
        flags[name.replace("-", "_") if name in ("config-file", "args-file") else name] = value
    return flags


def _config_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        return [str(v) for v in ast.literal_eval(value)]
    return [v.strip() for v in value.split(",")] if "," in value else [value]


def check_bundle_command_line(argv: Sequence[str] | None = None) -> None:
    """When this process is ``python -m monai.bundle run ...``, refuse misspelled override keys.

    Does nothing in any other process (a notebook, a test, MONAI Label), whose command line is
    not a bundle's.
    """
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") or "run" not in argv[1:3]:
        return
    flags = _flags(argv[1:])
    if not flags.get("config_file"):
        return  # an args_file run: MONAI reads the files from it
    check_override_keys(_config_files(flags["config_file"]), [k for k in flags if k != "config_file"])


def find_bundle_root(name: str) -> str:
    """The bundle folder, whether a command runs inside it or at the repository root.

    Bundle configs use this as the default ``bundle_root``; ``--bundle_root`` overrides it.
    """
    cwd = Path.cwd()
    for candidate in (cwd, cwd / "bundles" / name):
        if (candidate / "configs" / "metadata.json").is_file() and candidate.name == name:
            return str(candidate)
    if (cwd / "configs" / "metadata.json").is_file():
        return str(cwd)
    raise FileNotFoundError(f"cannot find the {name} bundle from {cwd}: run from the repository root or the "
                            f"bundle folder, or pass --bundle_root")
