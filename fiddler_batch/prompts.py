"""Rendering and tokenizing prompts: plain text as is, chat messages through the tokenizer's chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fiddler_batch.io.requests import BadRecord, Request


@dataclass(frozen=True)
class Prepared:
    """A request with its prompt as the model sees it."""

    request: Request
    text: str
    """The prompt text (for chat requests: the rendered conversation, generation prompt included)."""
    ids: list[int]
    choice: int = 0
    """Which of the request's `n` completions this row generates (each samples from its own stream: see
    `fiddler_batch.sampling.choice_seed`)."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def max_new_tokens(self) -> int:
        return self.request.generation.max_new_tokens

    @property
    def num_beams(self) -> int:
        return self.request.generation.num_beams


def prepare(requests: list[Request], tokenizer: Any, max_context: int | None) -> tuple[list[Prepared], list[BadRecord]]:
    """Tokenize `requests` (one tokenizer call for plain prompts, one for chats); bad ones come back apart.

    A request with n > 1 becomes n rows, one per choice, next to each other: each generates independently.
    """
    bad: list[BadRecord] = []
    plain = [request for request in requests if request.messages is None]
    chats: list[tuple[Request, str]] = []
    for request in requests:
        if request.messages is not None:
            rendered = _render_chat(request, tokenizer)
            if isinstance(rendered, BadRecord):
                bad.append(rendered)
            else:
                chats.append((request, rendered))
    ordered = [*plain, *(request for request, _ in chats)]
    texts = [request.prompt or "" for request in plain] + [text for _, text in chats]
    ids = _encode(tokenizer, texts[: len(plain)], True) + _encode(tokenizer, texts[len(plain) :], False)
    prepared: list[Prepared] = []
    for request, text, prompt_ids in zip(ordered, texts, ids, strict=True):
        problem = _length_problem(request, len(prompt_ids), max_context)
        if problem:
            bad.append(problem)
        else:
            prepared += [Prepared(request, text, prompt_ids, choice) for choice in range(request.generation.n)]
    return prepared, bad


def _encode(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _render_chat(request: Request, tokenizer: Any) -> str | BadRecord:
    if not getattr(tokenizer, "chat_template", None):
        return BadRecord(
            request.index,
            request.id,
            request.problem(
                request.field,
                "the model's tokenizer has no chat template",
                "give a plain 'prompt' instead of 'messages', or use a chat model",
            ),
        )
    try:
        return tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # the template's own checks (jinja raise_exception) raise many types
        return BadRecord(
            request.index,
            request.id,
            request.problem(
                request.field,
                f"the chat template rejects these messages: {exc}",
                "fix the conversation (roles and their order) to suit the model's chat template",
            ),
        )


def _length_problem(request: Request, prompt_tokens: int, max_context: int | None) -> BadRecord | None:
    new = request.generation.max_new_tokens
    if prompt_tokens == 0:
        return BadRecord(
            request.index,
            request.id,
            request.problem(request.field, "the prompt encodes to no tokens", "give a non-empty prompt"),
        )
    if max_context is None or prompt_tokens + new <= max_context:
        return None
    fixes = []
    if max_context - new >= 1:
        fixes.append(f"shorten the prompt to at most {max_context - new} tokens")
    if prompt_tokens < max_context:
        fixes.append(f"lower max_new_tokens to at most {max_context - prompt_tokens}")
    fix = ", or ".join(fixes) or f"shorten the prompt and keep max_new_tokens below {max_context}"
    return BadRecord(
        request.index,
        request.id,
        request.problem(
            request.field,
            f"prompt of {prompt_tokens} tokens + max_new_tokens {new} exceeds the model's context of "
            f"{max_context} tokens",
            fix,
        ),
    )
