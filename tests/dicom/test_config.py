"""The DICOM-out settings: ``dicom_outputs`` (and per task), ``[[destination]]`` tables, outbox timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from meddaemon.config import ConfigError, DestinationConfig, load_settings

CONFIG = """
dicom_outputs = ["sr", "pdf"]
outbox_retry_seconds = 0.5

[task_dicom_outputs]
chestxray14 = ["sr", "pmap", "sc"]

[[destination]]
name = "pacs"
kind = "dicom"
ae_title = "PACS"
host = "127.0.0.1"
port = 11112

[[destination]]
name = "web"
kind = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
tasks = ["busi"]
outputs = ["sr"]
"""


def settings_from(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    config = tmp_path / "meddaemon.toml"
    config.write_text(text)
    return load_settings(config, env={})


def test_destinations_and_outputs_per_task_come_from_the_config_file(tmp_path: Path):
    s = settings_from(tmp_path, CONFIG)
    assert s.destination == (
        DestinationConfig("pacs", "dicom", ae_title="PACS", host="127.0.0.1", port=11112),
        DestinationConfig("web", "dicomweb", url="http://127.0.0.1:8042/dicom-web", tasks=("busi",), outputs=("sr",)),
    )
    assert s.dicom_outputs_for("busi") == ("sr", "pdf")
    assert s.dicom_outputs_for("chestxray14") == ("sr", "pmap", "sc")
    assert s.outbox_retry_seconds == 0.5
    pacs, web = s.destination
    assert pacs.receives("covid", "pmap") and web.receives("busi", "sr")
    assert not web.receives("covid", "sr") and not web.receives("busi", "pdf")


def test_a_relative_folder_destination_and_tls_files_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """As the inbox and state directory are: not to the daemon's working directory (``/`` under
    systemd, where ``path = "pacs-share"`` wrote the objects to ``/pacs-share``)."""
    etc, keys = tmp_path / "etc", tmp_path / "keys"
    for file in (etc / "tls" / "node.pem", keys / "node.key"):
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("SYNTHETIC, not a certificate")
    monkeypatch.chdir(tmp_path)
    text = (
        f'dicom_tls_cert = "tls/node.pem"\ndicom_tls_key = "{keys / "node.key"}"\ndicom_tls_ca = ""\n'
        '[[destination]]\nname = "share"\nkind = "folder"\npath = "pacs-share"\n'
        '[[destination]]\nname = "archive"\nkind = "folder"\npath = "/mnt/archive"\n'
        '[[destination]]\nname = "web"\nkind = "dicomweb"\nurl = "https://pacs/dicom-web"\nca_file = "tls/ca.pem"\n'
    )
    (etc / "tls" / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nSYNTHETIC\n-----END CERTIFICATE-----\n")
    s = settings_from(etc, text)
    assert [d.path for d in s.destination] == [str(etc / "pacs-share"), "/mnt/archive", ""]
    assert s.destination[2].ca_file == str(etc / "tls" / "ca.pem")
    assert (s.dicom_tls_cert, s.dicom_tls_key) == (str(etc / "tls" / "node.pem"), str(keys / "node.key"))
    assert s.dicom_tls_ca == ""
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "node.pem").write_text("SYNTHETIC")
    flags = {"dicom_tls_cert": "tls/node.pem", "dicom_tls_key": str(keys / "node.key")}
    assert load_settings(env={}, flags=flags).dicom_tls_cert == "tls/node.pem"  # a flag: as the shell means it


def test_the_defaults_write_every_output_and_send_nowhere():
    s = load_settings(env={})
    assert s.dicom_outputs == ("sr", "pmap", "sc", "pdf") and s.destination == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[destination]]\nname = "x"\nkind = "ftp"\n', "kind 'ftp' is not one of"),
        ('[[destination]]\nname = "x"\nkind = "dicom"\nhost = "h"\n', "needs \\['ae_title', 'port'\\]"),
        ('[[destination]]\nname = "x"\nkind = "folder"\npath = "/p"\ncolour = 1\n', "unknown keys \\['colour'\\]"),
        ('[[destination]]\nname = "x"\nkind = "folder"\npath = "/p"\ntasks = ["knee"]\n', "unknown task 'knee'"),
        (
            '[[destination]]\nname = "x"\nkind = "folder"\npath = "/a"\n'
            '[[destination]]\nname = "x"\nkind = "folder"\npath = "/b"\n',
            "names must differ",
        ),
        ('dicom_outputs = ["sr", "seg"]\n', "unknown DICOM outputs \\['seg'\\]"),
        (
            '[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "https://h/"\nca_file = "/nowhere.pem"\n',
            "ca_file /nowhere.pem cannot be read",
        ),
        (
            '[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "https://h/"\nca_file = "/proc/version"\n',
            "ca_file /proc/version holds no certificate in PEM",
        ),
        (
            '[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "http://h/"\nca_file = "/proc/version"\n',
            "ca_file is for a dicomweb destination whose url is https",
        ),
        (
            '[[destination]]\nname = "x"\nkind = "folder"\npath = "/p"\nca_file = "/proc/version"\n',
            "ca_file is for a dicomweb destination whose url is https",
        ),
        ('[task_dicom_outputs]\nknee = ["sr"]\n', "unknown task 'knee'"),
        ('dicom_uid_root = "1.2.x"\n', "is not a UID root"),
        # accepted, then every object of every scan failed to build (pydicom refuses the prefix)
        ('dicom_uid_root = "1.2.03."\n', "is not a UID root .*no part begins with 0"),
        ("outbox_max_attempts = 0\n", "must be >= 1"),
        (
            '[[destination]]\nname = "x"\nkind = "dicom"\nae_title = "P"\nhost = "h"\nport = 104\n'
            "keep_open_seconds = -1\n",
            "keep_open_seconds >= 0",
        ),
        # pynetdicom refused them at every send: each object retried to dead, a traceback each time
        (
            '[[destination]]\nname = "x"\nkind = "dicom"\nae_title = "THIS-AE-TITLE-IS-TOO-LONG"\nhost = "h"\n'
            "port = 104\n",
            "ae_title 'THIS-AE-TITLE-IS-TOO-LONG' is not an AE title",
        ),
        (
            '[[destination]]\nname = "x"\nkind = "dicom"\nae_title = "P"\nhost = "h"\nport = 104\n'
            'calling_ae_title = "MED\\\\DAEMON"\n',
            "calling_ae_title .* is not an AE title",
        ),
        # accepted, then every send round a traceback and the object never tried (a client refusing it)
        (
            '[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "pacs.example/dicom-web"\n',
            "is not an http\\(s\\) URL",
        ),
        ('[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "ftp://pacs.example/x"\n', "is not an http\\(s\\) URL"),
        ('[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = 5\n', "is not an http\\(s\\) URL"),
        (
            '[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "https://bob:S3CRET@pacs.example:x/"\n',
            "url 'https://bob:\\*\\*\\*@pacs.example:x/' is not an http",
        ),
        (
            '[[destination]]\nname = "x"\nkind = "dicomweb"\nurl = "http://[::1/dicom-web"\n',
            "'x': url '\\*\\*\\*' is not",
        ),
    ],
)
def test_a_bad_dicom_out_setting_is_an_error_naming_it(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=message):
        settings_from(tmp_path, text)


def test_config_show_hides_the_password_of_a_dicomweb_url(tmp_path: Path):
    """It printed ``https://bob:S3CRET@...``: requests sends a URL's user and password as the login."""
    text = (
        '[[destination]]\nname = "web"\nkind = "dicomweb"\n'
        'url = "https://bob:S3CRET@pacs.example:8443/dicom-web?token=T0KEN&x=1"\n'
    )
    s = settings_from(tmp_path, text)
    assert s.destination[0].url == "https://bob:S3CRET@pacs.example:8443/dicom-web?token=T0KEN&x=1"  # as given
    [shown] = s.public_dict()["destination"]
    assert shown["url"] == "https://bob:***@pacs.example:8443/dicom-web?token=***&x=1"
    plain = '[[destination]]\nname = "web"\nkind = "dicomweb"\nurl = "http://[::1]:8042/dicom-web?a=1;b=2&flag"\n'
    [shown] = settings_from(tmp_path, plain).public_dict()["destination"]
    assert shown["url"] == "http://[::1]:8042/dicom-web?a=1;b=2&flag"  # no secret: shown as written


