"""Rendering and tokenizing prompts: plain text as is, chat messages through the tokenizer's chat template.

Tokenizing costs far more memory than the text (about 200 bytes per character with fast tokenizers), so a text
much longer than the model's context is not tokenized whole: its first characters are, and when they alone
make more than twice the context's tokens the request is too long, whatever the rest holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fiddler_batch.io.requests import BadRecord, Request

GUARD_CHARS_PER_TOKEN = 4
"""A prompt longer than this many characters per token of context is measured on a prefix first."""
GUARD_MIN_CHARS = 65536


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
    plain_texts = _keep_measurable(
        [(request, request.prompt or "") for request in plain], tokenizer, max_context, True, bad
    )
    chat_texts = _keep_measurable(chats, tokenizer, max_context, False, bad)
    encoded = _encode_all(tokenizer, plain_texts, True, bad) + _encode_all(tokenizer, chat_texts, False, bad)
    prepared: list[Prepared] = []
    for request, text, prompt_ids in encoded:
        problem = _length_problem(request, len(prompt_ids), max_context)
        if problem:
            bad.append(problem)
        else:
            prepared += [Prepared(request, text, prompt_ids, choice) for choice in range(request.generation.n)]
    return prepared, bad


def _keep_measurable(
    texts: list[tuple[Request, str]], tokenizer: Any, max_context: int | None, special: bool, bad: list[BadRecord]
) -> list[tuple[Request, str]]:
    """`texts` without those certainly too long for the context (added to `bad`), found on a prefix."""
    if max_context is None:
        return texts
    kept = []
    for request, text in texts:
        found = _prefix_tokens_over(tokenizer, text, special, 2 * max_context)
        if found is None:
            kept.append((request, text))
            continue
        characters, tokens = found
        new = request.generation.max_new_tokens
        bad.append(
            BadRecord(
                request.index,
                request.id,
                request.problem(
                    request.field,
                    f"prompt of more than {max_context:,} tokens (its first {characters:,} characters alone make "
                    f"{tokens:,}; it has {len(text):,}) exceeds the model's context of {max_context:,} tokens",
                    f"shorten the prompt to at most {max(max_context - new, 1):,} tokens",
                ),
            )
        )
    return kept


def _prefix_tokens_over(tokenizer: Any, text: str, special: bool, most: int) -> tuple[int, int] | None:
    """(characters, tokens) of a prefix of `text` that makes more than `most` tokens, tokenizing prefixes of
    doubling length from `GUARD_CHARS_PER_TOKEN` characters per token; None when `text` is not that long."""
    length = max(GUARD_MIN_CHARS, GUARD_CHARS_PER_TOKEN * most)
    while length < len(text):
        tokens = len(_encode(tokenizer, [text[:length]], special)[0])
        if tokens > most:
            return length, tokens
        length *= 2
    return None


def _encode_all(
    tokenizer: Any, texts: list[tuple[Request, str]], special: bool, bad: list[BadRecord]
) -> list[tuple[Request, str, list[int]]]:
    """(request, text, token ids) for every text the tokenizer encodes, in one call; when that call fails, text by
    text, so that one text the tokenizer rejects is a bad record (added to `bad`) and not the end of the job."""
    try:
        ids = _encode(tokenizer, [text for _, text in texts], special)
        return [(request, text, row) for (request, text), row in zip(texts, ids, strict=True)]
    except Exception:  # tokenizers raise several types; find the culprit text by text below
        pass
    encoded = []
    for request, text in texts:
        try:
            encoded.append((request, text, _encode(tokenizer, [text], special)[0]))
        except Exception as exc:
            problem = request.problem(
                request.field, f"the tokenizer cannot encode this prompt: {exc}", "fix or remove the prompt's text"
            )
            bad.append(BadRecord(request.index, request.id, problem))
    return encoded


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
