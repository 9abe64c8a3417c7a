"""Plugin loading (the `dvm` entry-point group, DVM_PLUGINS, misspelt hooks, kind clashes,
`[kinds]` renumbering), the `dvm` command line, and configuration from TOML and environment."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
from click.testing import CliRunner

from dvm_core import JobKind, JobResult, hookimpl
from dvm_core.cli import main
from dvm_core.worker.config import ConfigError, Settings, load_config
from dvm_core.protocol.events import Keys
from dvm_core.worker.plugins import PluginError, check, collect_job_kinds, describe, plugin_manager

@pytest.fixture(autouse=True)
def no_dvm_env(monkeypatch):
    """Tests here set the DVM_* variables they need and no others."""
    for name in list(os.environ):
        if name.startswith("DVM_") or name == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(name)


def _run(ctx, job):
    return JobResult("ok")


class OneKind:
    def __init__(self, kind: int = 5901, name: str = "one"):
        self.kind, self.name = kind, name

    @hookimpl
    def register_job_kinds(self, register):
        register(JobKind(kind=self.kind, name=self.name, description="test kind", run=_run))


# loading ------------------------------------------------------------------------------------

def test_plugin_manager_loads_the_example_plugin_through_the_entry_point():
    pm = plugin_manager()
    assert "textstats" in dict(pm.list_name_plugin())
    dists = {pm.get_name(p): d for p, d in pm.list_plugin_distinfo()}
    assert dists["textstats"].metadata["Name"] == "dvm-textstats"  # loaded as a distribution's entry point
    kinds = collect_job_kinds(pm, {})
    assert kinds[5790].name == "text-stats" and kinds[5790].plugin == "textstats"
    assert set(kinds[5790].params) == {"top", "work_seconds", "counts_file"}


def test_dvm_plugins_restricts_loading(monkeypatch):
    monkeypatch.setenv("DVM_PLUGINS", "textstats")
    assert [name for name, _ in plugin_manager().list_name_plugin()] == ["textstats"]
    monkeypatch.setenv("DVM_PLUGINS", " textstats , ")
    assert "textstats" in dict(plugin_manager().list_name_plugin())
    monkeypatch.setenv("DVM_PLUGINS", "")
    assert plugin_manager().list_name_plugin() == []
    assert collect_job_kinds(plugin_manager(), {}) == {}


def test_dvm_plugins_naming_a_missing_plugin_fails_and_lists_the_installed_ones(monkeypatch):
    monkeypatch.setenv("DVM_PLUGINS", "textstats,nonexistent")
    with pytest.raises(PluginError) as info:
        plugin_manager()
    assert "no installed plugin named nonexistent" in str(info.value)
    assert "installed: " in str(info.value) and "textstats" in str(info.value).split("installed: ")[1]


def test_only_argument_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("DVM_PLUGINS", "nonexistent")
    assert plugin_manager(only=[]).list_name_plugin() == []
    assert "textstats" in dict(plugin_manager(only=["textstats"]).list_name_plugin())


def test_a_misspelt_hook_is_refused():
    class Misspelt:
        @hookimpl
        def register_job_kind(self, register):  # one letter short of register_job_kinds
            pass

    pm = plugin_manager(only=[])
    pm.register(Misspelt(), name="misspelt")
    with pytest.raises(PluginError) as info:
        check(pm)
    assert "misspelt" in str(info.value) and "register_job_kind" in str(info.value)


def test_a_hook_with_an_unknown_argument_is_refused():
    class BadArgument:
        @hookimpl
        def register_job_kinds(self, registrar):
            pass

    pm = plugin_manager(only=[])
    with pytest.raises(pluggy.PluginValidationError, match="registrar"):
        pm.register(BadArgument(), name="bad-argument")


def test_a_plugin_may_take_any_subset_of_the_hook_arguments():
    seen = {}

    class ReadsConfig:
        @hookimpl
        def register_job_kinds(self, config, register):
            seen["config"] = config
            register(JobKind(kind=5902, name="reads-config", description="d", run=_run))

    pm = plugin_manager(only=[])
    pm.register(ReadsConfig(), name="reads-config")
    check(pm)
    raw = {"plugins": {"reads-config": {"x": 1}}}
    assert list(collect_job_kinds(pm, raw)) == [5902]
    assert seen["config"] is raw


def test_two_plugins_registering_the_same_kind_fail():
    pm = plugin_manager(only=["textstats"])
    pm.register(OneKind(5790, "other-stats"), name="clash")
    with pytest.raises(PluginError) as info:
        collect_job_kinds(pm, {})
    message = str(info.value)
    assert "kind 5790 registered twice" in message and "text-stats" in message and "other-stats" in message
    assert "[kinds]" in message  # says how to fix it
    # ... which renumbering one of them fixes
    kinds = collect_job_kinds(pm, {"kinds": {"other-stats": 5791}})
    assert kinds[5790].name == "text-stats" and kinds[5791].name == "other-stats"


def test_two_plugins_registering_the_same_name_fail():
    pm = plugin_manager(only=["textstats"])
    pm.register(OneKind(5799, "text-stats"), name="copycat")
    with pytest.raises(PluginError, match="'text-stats' registered by both 'textstats' and 'copycat'"):
        collect_job_kinds(pm, {})


def test_registering_something_else_than_a_job_kind_fails():
    class NotAKind:
        @hookimpl
        def register_job_kinds(self, register):
            register({"kind": 5903})

    pm = plugin_manager(only=[])
    pm.register(NotAKind(), name="not-a-kind")
    with pytest.raises(PluginError, match="'not-a-kind' registered .* not a JobKind"):
        collect_job_kinds(pm, {})


def test_kinds_table_renumbers_a_kind():
    kinds = collect_job_kinds(plugin_manager(only=["textstats"]), {"kinds": {"text-stats": 5795}})
    assert list(kinds) == [5795]
    assert kinds[5795].name == "text-stats" and kinds[5795].kind == 5795
    # the registration of a later manager is not affected
    assert list(collect_job_kinds(plugin_manager(only=["textstats"]), {})) == [5790]


def test_renumbering_an_unknown_name_fails():
    with pytest.raises(PluginError, match="names job kinds no plugin registered: text-statz"):
        collect_job_kinds(plugin_manager(only=["textstats"]), {"kinds": {"text-statz": 5795}})


@pytest.mark.parametrize("number", [4000, "abc", 5795.5], ids=["out-of-range", "not-a-number", "float"])
def test_renumbering_to_a_bad_number_is_a_plugin_error(number):
    with pytest.raises(PluginError):
        collect_job_kinds(plugin_manager(only=["textstats"]), {"kinds": {"text-stats": number}})


def test_describe_reports_renumbered_kinds():
    [entry] = describe(plugin_manager(only=["textstats"]), {"kinds": {"text-stats": 5795}})
    assert entry["kinds"] == [{"kind": 5795, "result_kind": 6795, "name": "text-stats"}]


# the command line ----------------------------------------------------------------------------
#
# Each `dvm` invocation is a real child process. They are independent, so they all run at once
# in one batch (module fixture `cli`), after one warm-up run that fills a bytecode cache kept in
# .pytest_cache: this environment sets PYTHONDONTWRITEBYTECODE, and compiling the imports again
# in every child would cost seconds each.

RELAY_LINE = 'relays = ["ws://127.0.0.1:1"]\n'


def _base_env(pycache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVM_") and k != "CREDENTIALS_DIRECTORY"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return {**env, "PYTHONPYCACHEPREFIX": str(pycache)}


@pytest.fixture(scope="module")
def cli(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    key = d / "dvm.key"
    key.write_text(Keys.generate().nsec + "\n")
    key.chmod(0o600)
    existing = d / "existing.key"
    existing.write_text("nsec1-do-not-touch\n")
    bad_nsec = d / "bad-nsec.key"
    bad_nsec.write_text("nsec1thisisnotavalidkey\n")
    bad_nsec.chmod(0o600)
    files = {
        "kinds.toml": f"[dvm]\n{RELAY_LINE}\n[kinds]\ntext-stats = 5795\n",
        "missing-key.toml": f'[dvm]\n{RELAY_LINE}key_file = "{d / "missing.key"}"\n',
        "no-key.toml": f"[dvm]\n{RELAY_LINE}",
        "bad-nsec.toml": f'[dvm]\n{RELAY_LINE}key_file = "{bad_nsec}"\n',
        "no-relays.toml": f'[dvm]\nkey_file = "{key}"\n',
        "bad.toml": '[dvm]\nrelays = ["ws://127.0.0.1:1"\nname = \n',
        "bad-kinds.toml": f'[dvm]\n{RELAY_LINE}key_file = "{key}"\n\n[kinds]\ntext-stats = 4000\n',
        "ok.toml": f'[dvm]\n{RELAY_LINE}key_file = "{key}"\n',
    }
    for name, text in files.items():
        (d / name).write_text(text)
    only_textstats = {"DVM_PLUGINS": "textstats"}
    cases: dict[str, tuple[list[str], dict]] = {
        "help": (["--help"], {}),
        "help run": (["run", "--help"], {}),
        "help keygen": (["keygen", "--help"], {}),
        "help plugins": (["plugins", "--help"], {}),
        "help demo": (["demo", "-h"], {}),
        "plugins": (["plugins"], {}),
        "plugins kinds": (["plugins", "--config", str(d / "kinds.toml")], only_textstats),
        "plugins nonexistent": (["plugins"], {"DVM_PLUGINS": "nonexistent"}),
        "keygen": (["keygen", "--out", str(d / "new" / "dvm.key")], {}),
        "keygen existing": (["keygen", "--out", str(existing)], {}),
        "run missing key": (["run", "--config", str(d / "missing-key.toml")], only_textstats),
        "run no key": (["run", "--config", str(d / "no-key.toml")], only_textstats),
        "run bad key variable": (["run", "--config", str(d / "no-key.toml")],
                                 {**only_textstats, "DVM_PRIVATE_KEY": "hunter2"}),
        "run bad nsec": (["run", "--config", str(d / "bad-nsec.toml")], only_textstats),
        "run no relays": (["run", "--config", str(d / "no-relays.toml")], only_textstats),
        "run bad toml": (["run", "--config", str(d / "bad.toml")], only_textstats),
        "run missing config": (["run", "--config", str(d / "nope.toml")], only_textstats),
        "run bad setting": (["run", "--config", str(d / "ok.toml")],
                            {**only_textstats, "DVM_MAX_CONCURRENT_JOBS": "many"}),
        "run unknown plugin": (["run", "--config", str(d / "ok.toml")], {"DVM_PLUGINS": "nonexistent"}),
        "run bad kinds": (["run", "--config", str(d / "bad-kinds.toml")], only_textstats),
    }
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    env = _base_env(cache.mkdir("dvm-cli-pycache") if cache else tmp_path_factory.mktemp("pycache"))

    def start(name: str) -> subprocess.Popen:
        args, extra = cases[name]
        return subprocess.Popen([sys.executable, "-m", "dvm_core.cli", *args], cwd=d, text=True,
                                env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finish(name: str, proc: subprocess.Popen) -> subprocess.CompletedProcess:
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    cache = Path(env["PYTHONPYCACHEPREFIX"])
    results = {} if any(cache.iterdir()) else {"help": finish("help", start("help"))}  # fill the cache
    procs = {name: start(name) for name in cases if name not in results}
    results.update({name: finish(name, proc) for name, proc in procs.items()})
    return SimpleNamespace(dir=d, results=results, existing=existing)


def test_cli_plugins_prints_json(cli):
    proc = cli.results["plugins"]
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    textstats = plugins["textstats"]
    assert set(textstats) >= {"name", "hooks", "version", "kinds"}
    assert textstats["hooks"] == ["register_job_kinds"]
    assert textstats["version"] == "0.1.0" and textstats["package"] == "dvm-textstats"
    assert textstats["kinds"] == [{"kind": 5790, "result_kind": 6790, "name": "text-stats"}]


def test_cli_plugins_applies_the_config_and_dvm_plugins(cli):
    proc = cli.results["plugins kinds"]
    assert proc.returncode == 0, proc.stderr
    [entry] = json.loads(proc.stdout)
    assert entry["name"] == "textstats" and entry["kinds"][0]["kind"] == 5795
    _assert_one_line_error(cli.results["plugins nonexistent"], "no installed plugin named nonexistent",
                           "installed: ", "textstats")


def test_cli_keygen_writes_a_private_key_file(cli):
    proc = cli.results["keygen"]
    out = cli.dir / "new" / "dvm.key"
    assert proc.returncode == 0, proc.stderr
    npub = proc.stdout.strip()
    assert npub.startswith("npub1") and proc.stdout == npub + "\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    secret = out.read_text()
    assert secret.startswith("nsec1") and Keys.from_secret(secret).npub == npub
    assert secret.strip() not in proc.stdout + proc.stderr  # the secret is never printed
    assert "mode 0600" in proc.stderr


def test_cli_keygen_never_overwrites(cli):
    _assert_one_line_error(cli.results["keygen existing"], "exists; not overwriting")
    assert cli.existing.read_text() == "nsec1-do-not-touch\n"


@pytest.mark.parametrize("case, expect", [
    ("help", ["run", "keygen", "plugins", "demo", "--version"]),
    ("help run", ["--config", "DVM_<SETTING>", "SIGTERM"]),
    ("help keygen", ["--out", "0600", "npub"]),
    ("help plugins", ["--config", "JSON"]),
    ("help demo", ["--workdir", "--verbose", "relay"]),
], ids=lambda v: v.replace(" ", "-") if isinstance(v, str) else "expect")
def test_cli_help(cli, case, expect):
    proc = cli.results[case]
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: ") and proc.stderr == ""
    for text in expect:
        assert text in proc.stdout


def _assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("case, fragments", [
    ("run missing key", ["missing.key does not exist", "dvm keygen --out"]),
    ("run no key", ["no key", "DVM_PRIVATE_KEY", "dvm keygen"]),
    ("run bad key variable", ["DVM_PRIVATE_KEY", "nsec1"]),
    ("run no relays", ["no relays configured", "DVM_RELAYS"]),
    ("run bad toml", ["bad.toml is not valid TOML"]),
    ("run missing config", ["nope.toml does not exist"]),
    ("run bad setting", ["setting 'max_concurrent_jobs' must be a int, got 'many'"]),
    ("run unknown plugin", ["no installed plugin named nonexistent"]),
    pytest.param("run bad nsec", ["bad-nsec.key"]),
    pytest.param("run bad kinds", ["4000"]),
], ids=lambda v: v.replace(" ", "-") if isinstance(v, str) else "error")
def test_cli_run_fails_with_one_clear_line(cli, case, fragments):
    _assert_one_line_error(cli.results[case], *fragments)


def test_cli_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "0.1.0" in result.output


# configuration ---------------------------------------------------------------------------------

def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dvm.toml"
    path.write_text(text)
    return path


def test_config_defaults_and_relative_paths(tmp_path):
    config = load_config(_config(tmp_path, '[dvm]\nrelays = ["wss://relay.example"]\nkey_file = "k/dvm.key"\n'),
                         env={})
    s = config.settings
    assert s.relays == ["wss://relay.example"]
    assert s.state_dir == str((tmp_path / "dvm-state").resolve())  # relative to the config file
    assert s.key_file == str((tmp_path / "k" / "dvm.key").resolve())
    assert s.max_concurrent_jobs == 1 and s.announce is True and s.log_format == "auto"
    assert s.store_path == tmp_path.resolve() / "dvm-state" / "dvm.sqlite3"
    assert config.raw["dvm"]["key_file"] == "k/dvm.key" and config.path == tmp_path / "dvm.toml"


def test_config_environment_overrides_the_file(tmp_path):
    path = _config(tmp_path, '[dvm]\nrelays = ["wss://relay.example"]\nmax_concurrent_jobs = 2\n'
                             'name = "From file"\n')
    env = {"DVM_RELAYS": "ws://a, ws://b,", "DVM_MAX_CONCURRENT_JOBS": "3", "DVM_JOB_TIME_LIMIT": "90.5",
           "DVM_ANNOUNCE": "off", "DVM_ACCEPT_JOBS_FOR_OTHERS": "yes", "DVM_LOG_LEVEL": "debug"}
    s = load_config(path, env=env).settings
    assert s.relays == ["ws://a", "ws://b"]
    assert s.max_concurrent_jobs == 3 and isinstance(s.max_concurrent_jobs, int)
    assert s.job_time_limit == 90.5
    assert s.announce is False and s.accept_jobs_for_others is True
    assert s.log_level == "debug" and s.name == "From file"


def test_config_from_the_environment_alone(monkeypatch):
    monkeypatch.setenv("DVM_RELAYS", "ws://a,ws://b")
    monkeypatch.setenv("DVM_MAX_CONCURRENT_JOBS", "3")
    s = load_config().settings  # os.environ by default
    assert s.relays == ["ws://a", "ws://b"] and s.max_concurrent_jobs == 3
    assert s.state_dir == Settings().state_dir


@pytest.mark.parametrize("env, setting, typ", [
    ({"DVM_MAX_CONCURRENT_JOBS": "three"}, "max_concurrent_jobs", "int"),
    ({"DVM_MAX_CONCURRENT_JOBS": "2.5"}, "max_concurrent_jobs", "int"),
    ({"DVM_JOB_TIME_LIMIT": "1h"}, "job_time_limit", "float"),
    ({"DVM_ANNOUNCE": "maybe"}, "announce", "bool"),
])
def test_config_bad_type_from_the_environment(env, setting, typ):
    with pytest.raises(ConfigError) as info:
        load_config(env={"DVM_RELAYS": "ws://a", **env})
    assert f"setting {setting!r} must be a {typ}" in str(info.value)


@pytest.mark.parametrize("line, setting", [
    ('max_concurrent_jobs = "many"', "max_concurrent_jobs"),
    ("max_concurrent_jobs = true", "max_concurrent_jobs"),
    ("relays = [1, 2]", "relays"),
    ("relays = 5", "relays"),
    ("name = 5", "name"),
    ('announce = "perhaps"', "announce"),
    ("job_time_limit = [1]", "job_time_limit"),
])
def test_config_bad_type_in_the_file(tmp_path, line, setting):
    relays = "" if line.startswith("relays") else 'relays = ["ws://a"]\n'
    path = _config(tmp_path, f"[dvm]\n{relays}{line}\n")
    with pytest.raises(ConfigError, match=f"setting {setting!r} must be a"):
        load_config(path, env={})


def test_config_float_for_an_int_setting_is_refused(tmp_path):
    path = _config(tmp_path, '[dvm]\nrelays = ["ws://a"]\nmax_concurrent_jobs = 2.5\n')
    with pytest.raises(ConfigError, match="max_concurrent_jobs"):
        load_config(path, env={})


def test_config_unknown_setting_fails(tmp_path):
    path = _config(tmp_path, '[dvm]\nrelays = ["ws://a"]\nmax_concurent_jobs = 2\nrelay = "ws://b"\n')
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) in \[dvm\]: max_concurent_jobs, relay"):
        load_config(path, env={})


@pytest.mark.parametrize("text, message", [
    ('[dvm]\nrelays = ["http://relay.example"]\n', "must be a ws:// or wss:// URL"),
    ('[dvm]\nrelays = []\n', "no relays configured"),
    ('[dvm]\nrelays = ["ws://a"]\nmax_concurrent_jobs = 0\n', "max_concurrent_jobs must be at least 1"),
    ('[dvm]\nrelays = ["ws://a"]\njob_time_limit = -1\n', "job_time_limit must be positive"),
    ('[dvm]\nrelays = ["ws://a"]\nlog_format = "xml"\n', "log_format must be auto, json or console"),
])
def test_config_invalid_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, text), env={})


def test_config_keeps_plugin_tables_for_plugins(tmp_path):
    path = _config(tmp_path, '[dvm]\nrelays = ["ws://a"]\n\n[plugins.textstats]\nmax_words = 10\n'
                             '\n[kinds]\ntext-stats = 5795\n')
    raw = load_config(path, env={}).raw
    assert raw["plugins"]["textstats"] == {"max_words": 10} and raw["kinds"] == {"text-stats": 5795}


# --- plugin commands (the register_commands hook) -------------------------------------------------

def _group_with(monkeypatch, plugin):
    """A fresh `dvm` group whose plugins are just `plugin`."""
    import click

    from dvm_core import cli as cli_module
    from dvm_core import hookspecs
    from dvm_core.worker import plugins

    def only_this(*args, **kwargs):
        pm = pluggy.PluginManager("dvm")
        pm.add_hookspecs(hookspecs)
        pm.register(plugin)
        return pm

    monkeypatch.setattr(plugins, "plugin_manager", only_this)
    assert isinstance(main, click.Group)
    return cli_module._Commands(name="dvm", commands=dict(main.commands))


def test_a_plugin_adds_a_command(monkeypatch):
    import click

    class Greeter:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            @click.argument("name")
            def hello(name):
                """Say hello."""
                click.echo(f"hello {name}")

    group = _group_with(monkeypatch, Greeter())
    assert CliRunner().invoke(group, ["hello", "you"]).output == "hello you\n"
    listed = CliRunner().invoke(group, ["--help"]).output
    assert "hello" in listed and "Say hello." in listed and "run" in listed


def test_a_plugin_command_may_not_replace_a_built_in_one(monkeypatch):
    import click

    class Usurper:
        @hookimpl
        def register_commands(self, cli):
            @cli.command("run")
            def run_():
                click.echo("mine now")

    group = _group_with(monkeypatch, Usurper())
    result = CliRunner().invoke(group, ["--help"])
    assert result.exit_code != 0 and "a plugin adds a command 'run', which is built in" in result.output


def test_built_in_commands_do_not_load_plugins(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("plugins loaded for a built-in command")

    from dvm_core import cli as cli_module
    from dvm_core.worker import plugins
    monkeypatch.setattr(plugins, "plugin_manager", refuse)
    group = cli_module._Commands(name="dvm", commands=dict(main.commands))
    assert CliRunner().invoke(group, ["keygen", "--help"]).exit_code == 0


# --- dvm_core.params: the helpers plugins read params and settings with -------------------------

def test_plugin_settings_and_param_helpers():
    from dataclasses import dataclass

    from dvm_core import JobInputError
    from dvm_core.params import choice, flag, number, plugin_settings

    @dataclass(frozen=True)
    class Settings_:
        max_items: int = 10
        rate: float = 1.0
        strict: bool = False
        names: tuple[str, ...] = ()

    def read(table):
        return plugin_settings(Settings_, {"plugins": {"demo": table}}, "demo", may_be_zero=("rate",))

    assert read({"max_items": 3, "rate": 0, "names": ["a"]}) == Settings_(3, 0.0, False, ("a",))
    for table, message in (({"max_item": 3}, "unknown setting(s) in [plugins.demo]: max_item"),
                           ({"max_items": 0}, "max_items must be positive"),
                           ({"max_items": 2.5}, "max_items must be a int"),
                           ({"strict": "yes"}, "strict must be true or false"),
                           ({"names": "a"}, "names must be a list of strings")):
        with pytest.raises(ValueError) as info:
            read(table)
        assert message in str(info.value)
    params = {"n": "7", "opt": " SGD ", "on": "yes"}
    assert number(params, "n", int, 1, 9) == 7 and number(params, "x", int, 1, 9, 4) == 4
    assert choice(params, "opt", ("adam", "sgd"), "adam") == "sgd" and flag(params, "on") is True
    for call, message in ((lambda: number({"n": "70"}, "n", int, 1, 9), "param n must be between 1 and 9, got 70"),
                          (lambda: number({"n": "x"}, "n", float, 0, 1), "param n must be a number"),
                          (lambda: choice({"o": "lion"}, "o", ("adam",), "adam"), "param o must be one of adam"),
                          (lambda: flag({"f": "maybe"}, "f"), "param f must be yes or no")):
        with pytest.raises(JobInputError, match=message):
            call()


def test_training_children_never_see_the_workers_secrets(tmp_path):
    import os
    import sys

    from dvm_core.childproc import run_process_group
    lines = []
    env = {**os.environ, "DVM_PRIVATE_KEY": "nsec1secret", "CREDENTIALS_DIRECTORY": "/run/credentials/x",
           "KEEP_ME": "yes"}
    code = run_process_group([sys.executable, "-c", "import os; print(sorted(k for k in os.environ if "
                              "k in ('DVM_PRIVATE_KEY', 'CREDENTIALS_DIRECTORY', 'KEEP_ME')))"],
                             cwd=tmp_path, env=env, stderr_path=tmp_path / "err", check_cancelled=lambda: None,
                             on_line=lines.append)
    assert code == 0 and lines == ["['KEEP_ME']"], lines
