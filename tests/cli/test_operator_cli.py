"""`fedloom --version`, shell completion, and error messages shown verbatim, as real processes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from tests.conftest import REPO, cli_env, fedloom_cmd, run_cli


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.stdout == f"fedloom {version}\n"


def _completion_env() -> dict[str, str]:
    # The shell is named on the command line rather than detected from the parent process.
    return {**cli_env(), "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}


def test_bash_completion_script_completes_commands_options_and_choices(tmp_path: Path) -> None:
    shown = subprocess.run(
        [*fedloom_cmd("--show-completion", "bash")],
        cwd=tmp_path, env=_completion_env(), capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    script = shown.stdout
    assert "complete -o default -F _fedloom_completion fedloom" in script
    assert "_FEDLOOM_COMPLETE=complete_bash" in script
    # Load the script into a real bash with `fedloom` on PATH and ask it for completions.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "fedloom"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fedloom "$@"\n', encoding="utf-8")
    shim.chmod(0o755)
    (tmp_path / "completion.bash").write_text(script, encoding="utf-8")

    def complete(*words: str) -> list[str]:
        line = " ".join(shlex.quote(w) for w in words)
        probe = (
            f"source {shlex.quote(str(tmp_path / 'completion.bash'))}; COMP_WORDS=({line}); "
            f"COMP_CWORD={len(words) - 1}; _fedloom_completion fedloom; printf '%s\\n' \"${{COMPREPLY[@]}}\""
        )
        env = {**cli_env(), "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
        out = subprocess.run(["bash", "--norc", "-c", probe], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        return [w for w in out.stdout.splitlines() if w]

    assert complete("fedloom", "ser") == ["server"]
    assert complete("fedloom", "client", "--log-f") == ["--log-format"]
    assert complete("fedloom", "server", "--log-format", "") == ["auto", "json", "text"]


def test_install_completion_writes_the_script_for_the_named_shell(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = {**_completion_env(), "HOME": str(home)}
    proc = subprocess.run([*fedloom_cmd("--install-completion", "bash")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    installed = (home / ".bash_completions" / "fedloom.sh").read_text(encoding="utf-8")
    assert "complete -o default -F _fedloom_completion fedloom" in installed
    assert "fedloom.sh" in (home / ".bashrc").read_text(encoding="utf-8")


def test_error_messages_keep_brackets(tmp_path: Path) -> None:
    bad_value = run_cli("partition", "--set", 'model.name="[client]"', cwd=tmp_path, check=False)
    assert bad_value.returncode == 2
    assert "model.name = '[client]': unknown model" in bad_value.stderr

    bad_key = run_cli("partition", "--set", "deploy.min_clients=5", cwd=tmp_path, check=False)
    assert bad_key.returncode == 2
    assert "allowed in [deploy]: clients" in bad_key.stderr

    missing = tmp_path / "runs" / "[client]:thumbs_up:"
    no_run = run_cli("report", str(missing), cwd=tmp_path, check=False)
    assert no_run.returncode == 2
    assert f"error: run directory {missing} does not exist" in no_run.stderr


def test_missing_net_extra_names_the_extra_verbatim(tmp_path: Path) -> None:
    # grpc made unimportable in a real process (None in sys.modules: find_spec answers "not installed").
    code = "import sys; sys.modules['grpc'] = None; from fedloom.cli.main import main; main()"
    proc = subprocess.run([sys.executable, "-c", code, "server"], cwd=tmp_path, env=cli_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "error: the deployment runtime needs the 'net' extra: pip install 'fedloom[net]'" in proc.stderr


def test_printed_paths_keep_brackets(tmp_path: Path) -> None:
    pytest.importorskip("cryptography", reason="`fedloom certs` needs the 'net' extra")
    out = tmp_path / "[site]" / "creds"
    proc = run_cli("certs", "--out", str(out), "--clients", "cleveland", cwd=tmp_path)
    assert f"client bundles to {out}; give each client {out}/clients/NAME/" in proc.stdout
    assert (out / "clients" / "cleveland" / "cert.pem").is_file()
    revoked = run_cli("certs", "--out", str(out), "--revoke", "cleveland", cwd=tmp_path)
    assert revoked.stdout.strip() == f"revoked 'cleveland' in {out / 'tokens.json'}"
