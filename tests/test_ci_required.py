"""The CI guard (tests/ci_required.py): with CI=true a skipped required test fails the run.

Each test runs pytest in a subprocess on a small generated test folder, with and without CI=true,
and reads the outcomes from its JUnit XML report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from npu_standin import REPO

SAMPLE = """
import pytest

@pytest.fixture
def wheel():
    pytest.skip("cannot install the wheel")

@pytest.mark.required_in_ci
def test_required_skip_call():
    pytest.skip("chromium is missing")

@pytest.mark.required_in_ci
@pytest.mark.skipif(True, reason="chromium is missing")
def test_required_skipif():
    pass

@pytest.mark.required_in_ci
def test_required_fixture_skip(wheel):
    pass

@pytest.mark.required_in_ci
def test_required_that_runs():
    pass

@pytest.mark.required_in_ci
@pytest.mark.xfail(reason="known bug", strict=True)
def test_required_xfail():
    assert False

def test_optional_skip():
    pytest.skip("optional")
"""
# Named like the real required modules, which ci_required marks without any marker in them.
NAMED_MODULE = "import pytest\n\ndef test_needs_the_wheel():\n    pytest.skip('pip cannot install torch-npu')\n"
WHOLE_MODULE = "import pytest\n\npytest.skip('no chromium', allow_module_level=True)\n\ndef test_page():\n    pass\n"


def outcomes(folder: Path, ci: str | None) -> dict[str, str]:
    """Run pytest with the plugin on `folder`; {test name: passed|failed|skipped|xfailed|error}."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    report = folder / "report.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_required", "-p", "no:cacheprovider", "-q", "--rootdir", str(folder),
         "-c", str(folder / "pytest.ini"), f"--junitxml={report}", str(folder)],
        capture_output=True, text=True, cwd=folder, env=env, timeout=300,
    )
    assert result.returncode in (0, 1, 2, 5), result.stdout + result.stderr  # 5: nothing collected
    found: dict[str, str] = {}
    for case in ElementTree.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        status = {"failure": "failed", "error": "error", "skipped": "skipped"}[kinds[0]] if kinds else "passed"
        if status == "skipped" and "xfail" in (case.find("skipped").get("type") or ""):  # type: ignore[union-attr]
            status = "xfailed"
        found[case.get("name") or case.get("classname") or "?"] = status
    return found


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(SAMPLE))
    (tmp_path / "test_real_torch_npu.py").write_text(NAMED_MODULE)
    return tmp_path


def test_outside_ci_required_tests_may_skip(folder: Path) -> None:
    for ci in (None, "false", ""):
        found = outcomes(folder, ci)
        assert found["test_required_skip_call"] == found["test_required_skipif"] == "skipped"
        assert found["test_required_fixture_skip"] == found["test_needs_the_wheel"] == "skipped"
        assert found["test_required_that_runs"] == "passed" and found["test_optional_skip"] == "skipped"
        assert "error" not in found.values() and "failed" not in found.values()


def test_in_ci_a_skipped_required_test_fails(folder: Path) -> None:
    found = outcomes(folder, "true")
    # a skip during setup (skipif marker, skipping fixture) is reported as an error, during the call as a failure
    assert found["test_required_skip_call"] == found["test_needs_the_wheel"] == "failed"
    assert found["test_required_skipif"] == found["test_required_fixture_skip"] == "error"
    assert found["test_required_that_runs"] == "passed" and found["test_optional_skip"] == "skipped"
    assert found["test_required_xfail"] == "xfailed"


def test_in_ci_a_skipped_required_module_fails(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_web_browser.py").write_text(WHOLE_MODULE)
    assert outcomes(tmp_path, None) == {"test_web_browser": "skipped"}
    assert outcomes(tmp_path, "true") == {"test_web_browser": "error"}


def test_in_ci_the_failure_names_the_skip_reason(folder: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CI="TRUE", PYTHONPATH=str(REPO / "tests"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_required", "-p", "no:cacheprovider", "-q", "-rf", "--rootdir",
         str(folder), "-c", str(folder / "pytest.ini"), str(folder / "test_sample.py")],
        capture_output=True, text=True, cwd=folder, env=env, timeout=300,
    )
    assert result.returncode == 1
    assert "required test skipped in CI (CI=true): chromium is missing" in result.stdout
    assert "required test skipped in CI (CI=true): cannot install the wheel" in result.stdout


def test_the_suite_marks_its_required_modules() -> None:
    """conftest.py loads the plugin: every test of the required modules carries the marker."""
    from ci_required import REQUIRED_MODULES

    paths = [str(REPO / "tests" / name) for name in REQUIRED_MODULES]
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths]
    every = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    marked = subprocess.run([*command, "-m", "required_in_ci"], capture_output=True, text=True, cwd=REPO, timeout=300)
    listed = [line for line in every.stdout.splitlines() if "::" in line]
    assert {line.split("::")[0].rsplit("/", 1)[-1] for line in listed} == set(REQUIRED_MODULES)
    assert [line for line in marked.stdout.splitlines() if "::" in line] == listed
