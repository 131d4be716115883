"""skyctl: argument parsing, help and usage errors, checked without any server."""
import click
import pytest
from click.testing import CliRunner

from skyctl.main import cli, parse_targets


def run(*args, input=None):
    return CliRunner().invoke(cli, ["--server", "127.0.0.1:1", *args], input=input)


def all_commands(command=cli, path=()):
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from all_commands(sub, path + (name,))


def test_every_command_and_option_has_help():
    for path, command in all_commands():
        assert command.help, f"skyctl {' '.join(path)} has no help"
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"skyctl {' '.join(path)} {param.opts[0]} has no help"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize("arguments, targets", [
    (["jobs"], [("jobs", [])]),
    (["job", "a", "b"], [("job", ["a", "b"])]),
    (["job/a", "svc/b", "jobs/c"], [("job", ["a"]), ("svc", ["b"]), ("jobs", ["c"])]),
])
def test_parse_targets(arguments, targets):
    assert parse_targets(arguments) == targets


@pytest.mark.parametrize("args, expected", [
    (["get"], "name a kind"),
    (["get", "gizmos"], "unknown kind 'gizmos'"),
    (["get", "job", "a", "job/b"], "either KIND NAME... or KIND/NAME..."),
    (["get", "job/a", "b"], "expected KIND/NAME, got 'b'"),
    (["get", "job/"], "expected KIND/NAME"),
    (["get", "job", "a", "-l", "app=x"], "names cannot be combined"),
    (["get", "jobs", "svc/x", "-w"], "either KIND NAME"),
    (["get", "job/a", "svc/b", "-w"], "--watch takes one kind"),
    (["get", "jobs", "-o", "xml"], "'xml' is not one of"),
    (["delete", "jobs"], "-l SELECTOR or --all"),
    (["delete", "job", "a", "--all"], "names cannot be combined"),
    (["describe", "jobs"], "name the job to describe"),
    (["history", "job/a", "job/b"], "exactly one object"),
    (["apply"], "Missing option '-f'"),
    (["apply", "-f", "/nonexistent/manifest.yaml"], "does not exist"),
    (["create", "job", "x", "--accelerators", "V100:x"], "'--accelerators'"),
    (["create", "job", "x", "--restart_policy", "Sometimes"], "'Sometimes' is not one of Always, OnFailure, Never"),
    (["create", "jobs", "x", "--memory", "lots"], "'--memory'"),
    (["create", "link", "l"], "Missing option '--source'"),
    (["create", "gizmo", "x"], "No such command 'gizmo'"),
])
def test_usage_errors_exit_2(args, expected):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert expected in result.stderr


def test_invalid_manifest_is_one_error_line_and_exit_1(tmp_path):
    manifest = tmp_path / "job.yaml"
    manifest.write_text("kind: Job\nmetadata:\n  name: a\nspec:\n  run: x\n  placement: {filters: [{bogus: 1}]}\n")
    result = run("apply", "-f", str(manifest))
    assert result.exit_code == 1
    assert result.stderr == f"error: {manifest}: spec.placement.filters[0].bogus: unknown field\n"
    assert result.stdout == ""


def test_invalid_yaml_from_stdin():
    result = run("apply", "-f", "-", input="kind: Job\nmetadata: [unclosed\n")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: <stdin>: not valid YAML or JSON")
    assert len(result.stderr.splitlines()) <= 8  # yaml's own message points at the line; no traceback
    assert "Traceback" not in result.stderr


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("skyctl ")



def test_apply_without_objects_is_an_error(tmp_path):
    (tmp_path / "README.txt").write_text("no manifests here")
    result = run("apply", "-f", str(tmp_path))
    assert result.exit_code == 1 and result.stderr == f"error: no objects in {tmp_path}\n"
