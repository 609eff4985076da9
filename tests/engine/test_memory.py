"""Loading a checkpoint through the engine keeps about one copy of it in host memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
from transformers import MixtralConfig, MixtralForCausalLM

MEASURE = textwrap.dedent(
    """
    import sys, threading, time
    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon"):
                return int(line.split()[1]) * 1024
    import torch
    from fiddler_batch.engine import Engine, EngineSpec
    from fiddler_batch.engine.costmodel import CostModel
    from transformers import AutoModelForCausalLM
    base, peak, done = anon(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    engine = Engine.from_model(model, EngineSpec(device="cpu", resident_experts=0.5), cost=CostModel((1,), (1.0,), (1.0,), 1.0))
    done.set()
    sampler.join()
    print(max(peak[0], anon()) - base)
    """
)


def test_peak_host_memory_is_about_the_model_size(tmp_path):
    # Expert tensors of 32 MB and more, as in real models, so the allocator returns freed memory.
    config = MixtralConfig(
        hidden_size=1024, intermediate_size=8192, num_hidden_layers=1, num_attention_heads=8,
        num_key_value_heads=2, num_local_experts=4, vocab_size=512,
    )
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.to_empty(device="cpu")
    for param in model.parameters():
        param.data.uniform_(-0.01, 0.01)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(tmp_path)
    del model
    out = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, check=True)
    growth = int(out.stdout.strip().splitlines()[-1])
    assert size * 0.9 < growth < size * 1.5, f"peak growth {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
