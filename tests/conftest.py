import pytest

from tests.harness import Procs


@pytest.fixture
def procs():
    p = Procs()
    try:
        yield p
    finally:
        p.cleanup()
