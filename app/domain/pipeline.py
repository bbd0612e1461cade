"""The consensus pipeline: expand, five concurrent reviews, aggregate; resumes from checkpoints."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel

from app.domain import prompts
from app.domain.aggregate import aggregate
from app.domain.ideas import validate_extra_context, validate_idea
from app.domain.llm import LLM, LLMCallError, LLMErrorKind, LLMRequest, LLMResult, T
from app.domain.models import (
    Decision,
    PersonaReview,
    Proposal,
    ReviewContent,
    RevisedProposal,
    TokenUsage,
)
from app.domain.personas import AGGREGATE_STEP, EXPAND_STEP, PERSONAS, Persona
from app.domain.retry import RetryPolicy
from app.domain.revisions import Revision, needs_rerun
from app.errors import (
    InvalidRunInput,
    PermanentError,
    ProviderMisconfigured,
    StepFailedPermanent,
    StepFailedTransient,
)


@dataclass(frozen=True)
class PipelineConfig:
    expand_model: str
    expand_temperature: float
    review_model: str
    review_temperature: float
    step_timeout: float
    retry: RetryPolicy


@dataclass
class Checkpoint:
    """What earlier deliveries of the run already completed."""

    proposal: Proposal | None = None
    reviews: dict[str, PersonaReview] = field(default_factory=dict)


class Progress(Protocol):
    """Where the pipeline reports each step; the service persists it (the checkpoints)."""

    async def step_started(self, step: str) -> int:
        """Record a new attempt of `step`; return its attempt number across all deliveries."""
        ...

    async def attempt_failed(self, step: str, error: str, usage: TokenUsage) -> None: ...

    async def step_failed(self, step: str, error: str) -> None: ...

    async def step_completed(self, step: str, output: BaseModel, usage: TokenUsage) -> None: ...

    async def step_reused(self, step: str, review: PersonaReview, origin_run_id: str) -> None:
        """Record a review taken over from the parent run, which cost no call."""
        ...


@dataclass(frozen=True)
class RunInput:
    run_id: str
    idea: str
    extra_context: str | dict[str, Any] | None
    # Per-run overrides of the configured models and temperatures.
    model: str | None = None
    temperature: float | None = None
    revision: Revision | None = None


async def run_pipeline(
    run: RunInput,
    checkpoint: Checkpoint,
    llm: LLM,
    progress: Progress,
    config: PipelineConfig,
) -> Decision:
    """Run the steps not yet in `checkpoint`; never repeats a completed step's LLM call."""
    try:
        validate_idea(run.idea)
        validate_extra_context(run.extra_context)
    except ValueError as exc:
        raise InvalidRunInput(f"run input is invalid: {exc}") from exc
    proposal = checkpoint.proposal
    if proposal is None:
        proposal = await _expand(run, llm, progress, config)

    reviews = dict(checkpoint.reviews)
    pending = [p for p in PERSONAS if p.persona_id not in reviews]
    if run.revision is not None:
        # The parent's reviews that gave no reason to re-run are taken over, at no cost.
        for persona in list(pending):
            parent = run.revision.parent_reviews.get(persona.persona_id)
            if parent is not None and not needs_rerun(parent.review):
                await progress.step_reused(persona.step_name, parent.review, parent.origin_run_id)
                reviews[persona.persona_id] = parent.review
                pending.remove(persona)
    results = await asyncio.gather(
        *(_review(run, persona, proposal, llm, progress, config) for persona in pending),
        return_exceptions=True,
    )
    errors: list[BaseException] = []
    for persona, result in zip(pending, results, strict=True):
        if isinstance(result, BaseException):
            errors.append(result)
        else:
            reviews[persona.persona_id] = result
    if errors:
        # Every review that could finish is checkpointed; report the most final failure.
        permanent = [e for e in errors if isinstance(e, PermanentError)]
        raise (permanent or errors)[0]

    await progress.step_started(AGGREGATE_STEP)
    decision = aggregate(list(reviews.values()))
    await progress.step_completed(AGGREGATE_STEP, decision, TokenUsage())
    return decision


