"""Schemathesis against the live app: no 5xx, and every response matches the OpenAPI document.

One check is left out: ``positive_data_acceptance`` expects every schema-valid body to be accepted, but
some valid-looking bodies are refused on purpose (``2.0`` for an integer under strict parsing, a model name
that is not registered, a timeout over the server's maximum); those get a documented 422.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from jobs.workers import WorkerInfo


def _operations(app):
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize(
    "operation_id",
    ["submitJob", "listJobs", "getJob", "cancelJob", "jobEvents", "listModels", "listWorkers", "health", "ready"],
)
def test_api_never_errors_and_matches_its_schema(app, operation_id):
    # A live worker for the default model, so /readyz answers 200 (its 503 is covered elsewhere).
    info = WorkerInfo(name="tiny-bloom@h.cpu", instance="tiny-bloom@h.cpu:1", model="tiny-bloom", host="h",
                      device="cpu", dtype="float32", pid=1)
    app.extensions["bloomq"].directory.announce(info, ttl_seconds=60)
    (operation,) = [op for op in _operations(app) if op.definition.raw.get("operationId") == operation_id]

    @given(case=operation.as_strategy())
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    check()
