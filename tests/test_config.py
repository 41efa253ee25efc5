"""Settings: defaults < TOML file < MEDDAEMON_* environment < flags, each value knowing its source."""

import logging
import os
import shutil
from pathlib import Path

import pytest

from meddaemon.config import ConfigError, RouteRule, load_settings, prepare_state_dir
from meddaemon.report.fonts import _matplotlib_ttf_dir


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
    assert settings.watch == (tmp_path / "inbox").resolve()
    assert settings.state_dir == Path("/var/lib/meddaemon")


def dejavu_sans() -> Path:
    folder = _matplotlib_ttf_dir()
    assert folder is not None
    return folder / "DejaVuSans.ttf"


def write_cff_font(path: Path) -> Path:
    """A SYNTHETIC OpenType font with PostScript (CFF) outlines, one glyph: how Noto Sans CJK ships."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.t2CharStringPen import T2CharStringPen

    builder = FontBuilder(1000, isTTF=False)
    builder.setupGlyphOrder([".notdef", "A"])
    builder.setupCharacterMap({0x41: "A"})
    triangle = T2CharStringPen(500, None)
    triangle.moveTo((0, 0))
    triangle.lineTo((500, 0))
    triangle.lineTo((250, 700))
    triangle.closePath()
    glyphs = {".notdef": T2CharStringPen(500, None).getCharString(), "A": triangle.getCharString()}
    builder.setupCFF("SyntheticCFF", {"FullName": "Synthetic CFF"}, glyphs, {})
    builder.setupHorizontalMetrics({".notdef": (500, 0), "A": (500, 0)})
    return saved_font(builder, "Synthetic CFF", path)


def saved_font(builder, family: str, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The tables every font needs, then the font of ``builder`` written to ``path``."""
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": family, "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    builder.save(str(path))
    return path


def write_truetype_font(path: Path, characters: str) -> Path:
    """A SYNTHETIC TrueType font whose every glyph, one for each of ``characters``, is a triangle."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [f"g{ord(char):04x}" for char in characters]
    pen = TTGlyphPen(None)
    pen.moveTo((0, 0))
    pen.lineTo((500, 0))
    pen.lineTo((250, 700))
    pen.closePath()
    triangle = pen.glyph()
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", *names])
    builder.setupCharacterMap({ord(char): name for char, name in zip(characters, names, strict=True)})
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), **{name: triangle for name in names}})
    builder.setupHorizontalMetrics({name: (500, 0) for name in [".notdef", *names]})
    return saved_font(builder, "Synthetic TT", path)


def test_a_report_font_without_the_latin_letters_of_the_report_s_own_words_is_refused(tmp_path: Path):
    """A CJK font (Droid Sans Fallback has no "A" nor "0") was taken: every report's title, finding
    and numbers came out blank, only the patient's name drawn, and no "[?]" said so (text in ASCII
    was never checked). A font that has Latin as well as the script needed is taken."""
    cjk_only = write_truetype_font(tmp_path / "synthetic-cjk.ttf", "山田太郎やまだ")
    env = {"MEDDAEMON_STATE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"reports_font.*no glyph for 72 .*'a'.*blank.*Latin as well"):
        load_settings(env={**env, "MEDDAEMON_REPORTS_FONT": str(cjk_only)})
    printable = "".join(chr(code) for code in range(0x20, 0x7F))
    both = write_truetype_font(tmp_path / "synthetic-latin-cjk.ttf", printable + "山田太郎やまだ")
    assert load_settings(env={**env, "MEDDAEMON_REPORTS_FONT": str(both)}).reports_font == str(both)


def test_a_report_font_reportlab_cannot_draw_with_is_refused_with_the_settings(tmp_path: Path):
    """Only the file's existence was checked: with an OpenType font of PostScript outlines every
    report failed (TTFError), the daemon's scans never left inferred, medcli report printed a traceback."""
    font = write_cff_font(tmp_path / "synthetic-cff.otf")
    with pytest.raises(ConfigError, match=r"reports_font.*postscript outlines are not supported.*TrueType"):
        load_settings(env={"MEDDAEMON_REPORTS_FONT": str(font), "MEDDAEMON_STATE_DIR": str(tmp_path)})
    damaged = tmp_path / "synthetic-damaged.ttf"
    damaged.write_bytes(dejavu_sans().read_bytes()[:4096])
    with pytest.raises(ConfigError, match=r"reports_font.*cannot be used by reportlab"):
        load_settings(env={"MEDDAEMON_REPORTS_FONT": str(damaged), "MEDDAEMON_STATE_DIR": str(tmp_path)})


