"""Schemathesis over the app's own OpenAPI: every operation, valid and invalid requests.

No answer is a 5xx, and every answer is documented: its status code, content type and body
schema. Requests run in-process against the app with its real lifespan (PostgreSQL, the fake
OpenAI server), on the test's event loop.
"""

from __future__ import annotations

from typing import Any

import httpx2
import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings

AppClient = tuple[FastAPI, httpx2.AsyncClient]
Operation = APIOperation[Any, Any, Any, Any]

# The OpenAPI document needs no I/O: build it from an app that is never started.
SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(_env_file=None, env="testing")).openapi()
)
OPERATIONS: list[Operation] = []
for _result in SCHEMA.get_all_operations():
    assert isinstance(_result, Ok), _result  # the app's own schema is valid
    OPERATIONS.append(_result.ok())
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def cases(operation: Operation) -> st.SearchStrategy[Case[Operation]]:
    """Valid requests, plus invalid ones where there is something to get wrong."""
    positive = operation.as_strategy(generation_mode=GenerationMode.POSITIVE)
    if len(operation.query) == 0 and len(operation.body) == 0:
        return positive
    return positive | operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)


async def send(client: httpx2.AsyncClient, case: Case[Operation]) -> httpx2.Response:
    """The request schemathesis would send, encoded by requests, sent through the app's client."""
    kwargs: dict[str, Any] = case.as_transport_kwargs(base_url=str(client.base_url))
    kwargs.pop("cookies", None)
    prepared = requests.Request(**kwargs).prepare()
    assert prepared.method is not None and prepared.url is not None
    body = prepared.body
    assert body is None or isinstance(body, bytes | str)
    headers = {
        key: value if isinstance(value, str) else value.decode("latin-1")
        for key, value in prepared.headers.items()
    }
    return await client.request(prepared.method, prepared.url, headers=headers, content=body)


@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
@settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
async def test_operation_conforms_to_its_schema(
    app_client: AppClient, operation: Operation, data: st.DataObject
) -> None:
    _, client = app_client
    case = data.draw(cases(operation), label="case")
    response = await send(client, case)
    case.validate_response(response, checks=CHECKS)
