"""Fixtures of the docker-compose suite's tests: the suite's images, built locally once."""

import os

import pytest
from compose_testing import missing_requirements, suite_images


@pytest.fixture(scope="session")
def compose_images() -> tuple[dict[str, str], dict[str, float]]:
    """``({FLOPS_*_IMAGE: local tag}, {image: build seconds})`` of every image of
    ``docker-compose.yml`` (:func:`compose_testing.suite_images`).

    Skips when Docker cannot run here, or fails when ``FLOPS_REQUIRE_OCI=1`` (CI sets it).
    """
    missing = missing_requirements()
    if missing:
        message = f"the compose suite needs {', '.join(missing)}"
        if os.environ.get("FLOPS_REQUIRE_OCI") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return suite_images()
