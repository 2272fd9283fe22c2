"""Shared fixtures live in tests/fixtures/; each module there has one owner and one job."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.services",
]
