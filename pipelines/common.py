"""What every entry point shares: --config/--set flags, logging, and turning user errors into exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import traceback
from collections.abc import Callable

from sdray.config import dump_yaml
from sdray.console import Console, quiet_console
from sdray.errors import SdrayError
from sdray.pipeline_config import DEFAULT_CONFIG, Override, PipelineConfig, load_pipeline_config

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_BUG = 1
RESUME_HINT = "interrupted: only completed outputs were published; re-run the same command to resume"


class ConfigPrinted(Exception):
    """``--print-config`` was given: the resolved config is printed, nothing runs (exit 0)."""


def make_parser(prog: str, doc: str | None, *, print_config: bool = True) -> argparse.ArgumentParser:
    """A parser whose description is the entry point's docstring (the runbook), with the config flags
    (and ``--print-config`` for the entry points that resolve a pipeline config)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"YAML config file, or the name of a packaged one (tiny, sd15, ...); default {DEFAULT_CONFIG}",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.learning_rate=2e-4 (repeatable)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log at DEBUG level and show Ray's own output here"
    )
    if print_config:
        parser.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved config (the file, then --set, then the flags) as YAML and exit: checks "
            "the flags and values without starting Ray or reading any data",
        )
    return parser


def load_config(args: argparse.Namespace, extra: list[str] | None = None) -> PipelineConfig:
    """The validated config: file, then --set overrides, then ``extra`` (from dedicated flags).

    A bad value typed on the command line is blamed on its flag (``--set train.x``, ``--num-images``), not
    on the config file.
    """
    cfg = load_pipeline_config(args.config, [*cli_overrides(args), *(extra or [])])
    stop_if_printing(args, cfg)
    return cfg


def stop_if_printing(args: argparse.Namespace, cfg: PipelineConfig) -> None:
    """With ``--print-config``: print ``cfg`` as YAML and end the command (exit 0) before it does anything."""
    if getattr(args, "print_config", False):
        print(dump_yaml(cfg), end="")
        raise ConfigPrinted


def cli_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides, each knowing its flag for error messages."""
    return [Override(item, f"--set {item.partition('=')[0]}") for item in args.overrides]


def flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn dedicated flags (``--out`` ...) that were given into ``section.key=value`` overrides.

    Text and lists are JSON-quoted: a path `on` or a prompt `a photo: dog` stays the string typed, not
    YAML's bool or mapping.
    """
    return [
        Override(f"{key}={_as_yaml(getattr(args, attr))}", "--" + attr.replace("_", "-"))
        for attr, key in mapping.items()
        if getattr(args, attr) is not None
    ]


def _as_yaml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str | list) else str(value)


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(body: Callable[[], int | None], *, verbose: bool = False, interrupted: str = RESUME_HINT) -> int:
    """Run an entry point body: user errors -> one line on stderr and exit 2; Ctrl-C/SIGTERM -> 130.

    SIGTERM is turned into KeyboardInterrupt so atomic writers clean up their temp outputs. Unless
    ``verbose``, Ray's own output (its loggers, its C++ core's stderr, worker logs) goes to a log file whose
    path is printed at the end; the command's prints, sdray's log lines and errors stay on the terminal.
    ``interrupted`` is the line printed on Ctrl-C/SIGTERM.
    """
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    with quiet_console(enabled=not verbose) as console:
        handlers = _setup_logging(console, verbose)
        try:
            return _run_body(body, console, interrupted)
        finally:
            for handler in handlers:
                logging.getLogger().removeHandler(handler)


def _setup_logging(console: Console, verbose: bool) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if console.log_stream is None:  # verbose, or output captured by a caller (tests): all on stderr
        logging.basicConfig(format=fmt._fmt)  # a no-op when the root logger already has handlers
        return []
    to_file = logging.StreamHandler(console.log_stream)  # everything, for the record
    to_file.setFormatter(fmt)
    to_terminal = logging.StreamHandler(console.err)  # sdray's own progress lines and warnings
    to_terminal.setFormatter(fmt)
    to_terminal.addFilter(lambda record: record.name.startswith(("sdray", "pipelines")))
    for handler in (to_file, to_terminal):
        root.addHandler(handler)
    return [to_file, to_terminal]


def _run_body(body: Callable[[], int | None], console: Console, interrupted: str) -> int:
    try:
        return body() or 0
    except ConfigPrinted:
        return 0
    except SdrayError as exc:
        console.fail(f"error: {exc}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        console.fail(interrupted)
        return EXIT_INTERRUPTED
    except Exception:  # a bug: the traceback belongs on the terminal, not only in the log file
        console.fail(traceback.format_exc().rstrip())
        return EXIT_BUG
