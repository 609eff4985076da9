"""The embedded demo model: a tiny random Mixtral checkpoint with a byte-level tokenizer, built locally.

Nothing is downloaded. The weights are random (seeded), so the model's text is noise; it exists so that a job
runs end to end on any machine, and so that tests have a real mixture-of-experts model to compare against.

`ensure_demo_checkpoint(name)` builds the checkpoint once into the cache folder (`$FIDDLER_BATCH_CACHE`, else
`~/.cache/fiddler-batch`) and reuses it afterwards. Building writes into a temporary folder that is renamed
into place, so processes racing to build the same checkpoint are safe: the loser's copy is discarded.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fiddler_batch.errors import EngineError
from fiddler_batch.machine import cache_root

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2; byte b is id 3 + b
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyMixtralShape:
    """Geometry of a tiny Mixtral (defaults: the `tiny-mixtral` demo, about 3.5 MB in float32)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 4096
    initializer_range: float = 0.3


DEMOS: dict[str, tuple[int, TinyMixtralShape]] = {
    # name: (version, shape). Bump the version whenever the builder's output changes.
    "tiny-mixtral": (1, TinyMixtralShape()),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character map, which byte-level tokenizers use to spell raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_byte_tokenizer() -> Any:
    """A tokenizer with one token per byte: round-trips any UTF-8 text, has bos/eos/pad and a chat template.

    Plain prompts are encoded as `<s>` followed by their bytes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_chars[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )


def build_tiny_mixtral(shape: TinyMixtralShape | None = None, seed: int = 0) -> tuple[Any, Any, Any]:
    """(config, model, tokenizer) of a seeded random Mixtral in float32, ready for `save_pretrained`.

    The output head is reshaped so that greedy text is mostly printable ASCII and ends with `</s>` now and
    then: rows of other bytes are scaled down. Random weights otherwise; the same seed gives the same model.
    """
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    shape = shape or TinyMixtralShape()
    tokenizer = build_byte_tokenizer()
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        num_local_experts=shape.num_local_experts,
        num_experts_per_tok=shape.num_experts_per_tok,
        max_position_embeddings=shape.max_position_embeddings,
        initializer_range=shape.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(state)
    printable = [*range(0x20, 0x7F), ord("\n")]
    row_scale = torch.full((config.vocab_size,), 0.05)  # [V]
    row_scale[[len(SPECIAL_TOKENS) + b for b in printable]] = 1.0
    row_scale[tokenizer.eos_token_id] = 1.0
    with torch.no_grad():
        model.lm_head.weight.mul_(row_scale[:, None])  # [V, H]
    return config, model, tokenizer


def ensure_demo_checkpoint(name: str) -> Path:
    """The folder of demo checkpoint `name`, built on first use (atomically) and reused afterwards."""
    if name not in DEMOS:
        raise EngineError(
            "model.path", f"unknown demo model 'demo:{name}'", f"use one of: {', '.join('demo:' + d for d in DEMOS)}"
        )
    version, shape = DEMOS[name]
    final = cache_root() / "demo" / f"{name}-v{version}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        _, model, tokenizer = build_tiny_mixtral(shape)
        model.save_pretrained(building)
        tokenizer.save_pretrained(building)
        try:
            building.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final
