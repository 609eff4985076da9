"""Loading a real checkpoint through the engine keeps about one copy of its weights in host memory.

Measured in a fresh process from /proc/self/status (VmHWM after its peak is reset to the current RSS just
before the load), on a checkpoint large enough to dominate the process. The CPU is the fast device here, so
every weight must stay on the host: the peak may exceed the checkpoint's size by 10% and a small constant.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from fiddler_batch.demo import build_byte_tokenizer

from jobhelpers import REPO

MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch, transformers.models.mixtral.modeling_mixtral
    from fiddler_batch.assets import load_engine
    from fiddler_batch.bench.hostmemory import reset_peak, status
    from fiddler_batch.spec import EngineSpec, ModelSpec

    reset_peak()
    before = status()
    engine = load_engine(ModelSpec(path=sys.argv[1]), EngineSpec(device="cpu", resident_share=0.5), calibrate=False)
    after = status()
    print(json.dumps({"before": before, "after": after, "placement": engine.placement.report}))
    """
)


def save_checkpoint(folder: Path) -> int:
    """A bf16 Mixtral of about 300 MB (experts of 16 MB), saved by transformers; returns its weight bytes."""
    config = MixtralConfig(
        hidden_size=1024, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=8, vocab_size=1024, max_position_embeddings=512,
        dtype="bfloat16",
    )  # fmt: skip
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    for param in model.parameters():
        param.data.uniform_(-0.02, 0.02)
    model.save_pretrained(folder, max_shard_size="100MB")
    build_byte_tokenizer().save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_loading_a_checkpoint_peaks_at_about_its_own_size(tmp_path: Path) -> None:
    size = save_checkpoint(tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) > 1  # several shards
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = measured["before"], measured["after"]
    peak = after["VmHWM"] - before["VmRSS"]
    assert "streamed" in done.stderr or "loaded by transformers" not in done.stderr
    assert peak <= 1.1 * size + 64 * 2**20, f"peak {peak / 1e6:.0f} MB for {size / 1e6:.0f} MB of weights"
    assert after["RssFile"] - before["RssFile"] <= 32 * 2**20  # no memory-mapped shards left resident
    assert after["RssAnon"] - before["RssAnon"] >= 0.95 * size  # the weights really are in memory
    assert measured["placement"]["resident_experts"] == 24  # half of 6 x 8