async def _expand(run: RunInput, llm: LLM, progress: Progress, config: PipelineConfig) -> Proposal:
    """The proposal: expanded from the idea, or a revision of the parent's."""
    model = run.model or config.expand_model
    temperature = config.expand_temperature if run.temperature is None else run.temperature
    revision = run.revision
    if revision is None:
        result: LLMResult[Proposal] = await _call_step(
            run,
            EXPAND_STEP,
            Proposal,
            model,
            temperature,
            prompts.EXPAND_INSTRUCTIONS,
            prompts.expand_input(run.idea, run.extra_context),
            llm,
            progress,
            config,
        )
        proposal, usage = result.output, result.usage
    else:
        proposal = revision.edits.fields.apply(revision.parent_proposal)
        usage = TokenUsage()
        if revision.edits.notes is None:
            # Edits alone need no model: the step is recorded, as done, without a call.
            await progress.step_started(EXPAND_STEP)
        else:
            revised = await _call_step(
                run,
                EXPAND_STEP,
                RevisedProposal,
                model,
                temperature,
                prompts.REVISE_INSTRUCTIONS,
                prompts.revise_input(proposal, revision.edits.notes, run.idea),
                llm,
                progress,
                config,
            )
            proposal = Proposal.model_validate(revised.output.model_dump())
            usage = revised.usage
    await progress.step_completed(EXPAND_STEP, proposal, usage)
    return proposal


async def _review(
    run: RunInput,
    persona: Persona,
    proposal: Proposal,
    llm: LLM,
    progress: Progress,
    config: PipelineConfig,
) -> PersonaReview:
    result = await _call_step(
        run,
        persona.step_name,
        ReviewContent,
        run.model or config.review_model,
        config.review_temperature if run.temperature is None else run.temperature,
        prompts.review_instructions(persona),
        prompts.review_input(proposal, run.idea),
        llm,
        progress,
        config,
    )
    review = PersonaReview(
        **result.output.model_dump(), persona_id=persona.persona_id, persona_name=persona.name
    )
    await progress.step_completed(persona.step_name, review, result.usage)
    return review


async def _call_step(
    run: RunInput,
    step: str,
    output_type: type[T],
    model: str,
    temperature: float,
    instructions: str,
    text: str,
    llm: LLM,
    progress: Progress,
    config: PipelineConfig,
) -> LLMResult[T]:
    """One step's LLM call under the retry policy and the step timeout.

    The attempt is counted and its timeout started only once a concurrency slot is held, so a
    call queued behind others neither times out nor spends an attempt without being sent.
    """
    retry_index = 0
    while True:
        async with llm.slot():
            attempt = await progress.step_started(step)
            request = LLMRequest(
                step=step,
                model=model,
                temperature=temperature,
                instructions=instructions,
                input=text,
                output_type=output_type,
                client_request_id=f"{run.run_id}/{step}/{attempt}",
            )
            try:
                async with asyncio.timeout(config.step_timeout):
                    return await llm.generate(request)
            except TimeoutError:
                error = LLMCallError(
                    f"timed out after {config.step_timeout:g}s", LLMErrorKind.RETRYABLE
                )
            except LLMCallError as exc:
                error = exc

        message = f"attempt {attempt}: {error}"
        await progress.attempt_failed(step, message, error.usage)
        delay = None
        if error.kind is LLMErrorKind.RETRYABLE:
            delay = config.retry.delay(retry_index, error.retry_after)
        if delay is None:
            await progress.step_failed(step, message)
            failure = f"{step} failed: {message}"
            if error.kind is LLMErrorKind.MISCONFIGURED:
                raise ProviderMisconfigured(failure)
            if error.kind is LLMErrorKind.PERMANENT:
                raise StepFailedPermanent(failure)
            raise StepFailedTransient(failure)
        retry_index += 1
        await asyncio.sleep(delay)
