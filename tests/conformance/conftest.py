import pytest

from conformance.harness import VARIANTS


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Every registered variant: built-ins, entry-point plugins, and the test plugin."""
    return request.param
