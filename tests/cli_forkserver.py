"""A preloaded `sdray` for the docs chains: one server process imports torch, diffusers, transformers and peft
once, and each `sdray` command is a process forked from it that runs `python -m pipelines.cli` as usual.

Every process that loads a model spends ~10 s of CPU importing those libraries, and the docs chains run ~20
such commands on two cores; only that import is shared. Each command is still its own process with its own
arguments, environment, working directory, standard streams, signals and exit status; ``sdray`` on a chain's
PATH is this file's light client (standard library only), which hands its streams to the server over a Unix
socket (SCM_RIGHTS), forwards SIGTERM/SIGINT/SIGHUP to the command and exits with its status. Ray is not
preloaded: its constants read the environment when imported, and each command brings its own environment.

    python cli_forkserver.py serve SOCKET     # prints "ready" once the libraries are imported
    python cli_forkserver.py run SOCKET ARGS  # what the `sdray` shim runs
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import signal
import socket
import struct
import sys

PRELOAD = ("torch", "diffusers", "transformers", "peft", "sdray.models.components")
_HEADER = struct.Struct("!Q")  # length of the JSON request that follows the streams


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("client went away")
        data += chunk
    return data


def _exit_code(code: object) -> int:
    """What Python's exit makes of ``SystemExit(code)``."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _run_command(request: dict, fds: list[int]) -> None:
    """In the forked command process: become `python -m pipelines.cli ARGS` in the client's cwd and env, and end
    as Python ends (exit code, traceback, death by SIGINT on an uncaught KeyboardInterrupt, atexit handlers),
    without tearing down the preloaded modules one by one (~1 s)."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = [request["argv0"], *request["args"]]
    sys.path[0] = request["cwd"]  # as `python -m` puts the working directory first
    code, interrupted = 0, False
    try:
        runpy.run_module("pipelines.cli", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        interrupted = True
        sys.excepthook(*sys.exc_info())
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _handle(conn: socket.socket) -> None:
    """In a child of the server: start the command, tell the client its pid, then its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server ignores it; waitpid needs it back
    header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
    (size,) = _HEADER.unpack(header)
    request = json.loads(_read_exactly(conn, size))
    pid = os.fork()
    if pid == 0:
        conn.close()
        _run_command(request, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def serve(path: str) -> None:
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # handlers exit on their own; no zombies to reap
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    sys.stderr.flush()
    while True:
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            _handle(conn)
        conn.close()


def client_command(path: os.PathLike | str) -> list[str]:
    """The command line of the `sdray` shim for the server at ``path`` (arguments follow it)."""
    return [sys.executable, "-S", os.path.abspath(__file__), "run", str(path)]


def run(path: str, args: list[str]) -> int:
    """The `sdray` shim: run ``args`` in a process forked from the server; returns its exit code."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    payload = json.dumps(
        {"argv0": "sdray", "args": args, "env": dict(os.environ), "cwd": os.getcwd()}
    ).encode()
    socket.send_fds(conn, [_HEADER.pack(len(payload))], [0, 1, 2])
    conn.sendall(payload)
    replies = conn.makefile("rb")
    pid = int(replies.readline())
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: os.kill(pid, number))
    status = replies.readline()
    if not status:
        raise SystemExit(f"sdray fork server: no exit status for pid {pid}")
    code = int(status)
    if code < 0:  # killed by a signal: die the same way, as a shell reports it
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    role, socket_path, *rest = sys.argv[1:]
    if role == "serve":
        serve(socket_path)
    else:
        sys.exit(run(socket_path, rest))
