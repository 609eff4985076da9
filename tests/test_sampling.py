"""The sampling arithmetic on its own: penalties as defined, stop masks, one draw per sampling row, raw logprobs."""

from __future__ import annotations

import torch
from transformers import RepetitionPenaltyLogitsProcessor

from fiddler_batch.sampling import choice_seed, choose_tokens, pad_rows, penalize, pick, row_generator
from fiddler_batch.spec import GenerationSpec

V = 50
EOS = 2


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # [R, V]


def test_repetition_penalty_is_transformers_definition_over_prompt_and_completion() -> None:
    raw = logits(2)
    prompt, generated = [[5, 6, 7], [9]], [[7, 11], [12, 12]]
    settings = [GenerationSpec(repetition_penalty=1.7), GenerationSpec(repetition_penalty=0.8)]
    ours = penalize(raw, settings, pad_rows(prompt), pad_rows(generated))
    for row, spec in enumerate(settings):
        ids = torch.tensor([prompt[row] + generated[row]])
        theirs = RepetitionPenaltyLogitsProcessor(spec.repetition_penalty)(ids, raw[row : row + 1].clone())
        assert torch.equal(ours[row], theirs[0])


def test_presence_and_frequency_penalties_count_the_completion_only() -> None:
    raw = logits(1)
    spec = GenerationSpec(presence_penalty=0.5, frequency_penalty=0.25)
    ours = penalize(raw, [spec], pad_rows([[3, 4]]), pad_rows([[4, 8, 8, 8]]))
    expected = raw.clone()
    expected[0, 4] -= 0.5 + 0.25
    expected[0, 8] -= 0.5 + 3 * 0.25
    assert torch.allclose(ours, expected)  # token 3 is only in the prompt: untouched


def test_min_tokens_masks_eos_and_stop_tokens_until_reached_unless_eos_is_ignored() -> None:
    raw = torch.zeros(3, V)
    raw[:, EOS] = raw[:, 9] = 10.0  # EOS and token 9 would win
    settings = [
        GenerationSpec(min_tokens=3, stop_token_ids=[9]),
        GenerationSpec(min_tokens=3, stop_token_ids=[9], ignore_eos=True),
        GenerationSpec(min_tokens=2, stop_token_ids=[9]),
    ]
    generated = pad_rows([[1, 1], [1, 1], [1, 1]])  # two tokens so far each
    chosen = choose_tokens(raw, settings, pad_rows([[1]] * 3), generated, [None] * 3, {EOS}).tokens
    assert chosen[0] not in (EOS, 9) and chosen[1] == EOS and chosen[2] == EOS  # row 2 has its 2 tokens


def test_greedy_is_the_argmax_of_the_processed_logits() -> None:
    raw = logits(1)
    top = int(raw.argmax())
    spec = GenerationSpec(repetition_penalty=100.0)
    chosen = choose_tokens(raw, [spec], pad_rows([[top]]), pad_rows([[]]), [None], {EOS})
    processed = penalize(raw, [spec], pad_rows([[top]]), pad_rows([[]]))
    assert chosen.tokens.item() == int(processed.argmax()) != top


def test_each_sampling_row_draws_one_number_from_its_own_generator_whatever_its_neighbours() -> None:
    raw = logits(3, seed=1)
    specs = [GenerationSpec(temperature=1.0, seed=s) for s in (1, 2, 3)]
    generators = [row_generator(s.seed) for s in specs]
    together = pick(raw, specs, generators)
    for generator, spec in zip(generators, specs, strict=True):  # exactly one draw each
        fresh = row_generator(spec.seed)
        torch.rand(1, generator=fresh)
        assert torch.equal(generator.get_state(), fresh.get_state())
    alone = pick(raw[1:2], specs[1:2], [row_generator(2)])
    beside_greedy = pick(raw, [GenerationSpec(), specs[1], GenerationSpec()], [None, row_generator(2), None])
    assert alone.item() == together[1].item() == beside_greedy[1].item()


def test_min_p_top_k_and_top_p_narrow_the_choice() -> None:
    raw = torch.full((1, V), -10.0)
    raw[0, 4], raw[0, 5], raw[0, 6] = 5.0, 4.0, 1.0  # probabilities about 0.73, 0.27, 0.01
    draws = range(200)

    def sampled(**settings: float) -> set[int]:
        spec = GenerationSpec(temperature=1.0, **settings)
        return {pick(raw, [spec], [row_generator(s)]).item() for s in draws}

    assert sampled() >= {4, 5}
    assert sampled(min_p=0.2) == {4, 5} and sampled(min_p=0.5) == {4}
    assert sampled(top_k=1) == {4} and sampled(top_p=0.5) == {4}


def test_logprobs_are_the_raw_log_softmax_whatever_the_processing() -> None:
    raw = logits(2, seed=3)
    settings = [GenerationSpec(temperature=0.3, repetition_penalty=2.0, top_k=3, seed=4), GenerationSpec()]
    chosen = choose_tokens(
        raw, settings, pad_rows([[1, 2], [3]]), pad_rows([[], []]), [row_generator(4), None], {EOS}, top_logprobs=4
    )
    expected = raw.log_softmax(dim=-1)
    assert torch.allclose(chosen.logprobs, expected.gather(1, chosen.tokens[:, None]).squeeze(1))
    values, ids = expected.topk(4, dim=-1)
    assert torch.equal(chosen.top_ids, ids) and torch.allclose(chosen.top_logprobs, values)


def test_choice_seeds_keep_choice_zero_and_differ_for_the_others() -> None:
    assert choice_seed(123, 0) == 123
    assert len({choice_seed(123, c) for c in range(8)}) == 8 and choice_seed(124, 1) != choice_seed(123, 1)
