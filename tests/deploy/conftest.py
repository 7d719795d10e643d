"""Fixtures the deploy tests share."""

import helm_python
import pytest

from deploy_support import CHART


@pytest.fixture(scope="module")
def chart():
    """The chart, loaded once per module by the Helm SDK, for rendering with any values."""
    with helm_python.Chart.load(str(CHART)) as loaded:
        yield loaded
