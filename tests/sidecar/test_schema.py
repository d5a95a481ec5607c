"""schemathesis against the sidecar's OpenAPI document (ASGI transport, bounded examples).

Every operation gets generated requests (valid and invalid names, headers, query values and
random binary bodies); schemathesis's checks must hold: no 5xx, status codes, content types,
headers and JSON bodies as documented, invalid data rejected. One check is left out for the
batch upload only: ``positive_data_acceptance`` — a body that is schema-valid (any bytes) is
still malformed when its length does not match ``X-Repwatch-Shape``, which no OpenAPI schema
can express, so a 400 there is the documented answer, not a violation.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from monitor.sidecar.service import SidecarConfig, create_sidecar_app

# .npy bodies are bytes on the wire like octet-stream ones (random bytes: the handler's .npy
# parser must answer 400/415, never 5xx).
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")

_LIMITS = {"every": 1, "window": 64, "max_body_bytes": 1 << 16, "max_dim": 64,
           "max_rows_per_batch": 256, "queue_batches": 4}
_APP = create_sidecar_app(SidecarConfig(**_LIMITS))
_TOKEN_APP = create_sidecar_app(SidecarConfig(token="s3cret", **_LIMITS))
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)
token_schema = schemathesis.openapi.from_asgi("/openapi.json", _TOKEN_APP)
_SEEN: dict[str, set[int]] = {}


@pytest.fixture(scope="module", autouse=True)
def _close_apps() -> Iterator[None]:
    yield
    _APP.state.sidecar.close()
    _TOKEN_APP.state.sidecar.close()


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi(case: schemathesis.Case) -> None:
    upload = case.operation.method.upper() == "POST"
    response = case.call_and_validate(
        excluded_checks=[positive_data_acceptance] if upload else None)
    assert response.status_code < 500
    _SEEN.setdefault(case.operation.label, set()).add(response.status_code)


def test_generation_reached_the_upload_handler() -> None:
    """The fuzzing above must get past routing into the handler's own checks (else it proved
    nothing about them): some upload answered 400/413/415 from the handler or 202."""
    seen = _SEEN.get("POST /v1/runs/{run}/streams/{stream}/batches", set())
    if not seen:
        pytest.skip("run together with test_api_conforms_to_its_openapi")
    assert seen & {202, 400, 409, 413, 415}, seen


@token_schema.include(method="POST").parametrize()
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_upload_with_a_token_conforms(case: schemathesis.Case) -> None:
    """With a token the document declares bearer auth; requests without it must get 401
    (schemathesis's ``missing_required_header`` / ``ignored_auth`` checks)."""
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500
