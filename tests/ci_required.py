"""pytest plugin: in CI (CI=true) a skipped required test fails the run, so green CI means it ran.

Some tests skip on a machine that lacks what they need: the browser tests without /usr/bin/chromium,
the real-torch_npu tests when pip cannot install the wheel. Locally that is fine; in CI it would hide
a broken setup behind a green run. Tests opt in with `@pytest.mark.required_in_ci` (or a module's
`pytestmark`); the modules in REQUIRED_MODULES are marked here. tests/conftest.py loads this plugin.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

MARKER = "required_in_ci"
REQUIRED_MODULES = ("test_web_browser.py", "test_real_torch_npu.py")


def in_ci(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """CI=true (as GitHub Actions, GitLab CI and most others set it; also 1 or yes)."""
    value = (os.environ if env is None else env).get("CI", "")
    return value.strip().lower() in ("true", "1", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: in CI (CI=true) a skip of this test fails the run")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in REQUIRED_MODULES:
            item.add_marker(MARKER)


def _skip_reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if report.skipped and in_ci() and item.get_closest_marker(MARKER) is not None and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"required test skipped in CI (CI=true): {_skip_reason(report.longrepr)}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, Any]:
    """A required module skipped as a whole (pytest.skip(allow_module_level=True)) fails too."""
    report = yield
    if report.skipped and in_ci() and isinstance(collector, pytest.Module) and collector.path.name in REQUIRED_MODULES:
        report.outcome = "failed"
        report.longrepr = f"required module skipped in CI (CI=true): {_skip_reason(report.longrepr)}"
    return report
