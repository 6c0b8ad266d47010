"""What every entry point shares: --config/--set flags, logging, and turning user errors into exit code 2."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable

from sdray.errors import SdrayError
from sdray.pipeline_config import DEFAULT_CONFIG, PipelineConfig, load_pipeline_config

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def make_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the entry point's docstring (the runbook), with the config flags."""
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
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return parser


def load_config(args: argparse.Namespace, extra: list[str] | None = None) -> PipelineConfig:
    """The validated config: file, then --set overrides, then ``extra`` (from dedicated flags)."""
    return load_pipeline_config(args.config, [*args.overrides, *(extra or [])])


def flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    """Turn dedicated flags (``--out`` ...) that were given into ``section.key=value`` overrides."""
    return [
        f"{key}={getattr(args, attr)}" for attr, key in mapping.items() if getattr(args, attr) is not None
    ]


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(body: Callable[[], int | None], *, verbose: bool = False) -> int:
    """Run an entry point body: user errors -> one line on stderr and exit 2; Ctrl-C/SIGTERM -> 130.

    SIGTERM is turned into KeyboardInterrupt so atomic writers clean up their temp outputs.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        return body() or 0
    except SdrayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(
            "interrupted: only completed outputs were published; re-run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
