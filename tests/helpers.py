"""Helpers for tests: the repository root and running the CLI in a fresh process as a user would."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run `python -m zidong ARGS` in a fresh process; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "zidong", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port nothing listens on now. Every multi-process launch in the tests takes one: tests run in parallel
    (pytest-xdist), and two launches on torchrun's default port 29500 would join each other's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int = 2) -> list[str]:
    """`python -m torch.distributed.run` for `processes` ranks on a port of their own (see `free_port`)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_port", str(free_port()),
    ]  # fmt: skip


def accelerate_launch(config: Path, processes: int) -> list[str]:
    """`python -m accelerate.commands.launch` with an Accelerate config file, on a port of its own."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--num_processes", str(processes), "--main_process_port", str(free_port()),
    ]  # fmt: skip


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a lost node would. Not `os.killpg`: torchrun (and
    `accelerate launch`) start every rank in a session of its own, so the ranks outlive their launcher's group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += children.get(current, [])
    for member in tree:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile
            os.kill(member, signal.SIGKILL)


def resumed_step(output: str) -> int:
    """The step a relaunched run says it resumed from (`resumed from ... (step N)`)."""
    import re

    match = re.search(r"resumed from \S+ \(step (\d+)\)", output)
    assert match, f"the run did not resume:\n{output[-3000:]}"
    return int(match.group(1))


@contextlib.contextmanager
def serve_folder(root: Path, refuse: bool | str = False, token: str | None = None) -> Iterator[tuple[str, list[str]]]:
    """Serve `root` over HTTP on the loopback interface; yields its URL and the list of paths requested so far.
    `refuse`: answer 403 Forbidden to every request (True) or to those for paths ending so (a string). `token`:
    answer 401 to every request without the header `Authorization: Bearer <token>`."""
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def refused(self) -> bool:
            if token is not None and self.headers.get("Authorization") != f"Bearer {token}":
                self.send_error(401)
                return True
            if refuse is True or (isinstance(refuse, str) and self.path.endswith(refuse)):
                self.send_error(403)
                return True
            return False

        def do_GET(self) -> None:
            requested.append(self.path)
            if not self.refused():
                super().do_GET()

        def do_HEAD(self) -> None:
            if not self.refused():
                super().do_HEAD()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
