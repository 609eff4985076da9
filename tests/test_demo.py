"""The demo checkpoint: a seeded tiny Mixtral with a byte-level tokenizer, built once, atomically."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from fiddler_batch.demo import build_byte_tokenizer, build_tiny_mixtral, ensure_demo_checkpoint
from fiddler_batch.errors import EngineError


def test_tokenizer_round_trips_any_utf8_and_has_special_tokens() -> None:
    tokenizer = build_byte_tokenizer()
    text = "héllo wörld 🙂 \x00\t\n 中文 ∑"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + len(text.encode())
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s><|user|>\nhi\n<|assistant|>\n"


def test_the_same_seed_builds_the_same_model() -> None:
    config, first, tokenizer = build_tiny_mixtral()
    _, second, _ = build_tiny_mixtral()
    assert config.model_type == "mixtral" and config.num_local_experts == 8 and config.num_experts_per_tok == 2
    assert config.vocab_size == len(tokenizer) and first.dtype == torch.float32
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert sum(p.numel() for p in first.parameters()) * 4 < 8e6  # a few MB


def test_checkpoint_is_built_once_and_reused(demo_path: Path) -> None:
    weights = demo_path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert ensure_demo_checkpoint("tiny-mixtral") == demo_path
    assert weights.stat().st_mtime_ns == before
    assert AutoConfig.from_pretrained(demo_path).max_position_embeddings == 4096
    assert AutoTokenizer.from_pretrained(demo_path).chat_template


def test_racing_builders_agree_and_leave_no_temporary_folder(tmp_path: Path) -> None:
    code = "from fiddler_batch.demo import ensure_demo_checkpoint; print(ensure_demo_checkpoint('tiny-mixtral'))"
    env = {**os.environ, "FIDDLER_BATCH_CACHE": str(tmp_path)}
    builders = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    paths = {builder.communicate(timeout=120)[0].strip() for builder in builders}
    assert all(builder.returncode == 0 for builder in builders)
    assert paths == {str(tmp_path / "demo" / "tiny-mixtral-v1")}
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["tiny-mixtral-v1"]


def test_unknown_demo_name() -> None:
    with pytest.raises(EngineError, match="unknown demo model 'demo:huge'"):
        ensure_demo_checkpoint("huge")
