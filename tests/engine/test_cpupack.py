"""CPU experts from weights packed for oneDNN (engine.cpu_packed): exact plumbing, and packed only when it pays.

The tiny models run in bf16 here, the only dtype that packs. A packed product may differ from `F.linear` in its
last bits (oneDNN picks another kernel for the packed layout; on AMX hosts, and for some shapes elsewhere), so
the expert is compared with the plain one within bf16's rounding, and the model with a reference whose every
product goes through the same packed kernel (`packed_products`): there the engine must match exactly, which
checks that each packed expert gets its own tokens and weights and that the sums are the reference's.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from fiddler_batch import machine
from fiddler_batch.bench.bounds import layer_ms
from fiddler_batch.engine import Engine, cpupack
from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.costmodel import CostModel, calibrate, random_expert
from fiddler_batch.engine.layout import read_layout
from fiddler_batch.spec import EngineSpec

from .conftest import ALL_CPU, COST, PROMPTS, bf16_reference_outputs, cpu_products_through, engine_on_copy, generate
from .families import build

pytestmark = pytest.mark.skipif(not cpupack.onednn_packing(), reason="this PyTorch cannot pack bf16 weights")

# Packed measured slower at 1 token and faster from 8 on (as on the H200 host's Xeon, where 2-32 tokens pay).
PACKED_COST = replace(COST, cpu_packed_ms=(1.5, 2.0, 15.0))


def _packed_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    flat = cpupack.linear(x.reshape(-1, x.shape[-1]), cpupack.pack_expert({"up": weight})["up"])
    return flat.reshape(*x.shape[:-1], weight.shape[0])


def packed_products():
    """Every bf16 `F.linear` on the CPU computed through a packed copy of its weight, as `cpupack` computes."""
    return cpu_products_through(_packed_linear, lambda weight: weight.dtype == torch.bfloat16 and weight.dim() == 2)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "deepseek_v3"])
def bf16_reference(request):
    """A bf16 tiny model with its logits, greedy and 3-beam tokens, every product through the packed kernel."""
    return bf16_reference_outputs(request.param, packed_products)


def _engine(reference: torch.nn.Module, cost: CostModel | None = PACKED_COST, **spec) -> tuple[torch.nn.Module, Engine]:
    return engine_on_copy(reference, cost, **spec)


def test_a_packed_expert_computes_the_same_products():
    module = build("mixtral").to(torch.bfloat16).model.layers[0].mlp.experts
    layout = read_layout(module)
    torch.manual_seed(0)
    weights = random_expert(layout, "cpu")
    packed = cpupack.pack_expert(weights)
    assert packed["up"].is_mkldnn and packed["down"].is_mkldnn
    for n in (1, 3, 16):
        x = torch.randn(n, layout.hidden, dtype=torch.bfloat16)
        w = torch.rand(n, dtype=torch.bfloat16)
        plain = expert_forward(module, layout, weights, x, w)
        torch.testing.assert_close(expert_forward(module, layout, packed, x, w), plain, rtol=1.6e-2, atol=1e-3)


def test_packed_cpu_experts_give_the_packed_references_numbers(bf16_reference):
    ref_model, ref_logits, ref_greedy, ref_beam = bf16_reference
    model, engine = _engine(ref_model, cpu_packed="on")
    engine.set_planner(ALL_CPU)
    with torch.no_grad(), packed_products():
        assert torch.equal(model(PROMPTS).logits, ref_logits)
        assert torch.equal(generate(model), ref_greedy)
        assert torch.equal(generate(model, num_beams=3), ref_beam)
    stats = engine.stats()
    assert stats["experts_cpu"] > 0 and stats["experts_cpu_packed"] == stats["experts_cpu"]
    layers = engine.executor.layers
    # Every expert the CPU may compute is packed; resident ones are not.
    assert all(set(layer.packed) == {e for e, r in enumerate(layer.resident_row) if r < 0} for layer in layers)
    engine.close()
    assert not any(layer.packed for layer in layers)


def test_auto_packs_and_takes_the_layout_measured_faster_per_token_count(bf16_reference):
    ref_model, ref_logits, ref_greedy, _ = bf16_reference
    model, engine = _engine(ref_model, cpu_packed="auto")
    executor = engine.executor
    assert executor.packed_experts() > 0
    assert not executor.packed_for(1) and executor.packed_for(8) and executor.packed_for(64)
    # The planner plans with the faster layout's times.
    assert executor.cost.cpu(1) == COST.cpu(1) and executor.cost.cpu(8) == 2.0 and executor.cost.cpu(64) == 15.0
    engine.set_planner(ALL_CPU)
    with torch.no_grad(), packed_products():
        assert torch.equal(model(PROMPTS).logits, ref_logits)  # a prefill: some experts get 8 tokens or more
        prefill = engine.stats()
        assert 0 < prefill["experts_cpu_packed"] < prefill["experts_cpu"]
        engine.reset_stats()
        model(PROMPTS[:1, :1])  # one token: every CPU expert has 1 token, faster as stored
        assert engine.stats()["experts_cpu"] > 0 and engine.stats()["experts_cpu_packed"] == 0
        assert torch.equal(generate(model), ref_greedy)


def test_auto_leaves_the_weights_as_stored_when_packing_does_not_pay_or_fit(bf16_reference, monkeypatch, caplog):
    ref_model = bf16_reference[0]
    caplog.set_level(logging.INFO, logger="fiddler_batch.engine.executor")
    # An older calibration, without packed times.
    _, engine = _engine(ref_model, cost=COST, cpu_packed="auto")
    assert engine.executor.packed_experts() == 0 and "did not measure packed" in caplog.text
    # Packed measured slower at every point; then faster only beyond the crossover (9 tokens), where experts are
    # copied; then faster by less than 10% (2.8 against 3.0 ms at 8 tokens).
    for packed_ms in ((2.0, 4.0, 30.0), (2.0, 4.0, 15.0), (1.0, 2.8, 20.0)):
        caplog.clear()
        _, engine = _engine(ref_model, cost=replace(COST, cpu_packed_ms=packed_ms), cpu_packed="auto")
        assert engine.executor.packed_experts() == 0 and "less than 10% faster" in caplog.text, packed_ms
        assert engine.executor.cost.cpu_ms == COST.cpu_ms
    # No room: the margin would not stay free.
    monkeypatch.setattr(machine, "host_memory", lambda meminfo=None: (3 << 30, 16 << 30))  # under the 4 GiB kept
    _, engine = _engine(ref_model, cpu_packed="auto")
    assert engine.executor.packed_experts() == 0 and "host memory cannot hold" in caplog.text
    # Off, the default, never packs, whatever the calibration says.
    monkeypatch.undo()
    _, engine = _engine(ref_model)
    assert engine.spec.cpu_packed == "off"
    assert engine.executor.packed_experts() == 0 and engine.executor.cost is PACKED_COST


def test_a_cost_model_installed_later_decides_the_packing(bf16_reference):
    model, engine = _engine(bf16_reference[0], cost=None, cpu_packed="auto")
    assert engine.executor.packed_experts() == 0 and engine.needs_cost_model
    engine.set_cost_model(PACKED_COST)
    assert engine.executor.packed_experts() > 0 and engine.executor.cost.cpu(8) == 2.0
    engine.set_cost_model(replace(COST, cpu_packed_ms=(2.0, 4.0, 30.0)))  # a recalibration: packing no longer pays
    assert engine.executor.packed_experts() == 0 and engine.executor.cost.cpu(8) == COST.cpu(8)


def test_float32_experts_are_never_packed(caplog):
    caplog.set_level(logging.INFO, logger="fiddler_batch.engine.executor")
    spec = {"device": "cpu", "resident_share": 0.25}
    engine = Engine.from_model(build("mixtral"), EngineSpec(**spec, cpu_packed="auto"), cost=PACKED_COST)
    said = lambda: [r for r in caplog.records if r.name == "fiddler_batch.engine.executor"]  # noqa: E731
    assert engine.executor.packed_experts() == 0 and not said()  # auto: nothing to say
    engine = Engine.from_model(build("mixtral"), EngineSpec(**spec, cpu_packed="on"), cost=COST)
    assert engine.executor.packed_experts() == 0 and not cpupack.packable(engine.executor.layers[0].layout)
    [record] = said()  # asked for outright: a warning says why not
    assert record.levelno == logging.WARNING and "only bf16 experts" in record.getMessage()


def test_calibration_measures_the_packed_layout_for_bf16_only(quick_calibrations):
    cost = quick_calibrations[torch.bfloat16]
    assert len(cost.cpu_packed_ms) == len(cost.ladder) and all(t > 0 for t in cost.cpu_packed_ms)
    assert cost.meta["cpu_packed_share_of_read"] > 0
    assert CostModel.from_json(cost.to_json()) == cost
    assert quick_calibrations[torch.float32].cpu_packed_ms is None


def test_cost_model_arithmetic_with_packed_times():
    assert PACKED_COST.cpu_packed(4) == pytest.approx(1.5 + 0.5 * 3 / 7)
    assert not PACKED_COST.packed_faster(1) and PACKED_COST.packed_faster(8)
    assert PACKED_COST.fastest_cpu(1) == 1.0 and PACKED_COST.fastest_cpu(8) == 2.0
    best = PACKED_COST.with_fastest_cpu()
    assert best.cpu_ms == (1.0, 2.0, 15.0) and best.cpu_packed_ms == PACKED_COST.cpu_packed_ms
    assert COST.with_fastest_cpu() is COST and COST.cpu_packed(4) is None and COST.fastest_cpu(8) == COST.cpu(8)
    old = PACKED_COST.to_json()
    del old["cpu_packed_ms"]  # a calibration file from before packed times
    assert CostModel.from_json(old).cpu_packed_ms is None


def test_the_bound_takes_the_faster_cpu_layout():
    counts, resident = [8, 0, 0, 0], [False, True, True, True]
    assert layer_ms(counts, resident, PACKED_COST) < layer_ms(counts, resident, COST)
    assert layer_ms(counts, resident, PACKED_COST) == pytest.approx(1 / (1 / 2.0 + 1 / COST.copy_ms))


def test_room_for_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       134217728 kB\nOdd:\n\nHugePages_Total: 0\nMemAvailable:   67108864 kB\n")
    assert machine.host_memory(meminfo) == (64 << 30, 128 << 30)
    fits, line = cpupack.room_for(40 << 30, meminfo)  # 64 GiB available, 12.8 GiB kept: 40 fits, 52 does not
    assert fits and "available 68.7 GB" in line
    assert not cpupack.room_for(52 << 30, meminfo)[0]
    meminfo.write_text("nothing useful\n")
    assert cpupack.room_for(1, meminfo) == (False, "host memory could not be read (/proc/meminfo)")


def test_yaml_switch_words_set_the_mode():
    for value, mode in ((True, "on"), (False, "off"), ("on", "on"), ("auto", "auto")):
        assert EngineSpec(cpu_packed=value).cpu_packed == mode
    with pytest.raises(ValueError, match="cpu_packed"):
        EngineSpec(cpu_packed="sometimes")


def test_a_calibration_whose_packing_fails_measures_the_weights_as_stored(monkeypatch, caplog):
    module = build("mixtral").to(torch.bfloat16).model.layers[0].mlp.experts
    layout = read_layout(module)

    def fails(*args, **kwargs):
        raise RuntimeError("oneDNN says no")

    for target in ("pack_expert", "linear"):  # packing fails, or the packed product does
        monkeypatch.setattr(cpupack, target, fails)
        caplog.clear()
        cost = calibrate(layout, module, torch.device("cpu"), threads=1, quick=True)
        assert cost.cpu_packed_ms is None and len(cost.cpu_ms) == len(cost.ladder)
        assert "oneDNN says no" in caplog.text and "cpu_packed_share_of_read" not in cost.meta
        monkeypatch.undo()
