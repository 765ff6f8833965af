"""The fixtures every test file under tests/ shares (tests/helpers.py makes them)."""
from tests.helpers import dataset, trained  # noqa: F401
