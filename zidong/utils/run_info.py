"""What every run records in its output folder, so that any result can be traced to its exact setup.

`record_run(output_dir, config)` writes, on rank 0:

- `config.yaml`: the fully resolved config of this launch (rewritten atomically on every launch);
- `launches.jsonl`: one line appended per launch: time, host, command line, working directory, Python and
  key package versions, every installed distribution's version (`environment`) and how it compares with the
  lock of the checkout zidong runs from (`lock`: constraints.txt, which `make install` installs), the zidong git
  commit (and whether the tree had uncommitted changes), the launcher's world size, and the resolved config.
  Appending keeps the history of a run that was resumed many times.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from zidong import __version__
from zidong.config import to_dict, to_yaml
from zidong.errors import UserError
from zidong.utils.log import is_main_process

KEY_PACKAGES = (
    "torch", "torchaudio", "transformers", "accelerate", "deepspeed", "datasets", "tokenizers",
    "sentencepiece", "safetensors", "soundfile", "numpy",
)  # fmt: skip
CONFIG_FILE = "config.yaml"
LAUNCHES_FILE = "launches.jsonl"
LOCK_FILE = Path(__file__).resolve().parents[2] / "constraints.txt"  # in a checkout; absent from a wheel install


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a run's numbers depend on (None where one is not installed)."""
    versions: dict[str, str | None] = {}
    for name in KEY_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _canonical(name: str) -> str:
    """A distribution's name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def environment() -> dict[str, str]:
    """Every distribution installed in this interpreter's environment -> its version (zidong itself left out:
    its source is recorded as the git state)."""
    found = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name and _canonical(name) != "zidong":
            found[_canonical(name)] = distribution.version
    return dict(sorted(found.items()))


def lock_state(installed: dict[str, str], lock_file: Path = LOCK_FILE) -> dict[str, Any] | None:
    """How `installed` compares with a pip constraints file of `name==version` lines (None where there is none):
    `matches` when every locked package that is installed has its locked version; `differs` names those that do
    not (locked, installed), `not_locked` what is installed beyond the lock."""
    if not lock_file.is_file():
        return None
    locked = {}
    for line in lock_file.read_text(encoding="utf-8").splitlines():
        name, separator, version = line.split("#", 1)[0].strip().partition("==")
        if separator:
            locked[_canonical(name)] = version.strip()
    differs = {
        name: {"locked": version, "installed": installed[name]}
        for name, version in locked.items()
        if name in installed and installed[name] != version
    }
    return {
        "file": str(lock_file),
        "matches": not differs,
        "differs": differs,
        "not_locked": sorted(set(installed) - set(locked)),
    }


def git_state(folder: Path | None = None) -> dict[str, Any] | None:
    """The commit and dirtiness of the git checkout holding `folder` (zidong's own source by default)."""
    folder = folder or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def launch_record(config: Any, argv: list[str] | None = None) -> dict[str, Any]:
    """Everything `launches.jsonl` stores about one launch."""
    argv = list(sys.argv if argv is None else argv)
    return {
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "command": shlex.join(argv),
        "argv": argv,
        "cwd": os.getcwd(),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "zidong": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "environment": (installed := environment()),
        "lock": lock_state(installed),
        "git": git_state(),
        "config": to_dict(config),
    }


def record_run(output_dir: str | Path, config: Any, argv: list[str] | None = None) -> None:
    """Write `config.yaml` and append to `launches.jsonl` in `output_dir` (rank 0 only; others return)."""
    if not is_main_process():
        return
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        temporary = folder / f".{CONFIG_FILE}.tmp"
        temporary.write_text(to_yaml(config), encoding="utf-8")
        temporary.replace(folder / CONFIG_FILE)
        with open(folder / LAUNCHES_FILE, "a", encoding="utf-8") as launches:
            launches.write(json.dumps(launch_record(config, argv), ensure_ascii=False) + "\n")
    except OSError as err:
        raise UserError(
            f"cannot write the run record into output_dir {folder}: {err.strerror or err}; "
            "choose a folder you can write to (output_dir=...)"
        ) from None
