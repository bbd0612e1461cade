"""The run viewer's routes: each page reads and writes through the functions `/v1` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app.api.deps import ReadyServicesDep, Services, require_ui_viewer
from app.api.diff import compare_runs
from app.api.errors import ApiError
from app.api.events import event_stream_response
from app.api.runs import find_run, find_runs, revise_run, run_detail, submit_review
from app.api.schemas import FullReviewRequest, RevisionRequest, RunDetail, RunFilters
from app.domain.diff import PROPOSAL_FIELDS
from app.domain.models import Priority
from app.store.tables import Run
from app.ui import views

router = APIRouter(dependencies=[Depends(require_ui_viewer)], include_in_schema=False)

_PRIORITIES: tuple[Priority, ...] = get_args(Priority)
_LIST_FIELDS = ("assumptions", "scope_non_goals")


def _environment() -> jinja2.Environment:
    # Autoescape everywhere: the model's text is untrusted. StrictUndefined makes a misspelt
    # name fail the tests instead of rendering as nothing.
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        status_text=views.status_text,
        when=views.when,
        clock=views.clock,
        money=views.money,
        score=views.score,
        lines=views.lines,
    )
    env.globals.update(step_labels=views.STEP_LABELS)
    return env


templates = Jinja2Templates(env=_environment())


def _page(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def _not_found(request: Request, message: str) -> HTMLResponse:
    return _page(request, "not_found.html", {"message": message}, 404)


async def _form(request: Request) -> dict[str, str]:
    """The posted form; ApiError for another origin (a cross-site post riding the viewer's
    IAP session), another encoding or an oversized body."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise ApiError(403, "cross_origin_form", "forms are accepted from this site only")
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    if content_type != "application/x-www-form-urlencoded":
        raise ApiError(415, "unsupported_media_type", "post the page's form")
    try:
        return views.parse_form(await request.body())
    except views.FormTooLarge:
        raise ApiError(413, "payload_too_large", "form too large") from None


@router.get("/", response_class=HTMLResponse)
async def new_review(request: Request) -> HTMLResponse:
    """The submit form."""
    form = {"idea": "", "extra_context": "", "priority": "normal"}
    return _page(request, "submit.html", {"form": form, "errors": {}, "priorities": _PRIORITIES})


@router.post("/", response_class=HTMLResponse)
async def submit(request: Request, services: ReadyServicesDep) -> Response:
    """Validate as `POST /v1/full-review` does; the run page, or the form with its errors."""
    form = await _form(request)
    values = {name: form.get(name, "") for name in ("idea", "extra_context", "priority")}
    try:
        body = FullReviewRequest.model_validate(
            {
                "idea": values["idea"],
                "extra_context": values["extra_context"] or None,
                "priority": values["priority"] or "normal",
            }
        )
    except ValidationError as exc:
        context = {"form": values, "errors": views.field_errors(exc), "priorities": _PRIORITIES}
        return _page(request, "submit.html", context, 422)
    accepted = await submit_review(body, services)
    return RedirectResponse(f"/runs/{accepted.run_id}", status_code=303)


@router.get("/runs", response_class=HTMLResponse)
async def runs_page(request: Request, services: ReadyServicesDep) -> HTMLResponse:
    """Runs newest first, with `GET /v1/runs`'s filters and pages."""
    shown = dict(request.query_params)
    try:
        filters = RunFilters.model_validate(views.list_query(shown))
    except ValidationError as exc:
        context: dict[str, Any] = {
            "filters": shown,
            "errors": views.field_errors(exc),
            "runs": None,
        }
        return _page(request, "runs.html", context, 422)
    page = await find_runs(filters, services)

    def offset_link(offset: int) -> str:
        query = {name: value for name, value in shown.items() if value and name != "offset"}
        return f"/runs?{urlencode({**query, 'offset': offset})}"

    previous = max(page.offset - page.limit, 0)
    following = page.offset + page.limit
    context = {
        "filters": shown,
        "errors": {},
        "runs": page,
        "previous_link": offset_link(previous) if page.offset > 0 else None,
        "next_link": offset_link(following) if following < page.total else None,
    }
    return _page(request, "runs.html", context)


async def _run_or_none(run_id: str, services: Services) -> Run | None:
    try:
        return await find_run(run_id, services)
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise


def _run_context(detail: RunDetail, event_seq: int) -> dict[str, Any]:
    return {
        "run": detail,
        # The run's last event as of this page (read before its steps): the stream starts
        # after it, so the page is not sent again what it already shows.
        "event_seq": event_seq,
        "finished": detail.status in views.FINISHED,
        "chart": None if detail.decision is None else views.decision_chart(detail.decision),
    }


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(run_id: str, request: Request, services: ReadyServicesDep) -> HTMLResponse:
    """A run: its timeline (kept live by app.js), proposal, reviews and decision."""
    return await _run_view(run_id, request, services, "run.html")