def test_a_path_starting_with_a_tilde_is_in_the_home_folder_wherever_the_config_file_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Joined to the config file's folder first, ``~/inbox`` became ``/etc/meddaemon/~/inbox``; and
    a ``reports_font`` of ``~/f.ttf`` from the environment was 'not a font file'."""
    home = tmp_path / "home"
    (home / "fonts").mkdir(parents=True)
    font = home / "fonts" / "synthetic.ttf"
    shutil.copy(dejavu_sans(), font)
    monkeypatch.setenv("HOME", str(home))
    config = tmp_path / "etc" / "meddaemon.toml"
    config.parent.mkdir()
    config.write_text('watch = "~/inbox"\nstate_dir = "~/state"\nreports_font = "~/fonts/synthetic.ttf"\n')
    settings = load_settings(config, env={})
    assert (settings.watch, settings.state_dir, settings.reports_font) == (home / "inbox", home / "state", str(font))
    from_env = load_settings(env={"MEDDAEMON_REPORTS_FONT": "~/fonts/synthetic.ttf", "MEDDAEMON_STATE_DIR": str(home)})
    assert from_env.reports_font == str(font)


def test_watch_and_state_dir_are_made_absolute_and_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = tmp_path / "real"
    (real / "inbox").mkdir(parents=True)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "link")
    settings = load_settings(env={"MEDDAEMON_STATE_DIR": "state"}, flags={"watch": Path("inbox")})
    assert settings.watch == real.resolve() / "inbox"
    assert settings.state_dir == real.resolve() / "state"


def test_a_folder_whose_path_is_not_utf8_is_refused_naming_the_setting(tmp_path: Path):
    """The database stores paths under the inbox and the state directory: one that cannot be
    stored would stop the daemon at its first file."""
    latin1 = Path(os.fsdecode(os.fsencode(tmp_path) + b"/bo\xeete"))
    with pytest.raises(ConfigError) as refused:
        load_settings(env={}, flags={"watch": latin1})
    message = str(refused.value)
    assert message.startswith("setting 'watch' from flag: ") and "bo\\xeete is not UTF-8" in message


def test_stored_paths_are_relative_to_the_state_dir_and_read_back_from_anywhere(tmp_path: Path):
    settings = load_settings(env={}, flags={"state_dir": tmp_path / "state"})
    stored = settings.stored_name(settings.archive_dir / "2026-01-02" / "busi" / "a.png")
    assert stored == "archive/2026-01-02/busi/a.png"
    assert settings.stored_file(stored) == settings.state_dir / "archive" / "2026-01-02" / "busi" / "a.png"
    assert settings.stored_name(tmp_path / "inbox" / "a.png") == str(tmp_path / "inbox" / "a.png")
    assert settings.stored_file("/old/absolute/work/ab/x.png") == Path("/old/absolute/work/ab/x.png")


def test_create_watch_is_off_unless_asked_for(tmp_path: Path):
    assert load_settings(env={}).create_watch is False
    config = tmp_path / "c.toml"
    config.write_text("create_watch = true\n")
    assert load_settings(config, env={}).create_watch is True
    assert load_settings(env={}, flags={"create_watch": True}).create_watch is True


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
        ("ray_stall_seconds = 0\n", "'ray_stall_seconds' from file .*: must be > 0"),
        ("stable_seconds = \n", "not valid TOML"),
        ('[[route]]\nmodality = "US"\n', "route needs a task"),
        # each of these was accepted, then a traceback (exit 1) or a daemon that misbehaved
        ("watch = 5\n", "'watch' from file .*: 5 is not a path"),
        ('db = "garbage"\n', "'db' from file .*: not a database URL"),
        ('db = "mysql://127.0.0.1:1/x"\n', "'db' from file .*: a mysql URL: meddaemon runs on SQLite or PostgreSQL"),
        # a traceback at the first connection (a driver not installed, or none of that name), or a
        # database that vanished with the command that made it (`medcli db upgrade` said "done")
        ('db = "postgresql+psycopg2://u@h/x"\n', "'db' from file .*: the driver of postgresql\\+psycopg2:// is not"),
        ('db = "postgresql+foo://u@h/x"\n', "'db' from file .*: the driver of postgresql\\+foo:// is not"),
        ('db = "sqlite://"\n', "'db' from file .*: an in-memory SQLite database ends with the process"),
        ('db = "sqlite:///:memory:"\n', "'db' from file .*: an in-memory SQLite database"),
        ("busy_timeout = -1\n", "'busy_timeout' from file .*: must be >= 0"),
        ("model_poll_seconds = 0\n", "'model_poll_seconds' from file .*: must be > 0"),
        ('device = "cudafoo"\n', "'device' from file .*: 'cudafoo' is not auto, cpu or cuda"),
        (
            '[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "PACS"\nhost = "h"\nport = 999999\n',
            "port 999999 is not a TCP port",
        ),
        # "needs ['port']" for a port given as 0; "'int' object is not iterable" for tasks = 5
        (
            '[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "PACS"\nhost = "h"\nport = 0\n',
            "port 0 is not a TCP port",
        ),
        (
            '[[destination]]\nname = "pacs"\nkind = "folder"\npath = "/x"\ntasks = 5\n',
            "destination 'pacs': tasks must be a text or a list of texts, not 5",
        ),
        # a traceback (a port SQLAlchemy cannot read), or accepted and never working
        ('db = "postgresql+psycopg://med:S3CRET@db.example:5432x/med"\n', "'db' from file .*: not a database URL"),
        ("metrics_port = 9100\nweb_port = 9100\n", "'web_port' from file .*: 9100 is metrics_port too"),
        # PostgreSQL refused these at every connection: exit 3, "database unavailable", restarted by
        # systemd for ever; and 0.0004 was sent as 0, no limit at all
        ("db_lock_timeout_seconds = 3000000\n", "'db_lock_timeout_seconds' from file .*: must be 0 \\(no limit\\)"),
        ("db_lock_timeout_seconds = 0.0004\n", "'db_lock_timeout_seconds' from file .*: must be 0 \\(no limit\\)"),
        ("db_idle_in_transaction_seconds = 3000000\n", "'db_idle_in_transaction_seconds' from file .*: must be 0"),
        (
            "db_keepalive_seconds = 32768\n",
            "'db_keepalive_seconds' from file .*: must be 0 \\(no keepalives\\) or from 0.001 to 32767",
        ),
        ("db_keepalive_seconds = 0.0004\n", "'db_keepalive_seconds' from file .*: must be 0 \\(no keepalives\\)"),
        # named neither the field nor the destination: "True is not a whole number"
        (
            '[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "PACS"\nhost = "h"\nport = true\n',
            "destination 'pacs': port: True is not a whole number",
        ),
        (
            '[[destination]]\nname = "pacs"\nkind = "dicom"\nae_title = "PACS"\nhost = "h"\nport = 104\n'
            'timeout_seconds = "x"\n',
            "destination 'pacs': timeout_seconds: 'x' is not a number",
        ),
        # taken as the folder "5", and not relative to the config file as a text path is
        ('[[destination]]\nname = "out"\nkind = "folder"\npath = 5\n', "destination 'out': path: 5 is not text"),
        # a password in clear, or the template's example, let nobody sign in, and said nothing
        (
            '[web_users.alice]\nrole = "admin"\npassword_hash = "secret"\n',
            "web_users.alice: password_hash is not a hash from `meddaemon web --hash-password`",
        ),
        (
            '[web_users.alice]\nrole = "admin"\npassword_hash = "scrypt$16384$8$1$..."\n',
            "web_users.alice: password_hash is not a hash",
        ),
        (
            'metrics_port = 9100\nweb_port = 9100\nweb_host = "0.0.0.0"\n',
            "'web_port' from file .*: 9100 is metrics_port too, on 127.0.0.1",
        ),
    ],
)
def test_a_bad_config_file_names_the_key_and_the_file(tmp_path: Path, content: str, message: str):
    config = tmp_path / "bad.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        load_settings(config, env={})
    assert "bad.toml" in str(info.value)


def test_two_endpoints_may_share_a_port_on_two_addresses_of_the_machine():
    settings = load_settings(
        env={"MEDDAEMON_METRICS_PORT": "9100", "MEDDAEMON_WEB_PORT": "9100", "MEDDAEMON_WEB_HOST": "127.0.0.2"}
    )
    assert (settings.metrics_port, settings.web_port) == (9100, 9100)


@pytest.mark.parametrize(("watch", "state_dir"), [("state/inbox", "state"), ("state", "state")])
def test_an_inbox_inside_the_state_directory_is_refused_by_the_daemon_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch: str, state_dir: str
):
    """The daemon never read such an inbox (the inbox leaves the state directory out): "0 of 0
    files", exit 0. Commands that never read it run as they did: `medcli db upgrade --state-dir .`
    in a folder, whose default inbox (`inbox`) lies inside it."""
    from click.testing import CliRunner

    from meddaemon.cli.daemon import cli as meddaemon
    from meddaemon.cli.medcli import cli as medcli
    from meddaemon.config import require_inbox_apart

    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={}, flags={"watch": Path(watch), "state_dir": Path(state_dir)})
    with pytest.raises(ConfigError, match=r"'watch' from flag: .* is inside the state directory .* \(from flag\)"):
        require_inbox_apart(settings)
    (tmp_path / watch).mkdir(parents=True, exist_ok=True)
    started = CliRunner().invoke(meddaemon, ["start", "--once", "--watch", watch, "--state-dir", state_dir])
    assert started.exit_code == 2 and "is inside the state directory" in started.output, started.output
    upgraded = CliRunner().invoke(medcli, ["db", "upgrade", "--state-dir", "."])
    assert upgraded.exit_code == 0, upgraded.output


def test_a_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="MEDDAEMON_BATCH_SIZE"):
        load_settings(env={"MEDDAEMON_BATCH_SIZE": "lots"})


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MEDDAEMON_HEATMAPS", "maybe"),
        ("MEDDAEMON_REPORTS", ""),
        ("MEDDAEMON_WORKERS", "2.5"),
        ("MEDDAEMON_METRICS_PORT", "0x50"),
        ("MEDDAEMON_STABLE_SECONDS", "soon"),
        ("MEDDAEMON_LEASE_SECONDS", "nan"),
        ("MEDDAEMON_RESCAN_SECONDS", "inf"),
        ("MEDDAEMON_LOG_LEVEL", "verbose"),
    ],
)
def test_environment_values_are_parsed_strictly(variable: str, value: str):
    with pytest.raises(ConfigError, match=variable):
        load_settings(env={variable: value})


@pytest.mark.parametrize(
    ("value", "expected"), [("yes", True), ("On", True), ("1", True), ("false", False), ("0", False), ("no", False)]
)
def test_booleans_from_the_environment(value: str, expected: bool):
    assert load_settings(env={"MEDDAEMON_HEATMAPS": value}).heatmaps is expected


def test_numbers_and_log_levels_from_the_environment():
    settings = load_settings(
        env={"MEDDAEMON_WORKERS": " 3 ", "MEDDAEMON_BUSY_TIMEOUT": "1.5e1", "MEDDAEMON_LOG_LEVEL": "debug"}
    )
    assert (settings.workers, settings.busy_timeout, settings.log_level) == (3, 15.0, "DEBUG")


def test_a_fraction_for_a_whole_number_in_a_file_is_refused(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("workers = 2.7\n")
    with pytest.raises(ConfigError, match=r"'workers'.*not a whole number"):
        load_settings(config, env={})


def test_an_unknown_key_in_a_file_suggests_the_closest(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text("heatmap = false\n")
    with pytest.raises(ConfigError, match=r"did you mean heatmaps\?"):
        load_settings(config, env={})


def test_an_unknown_environment_variable_is_warned_about_with_the_closest_name(caplog: pytest.LogCaptureFixture):
    env = {
        "MEDDAEMON_HEATMAP": "0",
        "MEDDAEMON_CONFIG_": "x",
        "MEDDAEMON_TEST_POSTGRES": "url",
        "MEDDAEMON_WORKERS": "1",
    }
    with caplog.at_level(logging.WARNING, logger="meddaemon.config"):
        settings = load_settings(env=env)
    assert settings.heatmaps is True  # ignored, not half-applied
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "environment variable MEDDAEMON_CONFIG_ is not a setting and is ignored (did you mean MEDDAEMON_CONFIG?)",
        "environment variable MEDDAEMON_HEATMAP is not a setting and is ignored (did you mean MEDDAEMON_HEATMAPS?)",
    ]


def test_a_variable_in_lower_case_or_for_a_file_only_setting_is_warned_about_saying_why(
    caplog: pytest.LogCaptureFixture,
):
    """``meddaemon_workers=-5`` set nothing and said nothing; ``MEDDAEMON_ROUTE`` was told "did you
    mean MEDDAEMON_NODE?"."""
    env = {"meddaemon_workers": "-5", "MEDDAEMON_ROUTE": "x", "PATH": "/usr/bin"}
    with caplog.at_level(logging.WARNING, logger="meddaemon.config"):
        settings = load_settings(env=env)
    assert settings.workers == load_settings(env={}).workers
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable MEDDAEMON_ROUTE is not a setting and is ignored ('route' is set in the config "
        "file only: its values are tables)",
        "environment variable meddaemon_workers is not a setting and is ignored (did you mean "
        "MEDDAEMON_WORKERS? the names are upper case)",
    ]


