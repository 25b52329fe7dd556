"""Shared test configuration: the hypothesis profiles.

CI (``HYPOTHESIS_PROFILE=ci``, set by ``make test``) is derandomized and has no deadline, so
simulator-driven properties cannot fail on a slow machine or on a lucky draw.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
