"""What the commands print: a file name that is not UTF-8 is written as the bytes it is, whatever
the locale's encoding of stdout would refuse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meddaemon.training.phantoms import write_phantoms

MEDCLI = Path(sys.executable).parent / "medcli"


def test_a_dataset_file_name_that_is_not_utf8_is_printed_as_its_bytes_under_a_strict_utf8_stdout(tmp_path: Path):
    """In a UTF-8 locale (en_US.UTF-8, here forced with PYTHONIOENCODING) Python's stdout refuses
    such a name, and ``medcli dataset inspect`` stopped with a traceback at the first one it listed."""
    data = write_phantoms("busi", tmp_path / "busi", count=12, size=48, seed=5).root
    Path(os.fsdecode(os.fsencode(data) + b"/benign/synthetic \xe9 (99).png")).write_bytes(b"not a png")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDDAEMON_")} | {"PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([str(MEDCLI), "dataset", "inspect", str(data)], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"benign/synthetic \xe9 (99).png: unreadable image (unrecognised_format" in done.stdout


def test_what_the_stream_s_encoding_cannot_hold_is_escaped_and_a_name_s_bytes_are_written_as_they_are():
    """With plain surrogateescape (stdout, and stderr where the commands to run next go) a message
    holding Chinese on a Latin-1 terminal, or a lone surrogate from a JSON manifest, was a
    UnicodeEncodeError: a log line lost ("--- Logging error ---"), an error message lost with stderr."""
    import io

    from meddaemon.cli.common import names_as_they_are

    for encoding, chinese in (("latin-1", b"\\u6570\\u636e"), ("utf-8", "数据".encode())):
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding=encoding)
        names_as_they_are(stream)
        stream.write("caf\udce9 数据 \ud83d\n")  # a Latin-1 byte of a name, Chinese, half an emoji
        stream.flush()
        assert raw.getvalue() == b"caf\xe9 " + chinese + b" \\ud83d\n", encoding