def test_the_state_dir_must_be_writable(tmp_path: Path):
    (tmp_path / "a_file").write_text("")
    for state_dir in (tmp_path / "a_file" / "state", Path("/proc/meddaemon-state")):
        settings = load_settings(env={}, flags={"state_dir": state_dir})
        with pytest.raises(ConfigError, match=f"'state_dir' from flag: {state_dir} cannot be used"):
            prepare_state_dir(settings)
    prepare_state_dir(load_settings(env={}, flags={"state_dir": tmp_path / "new"}))
    assert [p.name for p in (tmp_path / "new").iterdir()] == []


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


def test_a_custom_task_s_whole_numbers_may_be_written_as_floats_that_are_whole(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text(
        '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n'
        "contract = { channels = 1.0, height = 224.0, width = 224 }\n"
        "recipe = { epochs = 3.0, early_stopping_patience = 2.0 }\n"
    )
    knee = load_settings(config, env={}).task_specs["knee"]
    assert (knee.contract.channels, knee.contract.height, knee.contract.width, knee.recipe.epochs) == (1, 224, 224, 3)
    assert isinstance(knee.contract.height, int)
    assert repr(knee.recipe.early_stopping_patience) == "2"  # 2.0 went into training's log and config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[tasks.knee]\nlabels = ["a", "b"]\nkind = "ordinal"\ncontract = { channels = 1 }\n', "kind must be one of"),
        ('[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n', "task 'knee': missing or invalid field"),
        ('[tasks.knee]\nlabels = ["a", "a"]\nkind = "binary"\ncontract = { channels = 1 }\n', "must be distinct"),
        (
            f'[tasks.knee]\nlabels = ["a", "{"b" * 65}"]\nkind = "binary"\ncontract = {{ channels = 1 }}\n',
            "each 1 to 64 characters",
        ),
        (
            f'[tasks.{"k" * 65}]\nlabels = ["a", "b"]\nkind = "binary"\ncontract = {{ channels = 1 }}\n',
            "name is 1 to 64 characters",
        ),
        ('[[route]]\ntask = "nonexistent"\n', "unknown task 'nonexistent'"),
        # a number in a route's list passed, and stopped the daemon at its first DICOM, at every start
        ('[[route]]\ntask = "chestxray14"\nmodality = [1]\n', "route.modality must be a text or a list of texts"),
        ('[[route]]\ntask = "chestxray14"\nmodality = { a = 1 }\n', "route.modality must be a text"),
        # a grey or RGB model only: an RGB scan for a 2-channel one was a broadcast traceback
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n'
            "contract = { channels = 2, height = 64, width = 64 }\n",
            "channels must be 1",
        ),
        ('default_task = "nonexistent"\n', "unknown task 'nonexistent'"),
        # the folder the receiver writes into: a task of that name took every instance received
        (
            '[tasks.DICOM]\nlabels = ["a", "b"]\nkind = "binary"\n'
            "contract = { channels = 1, height = 64, width = 64 }\n",
            "tasks.DICOM: 'dicom' is the folder the DICOM receiver writes into",
        ),
        # a text was read as its letters: a 6-class task of 'n', 'o', 'r', 'm', 'a', 'l'
        (
            '[tasks.knee]\nlabels = "normal"\nkind = "multiclass"\n'
            "contract = { channels = 1, height = 64, width = 64 }\n",
            "task 'knee': a task needs at least two labels",
        ),
        # a binary model has one output, for the last label: a third label was never scored
        (
            '[tasks.knee]\nlabels = ["a", "b", "c"]\nkind = "binary"\n'
            "contract = { channels = 1, height = 64, width = 64 }\n",
            "task 'knee': a binary task has two labels, the negative then the positive, not 3",
        ),
        # each was a traceback ('int' object has no attribute 'get'), a Python error text, or taken
        # until `medcli retrain` refused it as if a flag had given it
        ('[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\ncontract = 5\n', "task 'knee': contract must be a table"),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\ncontract = { height = 64, width = 64 }\n',
            r"task 'knee': contract.channels is missing",
        ),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n'
            "contract = { channels = 1, height = 224.5, width = 64 }\n",
            r"task 'knee': contract.height: 224.5 is not a whole number of at least 1",
        ),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n'
            'contract = { channels = 1, height = 64, width = "64" }\n',
            r"task 'knee': contract.width: '64' is not a whole number of at least 1",
        ),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\ncontract = { channels = 1, height = 64, width = 64 }\n'
            "recipe = { batch_size = 0 }\n",
            r"task 'knee': recipe.batch_size: 0 is not a whole number of at least 1",
        ),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\ncontract = { channels = 1, height = 64, width = 64 }\n'
            "recipe = { epochs = -1 }\n",
            r"task 'knee': recipe.epochs: -1 is not a whole number of at least 0",
        ),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\ncontract = { channels = 1, height = 64, width = 64 }\n'
            "recipe = { learning_rate = -1.0 }\n",
            r"task 'knee': recipe.learning_rate: -1.0 is not a number above 0",
        ),
        (
            '[tasks.knee]\nlabels = ["a", "b"]\nkind = "binary"\n'
            "contract = { channels = 1, height = 64, width = 64, hieght = 3 }\n",
            r"task 'knee': contract has unknown keys \['hieght'\] \(did you mean height\?\)",
        ),
    ],
)
def test_bad_custom_tasks_and_routes_to_unknown_tasks_are_refused(tmp_path: Path, content: str, message: str):
    config = tmp_path / "c.toml"
    config.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})


