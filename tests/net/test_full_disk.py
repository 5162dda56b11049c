"""A full disk under the server's state directory is an error with a message, never a SIGBUS."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import cli_env


@contextlib.contextmanager
def _small_fs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted at ``where`` (root only), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=False)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


_STAGE = """
import os
import sys
from pathlib import Path
from fedloom.core.errors import FedloomError
from fedloom.net.state import NetState

root = Path(sys.argv[1])
with NetState(root / "state.sqlite") as net:
    fd = os.open(root / "filler", os.O_WRONLY | os.O_CREAT)  # fill the file system up ...
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    os.truncate(root / "filler", os.stat(root / "filler").st_size - 64 * 1024)  # ... but 64 KiB
    try:
        net.stage(1, 0, bytes(range(256)) * 2048)  # 512 KiB into ~64 KiB of room
    except FedloomError as exc:
        print("refused:", exc)
        sys.exit(0)
    print("stored")
"""


def test_staging_an_update_on_a_full_disk_is_an_error_not_a_sigbus(tmp_path: Path) -> None:
    with _small_fs(tmp_path / "fs", "2m") as root:
        done = subprocess.run(
            [sys.executable, "-c", _STAGE, str(root)],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "refused: the server cannot store the update (524288 bytes)" in done.stdout
    assert "No space left on device" in done.stdout
