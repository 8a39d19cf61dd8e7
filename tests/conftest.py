"""Shared pytest options and fixtures.

`--update-golden` makes golden-file tests rewrite their expected output instead of comparing
(tests/bad/*.err today). A test that owns golden files takes the `update_golden` fixture; new
options go in `pytest_addoption` below, one `parser.addoption` each.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite expected-output (golden) files from the current output instead of comparing",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True under `pytest --update-golden`: write the expected file, do not compare."""
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(autouse=True, scope="session")
def _column_store_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Column stores (runtime/store.py) of the tests' data go to a temporary folder, never beside the shared
    samples (which a test run as root could write to). Tests of the store's own placement unset it."""
    import os

    os.environ["MTLDSL_CACHE_DIR"] = str(tmp_path_factory.mktemp("mtldsl-cache"))  # store.CACHE_ENV