def test_a_custom_task_s_single_modality_or_body_part_is_one_value_not_its_letters(tmp_path: Path):
    """`route_modality = "CR"` was ('C', 'R'): every CR scan of the task failed as contract_mismatch
    ("modality CR is not one of C, R") and its rule never matched (unroutable)."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[tasks.knee]\nlabels = ["normal", "oa"]\nkind = "binary"\nroute_modality = "CR"\nroute_body_part = "KNEE"\n'
        '[tasks.knee.contract]\nchannels = 1\nheight = 64\nwidth = 64\nmodalities = "CR"\n'
    )
    knee = load_settings(config, env={}).task_specs["knee"]
    assert (knee.route_modality, knee.route_body_part, knee.contract.modalities) == (("CR",), ("KNEE",), ("CR",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # each was accepted: an empty inbox is the working directory (the daemon filed its own config
        # file as a failed scan), a text setting took any value's Python text ('True', "['a', 'b']")
        ('watch = ""\n', "'watch' from file .*: empty"),
        ('state_dir = "  "\n', "'state_dir' from file .*: empty"),
        ("ae_title = true\n", "'ae_title' from file .*: True is not text"),
        ('node = ["a", "b"]\n', "'node' from file .*: .* is not text"),
        ("ignore = [1, 2]\n", "'ignore' from file .*: 1 is not text"),
        # pynetdicom refuses what is outside ASCII: the receiver restarted every 2 s, for ever
        ('ae_title = "KLINIK-\u00c4RZTE"\n', "'ae_title' from file .*: 'KLINIK-\u00c4RZTE' is not an AE title"),
        ('dicom_allowed_callers = ["MODALIT\u00c9"]\n', "'dicom_allowed_callers' from file .*: .* is not an AE title"),
        ('ae_title = "A\\u007fB"\n', "'ae_title' from file .*: .* is not an AE title"),
        # heartbeats past the platform's time: the lease thread died, the daemon ran on
        ("lease_seconds = 1e300\n", "'lease_seconds' from file .*: .*<= 86400"),
        # a table where an array of tables belongs: its keys' letters were named
        ('[route]\ntask = "busi"\n', r"'route' from file .*: use \[\[route\]\]"),
        ('[destination]\nname = "x"\n', r"'destination' from file .*: use \[\[destination\]\]"),
        ("[task_dicom_outputs]\nbusi = 5\n", "'task_dicom_outputs' from file .*: task_dicom_outputs.busi is not"),
    ],
)
def test_a_setting_of_the_wrong_shape_is_refused_naming_it(tmp_path: Path, content: str, message: str):
    config = tmp_path / "bad.toml"
    config.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})


@pytest.mark.parametrize("variable", ["MEDDAEMON_WATCH", "MEDDAEMON_STATE_DIR"])
def test_an_empty_folder_from_the_environment_is_refused_not_the_working_directory(variable: str):
    with pytest.raises(ConfigError, match=f"{variable}: empty"):
        load_settings(env={variable: ""})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes("watch = 'caf\u00e9'\n".encode("latin-1")), "is not UTF-8"),
        (lambda p: p.mkdir(), "cannot be read: Is a directory"),
    ],
    ids=["latin-1", "a folder"],
)
def test_a_config_file_that_cannot_be_read_is_an_error_naming_it(tmp_path: Path, make, message: str):  # type: ignore[no-untyped-def]
    """A traceback, exit 1 (UnicodeDecodeError, IsADirectoryError) from MEDDAEMON_CONFIG."""
    config = tmp_path / "meddaemon.toml"
    make(config)
    with pytest.raises(ConfigError, match=f"config file {config} {message}"):
        load_settings(env={"MEDDAEMON_CONFIG": str(config)})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('archtecture = "densenet121"\n', r"unknown keys \['archtecture'\] \(did you mean architecture\?\)"),
        ("stable_seconds = 30\n", r"unknown keys \['stable_seconds'\]"),  # a top-level setting written below the table
        ('architecture = "nosuchnet"\n', "architecture 'nosuchnet' is not one of"),
        ("[tasks.knee.recipe]\nepochz = 3\n", r"recipe has unknown keys \['epochz'\]"),
    ],
)
def test_a_custom_task_s_unknown_keys_and_architecture_are_refused(tmp_path: Path, table: str, message: str):
    """Ignored without a word: the task ran with resnet18 and no route, the setting at its default."""
    config = tmp_path / "c.toml"
    config.write_text(
        '[tasks.knee]\nlabels = ["normal", "oa"]\nkind = "binary"\n'
        "contract = { channels = 1, height = 64, width = 64 }\n" + table
    )
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})


@pytest.mark.parametrize(
    ("name", "contract", "message"),
    [
        ("knee", "{ channels = 1, height = 0, width = 224 }", "contract.height: 0 is not a whole number of at least 1"),
        ("../../etc", "{ channels = 1, height = 64, width = 64 }", "a task's name is letters, digits"),
        ("a/b", "{ channels = 1, height = 64, width = 64 }", "a task's name is letters, digits"),
        (".hidden", "{ channels = 1, height = 64, width = 64 }", "a task's name is letters, digits"),
    ],
)
def test_a_custom_task_s_name_and_input_size_are_checked(tmp_path: Path, name: str, contract: str, message: str):
    """A task's name is a folder of the registry and of the inbox: ``../../etc`` put a model's folder
    outside ``models/``; a height of 0 failed at the first scan (a resize to nothing)."""
    config = tmp_path / "c.toml"
    config.write_text(f'[tasks."{name}"]\nlabels = ["normal", "oa"]\nkind = "binary"\ncontract = {contract}\n')
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env={})


def test_a_database_password_in_the_url_s_query_is_hidden_as_the_one_before_the_host():
    settings = load_settings(
        env={"MEDDAEMON_DB": "postgresql+psycopg://med@db.example/med?password=S3CRET&sslmode=require"}
    )
    shown = settings.public_dict()  # what config show prints
    assert "S3CRET" not in str(shown) and "sslmode=require" in str(shown)


def test_a_config_file_starting_with_a_byte_order_mark_is_read(tmp_path: Path):
    """As Notepad saves UTF-8: "not valid TOML: Invalid statement (at line 1, column 1)"."""
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xef\xbb\xbfworkers = 3\n")
    assert load_settings(config, env={}).workers == 3


def test_a_password_hash_from_hash_password_is_accepted(tmp_path: Path):
    from meddaemon.web.auth import hash_password, verify_password

    stored = hash_password("correct horse")
    config = tmp_path / "c.toml"
    config.write_text(f'[web_users.alice]\nrole = "admin"\npassword_hash = "{stored}"\n')
    users = load_settings(config, env={}).web_users
    assert users == {"alice": {"role": "admin", "password_hash": stored}}
    assert verify_password("correct horse", users["alice"]["password_hash"])
