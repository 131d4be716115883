"""Pure helpers of the local driver (skyshift/drivers/local.py); its behaviour is in
tests/integration/test_driver_contract.py."""
import pytest

from skyshift.drivers.local import (
    accelerator_name, gpu_resources, parse_meminfo_mib, process_env, signal_exit_code, wrapper_script,
)


def test_parse_meminfo():
    text = "MemTotal:       24683520 kB\nMemFree:         1000000 kB\n"
    assert parse_meminfo_mib(text) == 24105.0
    with pytest.raises(ValueError):
        parse_meminfo_mib("MemFree: 1 kB\n")


@pytest.mark.parametrize("name, short", [
    ("Tesla V100-SXM2-16GB", "V100"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA H100 80GB HBM3", "H100"),
    ("Tesla T4", "T4"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA A10G", "A10G"),
    ("NVIDIA GeForce RTX 4090", "RTX4090"),
    ("NVIDIA RTX A6000", "RTXA6000"),
    ("Quadro RTX 6000", "RTX6000"),
    ("NVIDIA", "GPU"),
])
def test_accelerator_name(name, short):
    assert accelerator_name(name) == short


def test_gpu_resources():
    output = "Tesla V100-SXM2-16GB\nTesla V100-SXM2-16GB\nNVIDIA A100-SXM4-80GB\n\n"
    assert gpu_resources(output) == {"gpus": 3.0, "V100": 2.0, "A100": 1.0}
    assert gpu_resources("") == {}


def test_process_env_drops_skyshifts_own_settings(monkeypatch):
    monkeypatch.setenv("SKYSHIFT_TOKEN", "secret")
    monkeypatch.setenv("SKYSHIFT_HOME", "/somewhere")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = process_env({"SKYSHIFT_REPLICA_RANK": "1", "MINE": "x"})
    assert "SKYSHIFT_TOKEN" not in env and "SKYSHIFT_HOME" not in env
    assert env["SKYSHIFT_REPLICA_RANK"] == "1" and env["MINE"] == "x" and env["PATH"] == "/usr/bin:/bin"


def test_wrapper_script_closes_the_lock_for_the_users_commands():
    script = wrapper_script(11)
    assert script.count("11>&-") == 2  # setup and run
    assert "trap 'stopping=1' TERM" in script
    with pytest.raises(ValueError):
        wrapper_script("11; rm -rf /")  # only an int can become part of the program


def test_signal_exit_code():
    assert signal_exit_code(15) == 143 and signal_exit_code(9) == 137
