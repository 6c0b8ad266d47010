"""The commands of README.md and docs/*.md, as tests/docs_runner.py runs them. Rules for doc writers:

1. Commands live in fences tagged ``bash``; every line is one command (a trailing backslash continues it,
   ``#`` starts a comment). A line starting with ``sdray `` in any other fence is an error: tag the fence.
2. ``<!-- docs-test: skip REASON -->`` on the line just above a fence leaves the whole block out;
   ``<!-- docs-test: print-config REASON -->`` runs its ``sdray`` commands with ``--print-config`` (flags and
   config values checked, nothing run; for blocks whose work another test already does) and its other
   commands as written. The reason is required.
3. Files run in DOC_ORDER (README.md, then the guides in reading order). A docs/*.md file missing from
   DOC_ORDER is an error. CHAINS split DOC_ORDER into runs that need nothing of each other, each from its
   own fresh directory and in a test module of its own (tests/test_docs_*.py: they run side by side); a
   command may use what an earlier command of its chain wrote. A chain that starts from the result of
   another gets it from PREREQUISITES.
4. NOT_RUN lists, with reasons, the commands that cannot run on a test machine; nothing else is skipped.
5. ``sdray serve``: the first one is started, asked for one image and stopped with SIGTERM; the others run
   with ``--check`` (config, model directory and port). Every ``sdray serve`` gets a free ``--port``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC_ORDER = (
    "README.md",
    "docs/preprocess.md",
    "docs/train.md",
    "docs/finetune.md",
    "docs/serve.md",
    "docs/demo.md",
    "docs/cluster.md",
    "docs/config.md",
)
CHAINS: dict[str, tuple[str, ...]] = {
    "quickstart": ("README.md", "docs/train.md"),
    "preprocess": ("docs/preprocess.md",),
    "finetune-serve": (
        "docs/finetune.md",
        "docs/serve.md",
        "docs/demo.md",
        "docs/cluster.md",
        "docs/config.md",
    ),
}
PREREQUISITES: dict[str, dict[str, str]] = {
    "finetune-serve": {"runs/tiny/model": "README.md's quick start (sdray train ... --out runs/tiny)"},
}
"""Per chain: path -> what writes it in the docs. The test provides it (the tiny preset's architecture)."""
MARK = re.compile(r"<!--\s*docs-test:\s*(skip|print-config)\b\s*(.*?)\s*-->")
PRINT_CONFIG = "print-config"

# (regular expression searched in the command, why it cannot run in a test)
NOT_RUN: tuple[tuple[str, str], ...] = (
    (r"^make\b", "the Makefile's targets are the whole suite and the 15-minute demo"),
    (r"^(ray|serve)\b", "Ray's own CLIs act on a cluster (`ray up`, `ray job submit`, `serve deploy`)"),
    (r"^export\b", "sets a shell variable for the cluster commands that follow"),
    (r"s3://", "needs object storage with data (tests/test_s3.py covers s3:// against a local S3)"),
    (r"--config sd15\b", "SD 1.5 sizes: minutes per step on a CPU (tests/test_models.py checks the shapes)"),
    (r"scripts/local_cluster\.py", "starts a multi-node Ray cluster (tests/test_multinode.py)"),
    (r"^sdray demo\b", "minutes even with --quick (tests/test_demo.py runs it small)"),
    (r"^curl\b", "needs a server on port 8000; the API is covered by tests/test_serve.py"),
    (r"^(kubectl|docker)\b", "needs a Kubernetes cluster and an image registry (deploy/kuberay)"),
)


@dataclass(frozen=True)
class DocCommand:
    where: str
    """file:line of the command's first line."""
    command: str
    mode: str = "run"
    """"run", or PRINT_CONFIG: a `sdray` command of a print-config block, to run with --print-config."""

    @property
    def runnable(self) -> str:
        """The command as the runner runs it."""
        if self.mode == PRINT_CONFIG and re.match(r"^(\w+=\S*\s+)*sdray\s", self.command):
            return self.command + " --print-config"
        return self.command


class DocsError(Exception):
    """A docs file breaks the rules above."""


def _fences(path: Path) -> list[tuple[int, str, str, list[tuple[int, str]]]]:
    """(line number of the fence, its tag, "run"/"skip"/PRINT_CONFIG, [(line number, text)]) per fenced block."""
    blocks, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^\s*```(\S*)", lines[i])
        if not match:
            i += 1
            continue
        above = MARK.search(lines[i - 1]) if i else None
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not re.match(r"^\s*```\s*$", lines[i]):
            body.append((i + 1, lines[i]))
            i += 1
        if above is not None and not above.group(2):
            raise DocsError(f"{path.name}:{start - 1}: docs-test: {above.group(1)} needs a reason")
        blocks.append((start, match.group(1), above.group(1) if above else "run", body))
        i += 1
    return blocks


def commands_of(path: Path, name: str) -> list[DocCommand]:
    """The commands of one file, blocks marked skip left out."""
    found = []
    for start, tag, mode, body in _fences(path):
        if tag != "bash":
            stray = [n for n, text in body if text.lstrip().startswith("sdray ")]
            if stray:
                raise DocsError(f"{name}:{stray[0]}: a sdray command in a ```{tag} fence: tag it ```bash")
            continue
        if mode == "skip":
            continue
        pending: list[str] = []
        first = start
        for number, text in body:
            if not pending:
                first = number
            pending.append(text.rstrip().removesuffix("\\"))
            if text.rstrip().endswith("\\"):
                continue
            text, pending = _without_comment(" ".join(pending)), []
            if text:  # bash runs the text itself: quotes and pipes as written
                found.append(DocCommand(f"{name}:{first}", text, mode))
    return found


def _without_comment(text: str) -> str:
    """``text`` up to its first ``#`` comment outside quotes, whitespace collapsed."""
    for match in re.finditer(r"(^|\s)#", text):
        head = text[: match.start()]
        try:
            shlex.split(head)
        except ValueError:  # inside quotes
            continue
        text = head
        break
    return " ".join(text.split())


def chain_commands(chain: str, root: Path = ROOT) -> list[DocCommand]:
    """The commands of one of CHAINS, in DOC_ORDER."""
    names = set(CHAINS[chain])
    return [c for c in all_commands(root) if c.where.partition(":")[0] in names]


def all_commands(root: Path = ROOT) -> list[DocCommand]:
    """Every command of README.md and docs/*.md, in DOC_ORDER."""
    unlisted = sorted(
        str(p.relative_to(root))
        for p in (root / "docs").glob("*.md")
        if str(p.relative_to(root)) not in DOC_ORDER
    )
    if unlisted:
        raise DocsError(f"add {', '.join(unlisted)} to DOC_ORDER in tests/docs_commands.py")
    return [c for name in DOC_ORDER if (root / name).exists() for c in commands_of(root / name, name)]


def why_not_run(command: str) -> str | None:
    """The NOT_RUN reason that applies to ``command`` (env assignments in front ignored), else None."""
    bare = re.sub(r"^(\w+=\S*\s+)+", "", command)
    return next((why for pattern, why in NOT_RUN if re.search(pattern, bare)), None)