@router.get("/runs/{run_id}/sections", response_class=HTMLResponse)
async def run_sections(run_id: str, request: Request, services: ReadyServicesDep) -> HTMLResponse:
    """The run page's live part alone, which app.js swaps in after a step or the run ends."""
    response = await _run_view(run_id, request, services, "_run_sections.html")
    response.headers["Cache-Control"] = "no-store"
    return response


async def _run_view(
    run_id: str, request: Request, services: Services, template: str
) -> HTMLResponse:
    run = await _run_or_none(run_id, services)
    if run is None:
        return _not_found(request, "No run has this id.")
    context = _run_context(run_detail(run, services.settings), run.event_seq)
    return _page(request, template, context)


@router.get("/runs/{run_id}/events")
async def run_events(run_id: str, request: Request, services: ReadyServicesDep) -> Response:
    """`GET /v1/runs/{id}/events` behind the viewer's guard: what app.js listens to."""
    return await event_stream_response(run_id, request, services)


def _revise_form(run: Run) -> dict[str, str]:
    proposal = run.proposal or {}
    form = {name: views.lines(proposal.get(name)) for name in PROPOSAL_FIELDS}
    form["edit_notes"] = ""
    return form


def _revise_page(
    request: Request,
    run: Run,
    form: dict[str, str],
    errors: dict[str, str],
    status_code: int = 200,
) -> HTMLResponse:
    context = {
        "run_id": run.id,
        "title": (run.proposal or {}).get("title") or run.input_idea,
        "status": run.status,
        "form": form,
        "errors": errors,
        "list_fields": _LIST_FIELDS,
    }
    return _page(request, "revise.html", context, status_code)


_NOT_REVISABLE = "Only a completed run can be revised; this one is {}."


@router.get("/runs/{run_id}/revise", response_class=HTMLResponse)
async def revise_form(run_id: str, request: Request, services: ReadyServicesDep) -> HTMLResponse:
    """The revise form, filled with the run's proposal."""
    run = await _run_or_none(run_id, services)
    if run is None:
        return _not_found(request, "No run has this id.")
    if run.status != "completed":
        errors = {"form": _NOT_REVISABLE.format(run.status)}
        return _revise_page(request, run, _revise_form(run), errors, 409)
    return _revise_page(request, run, _revise_form(run), {})


@router.post("/runs/{run_id}/revise", response_class=HTMLResponse)
async def revise(run_id: str, request: Request, services: ReadyServicesDep) -> Response:
    """Queue a revision as `POST /v1/runs/{id}/revisions` does: changed fields and notes."""
    run = await _run_or_none(run_id, services)
    if run is None:
        return _not_found(request, "No run has this id.")
    posted = await _form(request)
    original = _revise_form(run)
    form = {name: posted.get(name, "") for name in original}
    # Only what the viewer changed is an edit, so an untouched form asks for nothing.
    edited: dict[str, Any] = {}
    for name in PROPOSAL_FIELDS:
        if form[name].strip() == original[name].strip():
            continue
        if name in _LIST_FIELDS:
            edited[name] = [line.strip() for line in form[name].splitlines() if line.strip()]
        else:
            edited[name] = form[name].strip()
    try:
        body = RevisionRequest.model_validate(
            {"edited_proposal": edited or None, "edit_notes": form["edit_notes"] or None}
        )
        accepted = await revise_run(run.id, body, services)
    except ValidationError as exc:
        return _revise_page(request, run, form, views.field_errors(exc), 422)
    except ApiError as exc:
        if exc.status == 404:
            return _not_found(request, "No run has this id.")
        return _revise_page(request, run, form, _revision_errors(exc.message), exc.status)
    return RedirectResponse(f"/runs/{accepted.run_id}", status_code=303)


def _revision_errors(message: str) -> dict[str, str]:
    """The API's message, at the proposal field it names (`edited_proposal: title: ...`)."""
    for name in PROPOSAL_FIELDS:
        if message.startswith(f"edited_proposal: {name}"):
            return {name: message}
    return {"form": message}


@router.get("/compare", response_class=HTMLResponse)
async def compare(
    request: Request, services: ReadyServicesDep, a: str = "", b: str = ""
) -> HTMLResponse:
    """Two runs compared as `GET /v1/runs/{a}/diff/{b}` compares them."""
    context: dict[str, Any] = {"a": a, "b": b, "errors": {}, "diff": None}
    if not a and not b:
        return _page(request, "compare.html", context)
    if not a or not b:
        missing = "a" if not a else "b"
        context["errors"] = {missing: "give two runs to compare"}
        return _page(request, "compare.html", context, 422)
    try:
        context["diff"] = await compare_runs(a.strip(), b.strip(), services)
    except ApiError as exc:
        parameter = (exc.details or {}).get("parameter")
        field = "a" if parameter == "run_id" else "b"
        context["errors"] = {field: exc.message}
        return _page(request, "compare.html", context, exc.status)
    return _page(request, "compare.html", context)
