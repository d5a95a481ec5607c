"""schemathesis against the sidecar's OpenAPI document (ASGI transport, bounded examples).

Every operation gets generated requests (valid and invalid names, headers, query values and
random binary bodies); schemathesis's checks must hold: no 5xx, status codes, content types,
headers and JSON bodies as documented, invalid data rejected. One check is left out for the
batch upload only: ``positive_data_acceptance`` — a body that is schema-valid (any bytes) is
still malformed when its length does not match ``X-Repwatch-Shape``, which no OpenAPI schema
can express, so a 400 there is the documented answer, not a violation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
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


@pytest.fixture(scope="module", autouse=True)
def _close_apps() -> Iterator[None]:
    yield
    _APP.state.sidecar.close()
    _TOKEN_APP.state.sidecar.close()


def _conforms(case: schemathesis.Case) -> None:
    upload = case.operation.method.upper() == "POST"
    response = case.call_and_validate(
        excluded_checks=[positive_data_acceptance] if upload else None)
    assert response.status_code < 500


def _conformance_test(method: str, path: str) -> Any:
    """A test of one operation. One test function per operation, not one parametrized over
    them all: schemathesis gives every operation of one function the same node id, and
    pytest-xdist (``make test``) schedules by node id, so it would run only the first."""
    @schema.include(method=method, path=path).parametrize()
    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def test(case: schemathesis.Case) -> None:
        _conforms(case)

    test.__doc__ = f"{method} {path} conforms to the OpenAPI document."
    return test


OPERATIONS = [result.ok() for result in schema.get_all_operations()]
for _op in OPERATIONS:
    _name = "test_conforms_" + re.sub(r"\W+", "_", f"{_op.method} {_op.path}").strip("_").lower()
    globals()[_name] = _conformance_test(_op.method.upper(), _op.path)


def test_every_operation_has_its_own_conformance_test() -> None:
    names = [n for n in globals() if n.startswith("test_conforms_")]
    assert len(OPERATIONS) >= 9 and len(names) == len(OPERATIONS), (names, OPERATIONS)


def test_generation_reached_the_upload_handler() -> None:
    """The fuzzing must get past routing into the handler's own checks (else it proved nothing
    about them): generated uploads are answered 400/413/415 by the handler, or 202. Generates
    its own cases, so it holds whatever ran before it."""
    upload = schema["/v1/runs/{run}/streams/{stream}/batches"]["POST"]
    seen: set[int] = set()

    @given(case=upload.as_strategy())
    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def send(case: schemathesis.Case) -> None:
        seen.add(case.call().status_code)

    send()
    assert seen & {202, 400, 409, 413, 415}, seen


@token_schema.include(method="POST").parametrize()
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_upload_with_a_token_conforms(case: schemathesis.Case) -> None:
    """With a token the document declares bearer auth; requests without it must get 401
    (schemathesis's ``missing_required_header`` / ``ignored_auth`` checks)."""
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    assert response.status_code < 500
