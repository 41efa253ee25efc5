"""scripts/system-packages.sh: the Debian packages the tests need, installed before pytest runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "system-packages.sh"


def packages() -> list[str]:
    body = re.search(r"^PACKAGES=\((.*?)^\)", SCRIPT.read_text(), re.S | re.M)
    assert body, "PACKAGES=( ... ) not found"
    return [line.split("#")[0].strip() for line in body.group(1).splitlines() if line.split("#")[0].strip()]


def test_the_browser_tests_packages_are_listed():
    assert {"chromium", "chromium-driver"} <= set(packages())


def test_the_test_script_installs_them_before_the_suite_runs():
    lines = (ROOT / "scripts" / "test.sh").read_text().splitlines()
    assert lines.index("bash scripts/system-packages.sh") < next(i for i, x in enumerate(lines) if "-m pytest" in x)


def test_it_is_valid_bash_and_does_nothing_when_everything_is_installed():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package} ${Status}\n", *packages()], capture_output=True, text=True
    ).stdout
    if all(f"{p} install ok installed" in installed for p in packages()):
        result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout == ""
