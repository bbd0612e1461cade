"""`X-Schema-Version` / `X-Prompt-Set-Version`: a client pins the versions it was written for.

As in the reference API: absent means the current versions; a version other than the current
one is refused with 400 (this deployment cannot produce it); the versions used are echoed.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Header, Response

from app.api.errors import ApiError
from app.domain.models import SCHEMA_VERSION
from app.domain.prompts import PROMPT_SET_VERSION


async def pinned_versions(
    response: Response,
    x_schema_version: Annotated[str | None, Header()] = None,
    x_prompt_set_version: Annotated[str | None, Header()] = None,
) -> None:
    """Refuse versions this deployment does not serve; echo the ones it uses."""
    for name, requested, supported in (
        ("schema", x_schema_version, SCHEMA_VERSION),
        ("prompt_set", x_prompt_set_version, PROMPT_SET_VERSION),
    ):
        if requested is not None and requested.strip() != supported:
            raise ApiError(
                400,
                "unsupported_version",
                f"{name.replace('_', ' ')} version {requested!r} is not supported; "
                f"this deployment serves {supported}",
                {f"requested_{name}_version": requested, f"supported_{name}_version": supported},
            )
    response.headers["X-Schema-Version"] = SCHEMA_VERSION
    response.headers["X-Prompt-Set-Version"] = PROMPT_SET_VERSION
