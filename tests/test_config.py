"""Settings: defaults < TOML file < MEDDAEMON_* environment < flags, each value knowing its source."""

from pathlib import Path

import pytest

from meddaemon.config import ConfigError, RouteRule, load_settings


def test_defaults_come_from_the_shipped_template():
    settings = load_settings(env={})
    assert settings.stable_seconds == 2.0
    assert settings.observer == "native"
    assert RouteRule("busi", ("US",), ("BREAST",)) in settings.routing_rules
    assert settings.sources["stable_seconds"] == "default"


def test_file_overrides_default_env_overrides_file_flag_overrides_env(tmp_path: Path):
    config = tmp_path / "meddaemon.toml"
    config.write_text("stable_seconds = 1.5\nworkers = 3\nbatch_size = 10\n")
    env = {"MEDDAEMON_WORKERS": "4", "MEDDAEMON_BATCH_SIZE": "20"}
    settings = load_settings(config, env=env, flags={"batch_size": 30, "default_task": None})

    assert (settings.stable_seconds, settings.workers, settings.batch_size) == (1.5, 4, 30)
    assert settings.sources["stable_seconds"] == f"file {config}"
    assert settings.sources["workers"] == "env MEDDAEMON_WORKERS"
    assert settings.sources["batch_size"] == "flag"
    assert settings.sources["default_task"] == "default"


def test_config_file_can_be_named_by_the_environment(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('default_task = "covid"\n')
    assert load_settings(env={"MEDDAEMON_CONFIG": str(config)}).default_task == "covid"


def test_relative_paths_in_a_config_file_are_relative_to_that_file(tmp_path: Path):
    config = tmp_path / "etc" / "meddaemon.toml"
    config.parent.mkdir()
    config.write_text('watch = "../inbox"\nstate_dir = "/var/lib/meddaemon"\n')
    settings = load_settings(config, env={})
    assert settings.watch == tmp_path / "etc" / ".." / "inbox"
    assert settings.state_dir == Path("/var/lib/meddaemon")


def test_lists_from_the_environment_are_comma_separated():
    assert load_settings(env={"MEDDAEMON_IGNORE": "*.part,*.inprogress"}).ignore == ("*.part", "*.inprogress")


def test_routing_rules_from_a_file_replace_the_default_rules(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('[[route]]\ntask = "covid"\nmodality = "DX"\n')
    assert load_settings(config, env={}).routing_rules == (RouteRule("covid", ("DX",)),)


def test_database_defaults_to_sqlite_in_the_state_dir(tmp_path: Path):
    settings = load_settings(env={}, flags={"state_dir": tmp_path})
    assert settings.db_url == f"sqlite:///{tmp_path.resolve() / 'meddaemon.db'}"
    assert load_settings(env={"MEDDAEMON_DB": "postgresql+psycopg://h/db"}).db_url == "postgresql+psycopg://h/db"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("stable_secs = 1\n", "unknown keys ['stable_secs']"),
        ('observer = "magic"\n', "'observer'"),
        ('workers = "many"\n', "'workers'"),
        ("stable_seconds = -1\n", "must be >= 0"),
        ("stable_seconds = \n", "not valid TOML"),
        ('[[route]]\nmodality = "US"\n', "route needs a task"),
    ],
)
def test_a_bad_config_file_names_the_key_and_the_file(tmp_path: Path, content: str, message: str):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        load_settings(config, env={})
    assert "bad.toml" in str(info.value)


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="MEDDAEMON_BATCH_SIZE"):
        load_settings(env={"MEDDAEMON_BATCH_SIZE": "lots"})


def test_a_missing_config_file_is_an_error(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})


def test_custom_tasks_come_from_tasks_tables_and_can_be_routed_to(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[tasks.knee]\nlabels = ["normal", "oa"]\nkind = "binary"\n'
        'contract = { channels = 1, height = 128, width = 128, modalities = ["DX"] }\n'
        '[[route]]\ntask = "knee"\nmodality = "DX"\n'
    )
    settings = load_settings(config, env={})
    knee = settings.task_specs["knee"]
    assert (knee.kind, knee.labels, knee.num_outputs, knee.contract.height) == ("binary", ("normal", "oa"), 1, 128)
    assert knee.contract.mean == (0.449,)
    assert {"busi", "chestxray14", "covid", "histopathology", "knee"} <= set(settings.task_specs)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[tasks.knee]\nlabels = ["a", "b"]\nkind = "ordinal"\ncontract = { channels = 1 }\n', "kind must be one of"),
        ('[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n', "task 'knee': missing or invalid field"),
        ('[[route]]\ntask = "nonexistent"\n', "unknown task 'nonexistent'"),
        ('default_task = "nonexistent"\n', "unknown task 'nonexistent'"),
    ],
)
def test_bad_custom_tasks_and_routes_to_unknown_tasks_are_refused(tmp_path: Path, content: str, message: str):
    config = tmp_path / "c.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})
