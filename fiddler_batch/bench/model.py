"""The benchmark model: Mixtral-8x7B geometry, seeded random weights, built directly in memory.

Weights are drawn on the GPU when there is one (fast) and land in host memory; the same seed gives the
same weights on every build, so each baseline can build its own copy. Routing is near-uniform with random
routers; the skewed variant adds a fixed logit offset per expert, log of a Zipf weight (1/rank)^alpha
over a random per-layer ranking, so each layer has its own popular experts.

The model has no end-of-sequence token, so every generation runs to its `max_new_tokens` and every
baseline does the same work. `build_tokenizer` gives a word-level tokenizer over the same vocabulary
(word `w<N>` is token N), so prompts of an exact token length can be written as text.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

MIXTRAL_8X7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=32000,
    max_position_embeddings=32768,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    tie_word_embeddings=False,
)

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=512,
    max_position_embeddings=8192,
    tie_word_embeddings=False,
)


class SkewedRouter(torch.nn.Module):
    """Mixtral's top-k router plus a fixed per-expert logit offset."""

    def __init__(self, router: torch.nn.Module, offsets: torch.Tensor):
        super().__init__()
        self.top_k, self.num_experts, self.hidden_dim = router.top_k, router.num_experts, router.hidden_dim
        self.weight = router.weight
        self.register_buffer("offsets", offsets)  # [E]

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight) + self.offsets.to(hidden_states.dtype)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        top_value /= top_value.sum(dim=-1, keepdim=True)
        return logits, top_value, top_index


def zipf_offsets(num_experts: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    ranks = torch.randperm(num_experts, generator=generator) + 1  # expert -> rank (1 = most popular)
    return -alpha * torch.log(ranks.float())


def build_model(
    layers: int = 8,
    seed: int = 0,
    skew: float = 0.0,
    geometry: dict | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> MixtralForCausalLM:
    """A Mixtral model with `layers` decoder layers and random weights in host memory, for inference only."""
    config = MixtralConfig(**{**(geometry or MIXTRAL_8X7B), "num_hidden_layers": layers, "eos_token_id": None})
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.to_empty(device="cpu")
    model.to(dtype)
    draw_on = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    gen = torch.Generator(device=draw_on).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            fan_in = param.shape[-1]
            # One slab at a time keeps GPU scratch memory at one layer's expert tensor.
            for slab in param.view(-1, *param.shape[-2:]) if param.dim() == 3 else [param]:
                draw = torch.empty(slab.shape, dtype=dtype, device=draw_on)
                draw.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
                slab.copy_(draw)
        # Buffers made on the meta device hold garbage after to_empty: rebuild the rotary embedding.
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
        if skew > 0:
            cpu_gen = torch.Generator().manual_seed(seed + 1)
            for layer in model.model.layers:
                offsets = zipf_offsets(config.num_local_experts, skew, cpu_gen)
                layer.mlp.gate = SkewedRouter(layer.mlp.gate, offsets)
    model.requires_grad_(False)
    model.eval()
    return model


SPECIAL_TOKENS = ("<pad>", "<s>", "<unk>", "<|user|>", "<|assistant|>")  # ids 0..4; word w<N> is id N
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
FIRST_WORD = len(SPECIAL_TOKENS)


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab_size` ids: whitespace-separated words `w<N>` (N >= 5) are token N.

    Plain prompts get a BOS token; user-only chats render as `<s><|user|> WORDS <|assistant|>`. It has no
    end-of-sequence token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", pad_token="<pad>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