def test_the_environment_sets_the_outputs_as_a_comma_separated_list():
    s = load_settings(env={"MEDDAEMON_DICOM_OUTPUTS": "sr,sc"})
    assert s.dicom_outputs == ("sr", "sc")


def test_config_show_prints_the_destinations_as_toml_tables(tmp_path: Path):
    from click.testing import CliRunner

    from meddaemon.cli.daemon import cli

    config = tmp_path / "meddaemon.toml"
    config.write_text(CONFIG)
    shown = CliRunner().invoke(cli, ["config", "show", "--config", str(config)])
    line = next(x for x in shown.stdout.splitlines() if x.startswith("destination = "))
    assert 'name = "web", kind = "dicomweb"' in line and 'tasks = ["busi"], outputs = ["sr"]' in line
    assert "()" not in line


def test_the_receiver_settings_come_from_the_file_the_environment_and_the_start_flags(tmp_path: Path):
    from click.testing import CliRunner

    from meddaemon.cli.daemon import cli

    s = settings_from(tmp_path, 'dicom_port = 11112\ndicom_allowed_callers = ["CT01", "ORTHANC"]\n')
    assert (s.dicom_port, s.ae_title, s.dicom_allowed_callers) == (11112, "MEDDAEMON", ("CT01", "ORTHANC"))
    assert (s.dicom_host, s.series_quiet_seconds, s.received_dir) == ("127.0.0.1", 60.0, s.watch / "dicom")
    s = load_settings(env={"MEDDAEMON_DICOM_ALLOWED_CALLERS": "CT01, MR02", "MEDDAEMON_AE_TITLE": "AI NODE"})
    assert (s.dicom_allowed_callers, s.ae_title) == (("CT01", "MR02"), "AI NODE")
    s = load_settings(env={}, flags={"dicom_port": 104, "ae_title": "MD1", "dicom_host": None})
    assert (s.dicom_port, s.ae_title, s.sources["dicom_port"], s.sources["dicom_host"]) == (
        104,
        "MD1",
        "flag",
        "default",
    )
    started = CliRunner().invoke(cli, ["start", "--help"])
    assert "--dicom-port" in started.stdout and "--ae-title" in started.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dicom_port = 70000\n", "must be a TCP port"),
        ('ae_title = "A\\\\B"\n', "is not an AE title"),
        ('ae_title = "SEVENTEEN_LETTERS"\n', "is not an AE title"),
        ('dicom_allowed_callers = ["  "]\n', "is not an AE title"),
        ("dicom_max_associations = 0\n", "must be >= 1"),
        ('dicom_tls_cert = "/etc/hosts"\n', "needs both dicom_tls_cert and dicom_tls_key"),
        ('dicom_tls_cert = "/nonexistent.pem"\ndicom_tls_key = "/nonexistent.key"\n', "is not a file"),
        ("series_quiet_seconds = -1\n", "must be >= 0"),
    ],
)
def test_a_bad_receiver_setting_is_an_error_naming_it(tmp_path: Path, text: str, message: str):
    with pytest.raises(ConfigError, match=message):
        settings_from(tmp_path, text)
