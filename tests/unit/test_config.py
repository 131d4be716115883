"""The settings tree (skyshift.config): defaults, config file, environment, overrides, errors."""
import os
import pathlib
import stat

import pytest

from skyshift import config


def write_config(home: pathlib.Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / config.CONFIG_FILE).write_text(text)


def test_defaults_and_paths_under_home(tmp_path):
    settings = config.load(tmp_path, env={})
    assert settings.home == str(tmp_path)
    assert settings.api.max_object_bytes == 1024 * 1024
    assert settings.client.endpoint == ""
    for path in (settings.etcd_dir, settings.api_dir, settings.log_dir, settings.api_endpoint_file,
                 settings.config_file):
        assert tmp_path in path.parents


def test_home_comes_from_skyshift_home_else_the_default(tmp_path):
    assert config.home_dir({"SKYSHIFT_HOME": str(tmp_path)}) == tmp_path
    assert config.home_dir({}) == pathlib.Path(os.path.expanduser("~/.skyshift"))
    assert config.load(env={"SKYSHIFT_HOME": str(tmp_path)}).home == str(tmp_path)


def test_config_file_overrides_defaults(tmp_path):
    write_config(tmp_path, """
api:
  max_object_bytes: 65536
  shutdown_grace: 1          # an int where a float is expected is fine
watch:
  cache_events_per_kind: 50
client:
  endpoint: 10.0.0.1:5000
controllers:
  workers: {job: 8}
""")
    settings = config.load(tmp_path, env={})
    assert settings.api.max_object_bytes == 65536
    assert settings.api.shutdown_grace == 1.0 and isinstance(settings.api.shutdown_grace, float)
    assert settings.watch.cache_events_per_kind == 50
    assert settings.watch.client_queue_events == config.WatchSettings().client_queue_events  # untouched
    assert settings.client.endpoint == "10.0.0.1:5000"
    assert settings.controllers.workers_for("job") == 8
    assert settings.controllers.workers_for("scheduler") == settings.controllers.default_workers


def test_environment_overrides_the_file_and_overrides_win_last(tmp_path):
    write_config(tmp_path, "client: {endpoint: '10.0.0.1:5000', token: file-token}\n")
    env = {"SKYSHIFT_API_SERVER": "127.0.0.1:7000", "SKYSHIFT_TOKEN": "env-token"}
    settings = config.load(tmp_path, env=env)
    assert (settings.client.endpoint, settings.client.token) == ("127.0.0.1:7000", "env-token")
    settings = config.load(tmp_path, env={"SKYSHIFT_API_SERVER": ""})  # empty does not override
    assert settings.client.endpoint == "10.0.0.1:5000"
    settings = config.load(tmp_path, env=env, overrides={"client": {"endpoint": "127.0.0.1:9"}})
    assert settings.client.endpoint == "127.0.0.1:9"


def test_empty_config_file_and_home_key_are_ignored(tmp_path):
    write_config(tmp_path, "")
    assert config.load(tmp_path, env={}).api.max_object_bytes == 1024 * 1024
    write_config(tmp_path, "home: /elsewhere\n")
    assert config.load(tmp_path, env={}).home == str(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "bogus: unknown setting"),
    ("api: {max_objekt_bytes: 1}\n", "api.max_objekt_bytes: unknown setting"),
    ("api: 5\n", "api: expected a mapping"),
    ("api: {max_object_bytes: lots}\n", "api.max_object_bytes: expected int"),
    ("api: {max_object_bytes: true}\n", "api.max_object_bytes: expected int"),
    ("api: {max_object_bytes: 1.5}\n", "api.max_object_bytes: expected int"),
    ("client: {endpoint: 5000}\n", "client.endpoint: expected str"),
    ("- a\n- b\n", "expected a mapping at the top level"),
])
def test_bad_config_files_name_the_file_and_setting(tmp_path, text, message):
    write_config(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        config.load(tmp_path, env={})
    assert message in str(caught.value)
    assert str(tmp_path / config.CONFIG_FILE) in str(caught.value)


def test_unknown_override_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"watch\.cache_size: unknown setting"):
        config.load(tmp_path, env={}, overrides={"watch": {"cache_size": 1}})


def test_save_client_config_keeps_other_settings_and_is_private(tmp_path):
    write_config(tmp_path, "api: {max_object_bytes: 2048}\nclient: {call_timeout: 3}\n")
    settings = config.load(tmp_path, env={})
    config.save_client_config(settings, endpoint="127.0.0.1:6000", token="secret")
    reloaded = config.load(tmp_path, env={})
    assert reloaded.client.endpoint == "127.0.0.1:6000" and reloaded.client.token == "secret"
    assert reloaded.client.call_timeout == 3.0 and reloaded.api.max_object_bytes == 2048
    assert stat.S_IMODE(settings.config_file.stat().st_mode) == 0o600


def test_save_client_config_creates_home(tmp_path):
    settings = config.load(tmp_path / "new-home", env={})
    config.save_client_config(settings, endpoint="127.0.0.1:6001")
    assert config.load(tmp_path / "new-home", env={}).client.endpoint == "127.0.0.1:6001"
