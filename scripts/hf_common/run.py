"""Run transformers' own common model tests against ZidongModel and ZidongForClassification.

    make hf-common          (or: .venv/bin/python scripts/hf_common/run.py [pytest arguments])

A development check, not part of CI. `ModelTesterMixin` and `ConfigTester` ship in the transformers *source
distribution* (tests/test_modeling_common.py, tests/test_configuration_common.py), not in the wheel. This script
downloads the source distribution of the installed transformers version once (from the package registry) into
build/hf-common/, unpacks its tests/ folder there as the package `hf_tests`, adds the stand-ins of standins/ for
the three modules that folder imports but the source distribution leaves out, installs `parameterized` (the
common tests import it) if missing, and runs test_zidong_common.py with pytest. The skips, each with its reason,
are listed in test_zidong_common.py and docs/model.md.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
BUILD = REPO_ROOT / "build" / "hf-common"


def fail(message: str) -> None:
    print(f"hf-common: {message}", file=sys.stderr)
    sys.exit(2)


def fetch_common_tests(version: str) -> Path:
    """build/hf-common/hf_tests: the tests/ folder of transformers==`version`'s source distribution, plus stand-ins."""
    package = BUILD / "hf_tests"
    stamp = package / ".version"
    if not (stamp.is_file() and stamp.read_text() == version):
        unpack_tests(version, package)
    for standin in (HERE / "standins").rglob("*.py"):  # every run: an edited stand-in takes effect at once
        target = package / standin.relative_to(HERE / "standins")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(standin, target)
    return package


def unpack_tests(version: str, package: Path) -> None:
    archive = BUILD / f"transformers-{version}.tar.gz"
    if not archive.is_file():
        BUILD.mkdir(parents=True, exist_ok=True)
        download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        if subprocess.run([*download, f"transformers=={version}", "--dest", str(BUILD)]).returncode != 0:
            fail(
                f"could not download the source distribution of transformers=={version} (pip's message above); "
                "it needs the package registry once, then build/hf-common/ keeps it"
            )
    shutil.rmtree(package, ignore_errors=True)
    prefix = f"transformers-{version}/tests/"
    with tarfile.open(archive) as source:
        members = [member for member in source.getmembers() if member.name.startswith(prefix) and member.isfile()]
        for member in members:
            member.name = member.name[len(prefix) :]
        source.extractall(package, members=members, filter="data")
    (package / "__init__.py").touch()
    (package / ".version").write_text(version)


def main(pytest_arguments: list[str]) -> int:
    version = importlib.metadata.version("transformers")
    fetch_common_tests(version)
    if importlib.util.find_spec("parameterized") is None:
        install = [sys.executable, "-m", "pip", "install", "--quiet", "parameterized"]
        if subprocess.run(install).returncode != 0:
            fail("could not install `parameterized` (pip's message above), which transformers' common tests import")
    print(f"transformers {version}: common model tests from its source distribution", flush=True)
    command = [
        sys.executable, "-m", "pytest", str(HERE / "test_zidong_common.py"),
        "-c", str(HERE / "pytest.ini"), "--rootdir", str(HERE), "-p", "no:cacheprovider", *pytest_arguments,
    ]  # fmt: skip
    environment = {"PYTHONPATH": f"{BUILD}:{REPO_ROOT}", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, **environment}).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
