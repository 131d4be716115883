"""No injection through the ssh driver's command lines: what skyshift/drivers/ssh_remote.py sends
is parsed by the remote account's POSIX shell; run here by a local `sh -c` (what sshd does with
the line), hostile arguments and env values arrive literally and execute nothing."""
from __future__ import annotations

import subprocess

from skyshift.drivers import ssh_remote

from tests.hostile import payloads


def remote_shell(line: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", line], cwd=cwd, capture_output=True, timeout=10)


def test_command_arguments_arrive_literally(tmp_path):
    canary = tmp_path / "pwned"
    values = payloads(canary)
    line = ssh_remote.command('printf "%s\\0" "$@"', *values)
    result = remote_shell(line, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [value.encode() for value in values]
    assert not canary.exists()


def test_the_env_script_exports_values_literally(tmp_path):
    canary = tmp_path / "pwned"
    values = payloads(canary)
    (tmp_path / "env.sh").write_text(ssh_remote.env_script({f"V{i}": value for i, value in enumerate(values)}))
    program = ". ./env.sh && printf '%s\\0' " + " ".join(f'"$V{i}"' for i in range(len(values)))
    result = remote_shell(ssh_remote.command(program), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\0")[:-1] == [value.encode() for value in values]
    assert not canary.exists()
