"""Configuration: flags > KODKOD_* environment > TOML file > defaults."""
from __future__ import annotations

import pytest

from server.config import ConfigError, load_config


def test_precedence(tmp_path):
    f = tmp_path / "kodkod.toml"
    f.write_text('port = 9000\nhost = "0.0.0.0"\ntokens = ["from-file"]\ntimeout_s = 5\n[server]\nqueue_size = 3\n')
    c = load_config({}, env={}, config_file=f)
    assert (c.port, c.host, c.tokens, c.timeout_s, c.queue_size) == (9000, "0.0.0.0", ["from-file"], 5, 3)
    env = {"KODKOD_PORT": "9100", "KODKOD_TOKENS": "a, b", "KODKOD_LOG_PROMPTS": "1"}
    c = load_config({}, env=env, config_file=f)
    assert (c.port, c.host, c.tokens, c.log_prompts) == (9100, "0.0.0.0", ["a", "b"], True)
    c = load_config({"port": 9200, "tokens": ["cli"], "host": None}, env=env, config_file=f)
    assert (c.port, c.host, c.tokens) == (9200, "0.0.0.0", ["cli"])
    c = load_config({}, env={**env, "KODKOD_CONFIG": str(f)})  # the file may come from the environment too
    assert c.queue_size == 3


def test_defaults_and_home(tmp_path):
    c = load_config({}, env={})
    assert (c.port, c.device, c.timeout_s, c.tokens, c.dtype) == (8080, "auto", 30.0, [], "auto")
    assert load_config({}, env={"KODKOD_DTYPE": "bfloat16"}).dtype == "bfloat16"
    c = load_config({}, env={"KODKOD_HOME": str(tmp_path)})
    assert c.events_path == tmp_path / "logs" / "events.jsonl"


@pytest.mark.parametrize("kw,env,text,needle", [
    ({"port": 70000}, {}, None, "port"),
    ({}, {"KODKOD_PORT": "eighty"}, None, "KODKOD_PORT"),
    ({}, {}, "bogus_key = 1\n", "bogus_key"),
    ({}, {}, "port = [\n", "invalid TOML"),
    ({"device": "tpu"}, {}, None, "--device"),
    ({}, {"KODKOD_DTYPE": "fp8"}, None, "KODKOD_DTYPE"),
])
def test_errors_say_where(tmp_path, kw, env, text, needle):
    f = None
    if text is not None:
        f = tmp_path / "c.toml"
        f.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(kw, env=env, config_file=f)
    with pytest.raises(ConfigError, match="not found"):
        load_config({}, env={}, config_file=tmp_path / "missing.toml")


def test_cli_help_is_fast_and_lists_serve():
    import subprocess
    import sys
    import time

    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--model" in r.stdout and "--token" in r.stdout and "--config" in r.stdout
    assert time.monotonic() - t < 10
    r = subprocess.run([sys.executable, "-c", "import server.commands.serve, server.commands.complete, sys; "
                        "print(sorted(m for m in ('torch', 'starlette', 'engine') if m in sys.modules))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_complete_command(tmp_path, capsys):
    from server.cli import main
    from server.commands.complete import split_position
    from srvutil import fixture_dir

    assert split_position("ab\ncd\n", 2, 2) == ("ab\nc", "d\n")
    assert split_position("ab\r\ncd", 1, 99) == ("ab", "\r\ncd")
    f = tmp_path / "fib.py"
    f.write_text("def fib(n):\n    \n\nprint(fib(3))\n")
    rc = main(["complete", f"{f}:2:5", "--model", str(fixture_dir("llama-tiny-4.0bpw")), "--device", "cpu",
               "--max-tokens", "5", "--explain"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "# ---- prompt text ----" in out and "def fib(n):" in out and "# ---- completion ----" in out
    assert main(["complete", "nofile"]) == 2


def test_traffic_limits_from_env_and_file(tmp_path):
    f = tmp_path / "kodkod.toml"
    f.write_text('allowed_hosts = ["kodkod", "gpu-box.lan"]\nmax_connections = 4000\nhead_timeout_s = 5\n')
    c = load_config({}, env={"KODKOD_CORS_ORIGINS": "https://a.example, https://b.example",
                             "KODKOD_LOG_MAX_BYTES": "1000000"}, config_file=f)
    assert c.allowed_hosts == ["kodkod", "gpu-box.lan"]
    assert c.cors_origins == ["https://a.example", "https://b.example"]
    assert (c.max_connections, c.head_timeout_s, c.log_max_bytes) == (4000, 5.0, 1_000_000)
    with pytest.raises(ConfigError, match="max_connections"):
        load_config({}, env={"KODKOD_MAX_CONNECTIONS": "2"})
