"""The CPU's own matrix-vector kernel (engine.cpu_gemv): its numbers, its build, and the executor's use of it.

The kernel sums in float32 in its own order, so its products may differ from `F.linear`'s in the last bits. The
kernel is checked against float64 within one bf16 rounding, and for the same bits whatever the thread count; the
model is checked against a reference whose every bf16 product on the CPU goes through the kernel (`gemv_products`):
there the engine must match exactly, which checks that each expert gets its own tokens and weights.

The kernel is compiled by the test run (a C compiler with OpenMP is a test requirement, installed by `.ci/run`);
without one these tests fail rather than skip, unless FIDDLER_BATCH_KERNEL_TEST=optional.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fiddler_batch import assets
from fiddler_batch.bench.bounds import layer_ms
from fiddler_batch.engine import Engine, cpugemv, cpupack
from fiddler_batch.engine.compute import expert_forward
from fiddler_batch.engine.costmodel import CostModel, random_expert
from fiddler_batch.engine.layout import read_layout
from fiddler_batch.engine.planner import Where
from fiddler_batch.spec import EngineSpec

from .conftest import (
    ALL_CPU,
    COST,
    PROMPTS,
    bf16_reference_outputs,
    cpu_products_through,
    engine_on_copy,
    forced_split,
    generate,
)
from .families import build

if os.environ.get("FIDDLER_BATCH_KERNEL_TEST") == "optional" and not cpugemv.available():
    pytest.skip("no C compiler with OpenMP here (FIDDLER_BATCH_KERNEL_TEST=optional)", allow_module_level=True)

# The own kernel measured faster at 1 token and slower from 8 on (ladder 1, 8, 64; measured up to 8 only).
GEMV_COST = replace(COST, cpu_gemv_ms=(0.5, 4.0))


def gemv_products():
    """Every bf16 `F.linear` on the CPU computed by the own kernel, as the executor computes its CPU experts."""
    return cpu_products_through(cpugemv.linear, cpugemv.usable)


def _exact(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.double() @ weight.double().T


def _check_close_to_exact(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within one bf16 rounding of the exact product (2^-8 of it) plus float32 summation error."""
    exact = _exact(x, weight)
    scale = x.double().abs() @ weight.double().abs().T
    err = (y.double() - exact).abs()
    assert torch.all(err <= exact.abs() * 2.0**-8 + scale * 1e-6 + 1e-30), float((err - exact.abs() * 2**-8).max())


def test_the_kernel_is_a_bf16_rounding_of_the_exact_product():
    torch.manual_seed(0)
    # Sizes with and without a tail past the last step of 32, row counts with and without a tail past the last
    # block of 4, 1-5 tokens (pairs and a lone one), and rows of a wider tensor (a row stride over the width).
    for m, k in ((37, 100), (8, 64), (130, 96), (5, 31), (3, 1)):
        wide = torch.randn(m, k + 9, dtype=torch.bfloat16)
        for weight in (wide[:, :k].contiguous(), wide[:, 3 : 3 + k]):
            assert cpugemv.usable(weight)
            for n in (1, 2, 3, 5):
                x = torch.randn(n, k, dtype=torch.bfloat16)
                y = cpugemv.linear(x, weight)
                assert y.shape == (n, m) and y.dtype == torch.bfloat16
                _check_close_to_exact(y, x, weight)
                # Each output within one bf16 step of F.linear's.
                torch.testing.assert_close(y, torch.nn.functional.linear(x, weight), rtol=2**-7, atol=1e-6)
    # Leading dimensions pass through.
    x3 = torch.randn(2, 3, 40, dtype=torch.bfloat16)
    weight = torch.randn(6, 40, dtype=torch.bfloat16)
    assert torch.equal(cpugemv.linear(x3, weight), cpugemv.linear(x3.reshape(6, 40), weight).reshape(2, 3, 6))
    assert cpugemv.linear(torch.empty(0, 40, dtype=torch.bfloat16), weight).shape == (0, 6)


def test_the_kernel_rounds_to_nearest_even_as_torch_does():
    # One weight of 1.0: each output is the float32 input rounded to bf16 by the kernel.
    values = torch.tensor(
        [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 2**-8), 3.0e38, float("inf"), float("-inf"), 1e-40],
        dtype=torch.float32,
    )
    got = cpugemv.linear(values[:, None], torch.ones(1, 1, dtype=torch.bfloat16))[:, 0]
    assert torch.equal(got, values.to(torch.bfloat16))
    nan = cpugemv.linear(torch.tensor([[float("nan")]]), torch.ones(1, 1, dtype=torch.bfloat16))
    assert torch.isnan(nan).all()


def test_the_kernels_bits_do_not_depend_on_the_thread_count():
    torch.manual_seed(1)
    # Four chunks of 64 rows and a last one of 45 (11 blocks of 4 and a lone row), which threads take in whatever
    # order they finish: each count twice.
    weight = torch.randn(301, 200, dtype=torch.bfloat16)
    x = torch.randn(3, 200, dtype=torch.bfloat16)
    previous = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3, 7, 7, 3):
            torch.set_num_threads(threads)
            outs.append(cpugemv.linear(x, weight))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    # The rows of one call are the rows of calls for each token alone.
    assert torch.equal(torch.cat([cpugemv.linear(x[i : i + 1], weight) for i in range(3)]), outs[0])


def _queue_emptied() -> None:
    """Wait until the kernel's queue holds no product: its helper retires a product only once its team has left it,
    which on a busy host can take long enough for the products of several later calls to fill the queue, and a start
    is then refused (as it should be); tests that ask a start to succeed begin from an empty queue."""
    deadline = time.monotonic() + 30
    while cpugemv.held():
        assert time.monotonic() < deadline, f"the kernel's helper still holds {cpugemv.held()} products after 30 s"
        time.sleep(0.001)


def test_products_started_ahead_are_the_kernels_and_each_is_taken_once():
    torch.manual_seed(2)
    weight = torch.randn(301, 200, dtype=torch.bfloat16)
    other = torch.randn(130, 200, dtype=torch.bfloat16)
    x = torch.randn(2, 200, dtype=torch.bfloat16)
    expected, expected_other = cpugemv.linear(x, weight), cpugemv.linear(x, other)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # a helper's team of 2, and the caller
        _queue_emptied()
        assert cpugemv.start(x, weight) and cpugemv.started() == 1
        assert torch.equal(cpugemv.linear(x, other), expected_other)  # another product meanwhile: joined beside it
        assert cpugemv.started() == 1
        assert torch.equal(cpugemv.linear(x, weight), expected) and cpugemv.started() == 0  # the one started, taken
        assert torch.equal(cpugemv.linear(x, weight), expected)  # and computed again when asked again
        assert cpugemv.start(x, weight[:64])
        # Not the product started (other rows of the same weight): computed on its own, the started one kept.
        assert torch.equal(cpugemv.linear(x, weight[64:128]), expected[:, 64:128]) and cpugemv.started() == 1
        cpugemv.drain()
        assert cpugemv.started() == 0
        # More products than the kernel queues at once (how many it takes depends on how fast its helper finishes
        # them): those refused are not started, those started are right.
        _queue_emptied()
        pieces = [weight[8 * i : 8 * i + 40] for i in range(20)]
        taken = [piece for piece in pieces if cpugemv.start(x, piece)]
        assert len(taken) == cpugemv.started() >= 1
        for piece in taken:
            assert torch.equal(cpugemv.linear(x, piece), _kernel_rows(expected, weight, piece))
        assert cpugemv.started() == 0
        torch.set_num_threads(1)  # no team to hand a product to
        assert not cpugemv.start(x, weight) and cpugemv.started() == 0
        assert torch.equal(cpugemv.linear(x, weight), expected)
        torch.set_num_threads(3)
        cpugemv.TEAM = False  # every product on an OpenMP team of this thread's, as before the helper team
        assert not cpugemv.start(x, weight) and cpugemv.started() == 0
        assert torch.equal(cpugemv.linear(x, weight), expected)
    finally:
        torch.set_num_threads(previous)
        cpugemv.TEAM = True
        cpugemv.drain()


@pytest.mark.parametrize("watch_us", [0, 20_000])
def test_products_queued_while_the_helper_watches_or_sleeps_are_right(watch_us):
    """The helper watches its empty queue for `watch_us` before it sleeps: products queued back to back (while it
    watches), after it slept, and after a watch that found nothing are each computed once and right."""
    torch.manual_seed(4)
    weight = torch.randn(301, 200, dtype=torch.bfloat16)
    x = torch.randn(2, 200, dtype=torch.bfloat16)
    expected = cpugemv.linear(x, weight)
    pieces = [weight[64 * i : 64 * i + 64] for i in range(4)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        cpugemv.watch_empty_queue(watch_us)
        for gap in (0.0, 0.001, 0.05, 0.0):  # back to back, within a watch, past one, back to back again
            time.sleep(gap)
            _queue_emptied()
            assert all(cpugemv.start(x, piece) for piece in pieces)
            for piece in reversed(pieces):  # taken in another order than started
                assert torch.equal(cpugemv.linear(x, piece), _kernel_rows(expected, weight, piece))
            assert cpugemv.started() == 0
            assert torch.equal(cpugemv.linear(x, weight), expected)  # one started and joined at once
    finally:
        torch.set_num_threads(previous)
        cpugemv.watch_empty_queue(cpugemv.WATCH_US)
        cpugemv.drain()


def test_random_starts_takes_drains_and_pauses_give_the_one_thread_products():
    """Products started, taken, drained and computed at once in a seeded random order, with pauses that let the helper
    watch, sleep or be mid-product, and its watch changed as it runs: each equals the product of one thread."""
    rng = random.Random(0)
    torch.manual_seed(5)
    weights = [torch.randn(rng.randint(1, 3000), 512, dtype=torch.bfloat16) for _ in range(8)]
    xs = [torch.randn(rng.randint(1, 4), 512, dtype=torch.bfloat16) for _ in range(4)]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = {(i, j): cpugemv.linear(x, w) for i, w in enumerate(weights) for j, x in enumerate(xs)}
        torch.set_num_threads(2)
        wrong = []
        for step in range(1500):
            if step % 300 == 0:
                cpugemv.watch_empty_queue(rng.choice([0, 5, 200, 2000]))
            op, i, j = rng.random(), rng.randrange(len(weights)), rng.randrange(len(xs))
            if op < 0.45:
                cpugemv.start(xs[j], weights[i])
            elif op < 0.9:
                if not torch.equal(cpugemv.linear(xs[j], weights[i]), expected[i, j]):
                    wrong.append((step, i, j))
            elif op < 0.95:
                cpugemv.drain()
            else:
                time.sleep(rng.choice([0, 1e-5, 3e-4, 3e-3]))
        assert not wrong
    finally:
        torch.set_num_threads(previous)
        cpugemv.watch_empty_queue(cpugemv.WATCH_US)
        cpugemv.drain()


def _kernel_rows(y: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The columns of y = x @ weight.T that the rows `rows` (a view of weight's rows) produce."""
    first = (rows.data_ptr() - weight.data_ptr()) // (weight.stride(0) * weight.element_size())
    return y[:, first : first + rows.shape[0]]


def test_the_kernel_refuses_what_it_cannot_compute():
    assert not cpugemv.usable(torch.ones(4, 4))  # float32
    assert not cpugemv.usable(torch.ones(4, 4, dtype=torch.bfloat16).T)  # columns contiguous
    assert not cpugemv.usable(torch.ones(2, 4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="features"):
        cpugemv.linear(torch.ones(1, 5, dtype=torch.bfloat16), torch.ones(4, 4, dtype=torch.bfloat16))


def test_the_kernel_is_built_once_per_host_kind_and_missing_compilers_fall_back(monkeypatch, tmp_path, caplog):
    cc = cpugemv._compiler()
    built = cpugemv._build(cc)
    assert built.is_file() and built.parent == cpugemv.cache_root() / "kernels"
    stamp = built.stat().st_mtime_ns
    assert cpugemv._build(cc) == built and built.stat().st_mtime_ns == stamp  # found, not compiled again
    # Another CPU (another flags line) gets its own library.
    monkeypatch.setattr(cpugemv, "_cpu_flags", lambda: "another cpu")
    other = cpugemv._build(cc)
    assert other != built and other.is_file()
    # $CC may carry flags: they are part of the library's name.
    monkeypatch.setenv("CC", f"{cc[0]} -DFB_UNUSED=1")
    assert cpugemv._compiler() == [cc[0], "-DFB_UNUSED=1"] and cpugemv._build(cpugemv._compiler()) not in (built, other)
    caplog.set_level(logging.INFO, logger="fiddler_batch.engine.cpugemv")
    # A compiler that fails: no library, the reason logged.
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\ncase \"$1\" in --version) echo broken 1.0;; *) echo 'no OpenMP' >&2; exit 1;; esac\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert cpugemv._load() is None and "no OpenMP" in caplog.text
    assert not list((cpugemv.cache_root() / "kernels").glob("*.tmp"))
    # No compiler at all.
    monkeypatch.setattr(cpugemv, "_compiler", lambda: None)
    assert cpugemv._load() is None and "no C compiler" in caplog.text


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe", "deepseek_v3"])
def bf16_reference(request):
    """A bf16 tiny model with its logits, greedy and 3-beam tokens, every CPU product through the own kernel."""
    return bf16_reference_outputs(request.param, gemv_products)


def _engine(reference: torch.nn.Module, cost: CostModel | None = GEMV_COST, **spec) -> tuple[torch.nn.Module, Engine]:
    return engine_on_copy(reference, cost, **spec)


@pytest.fixture
def two_threads():
    """Two CPU threads (the tests run on one): the kernel's helper team has one thread, and the caller joins it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("way", ["ahead", "in turn", "worker"])
def test_cpu_experts_from_the_kernel_give_the_kernels_references_numbers(bf16_reference, monkeypatch, two_threads, way):
    """On the calling thread each layer call's first CPU product is started ahead of the GPU's work by default
    (`cpu_ahead`), and must be the product the expert then asks for: had it been another, the call would compute
    its own, and `products_ahead` would not count it."""
    ref_model, ref_logits, ref_greedy, ref_beam = bf16_reference
    monkeypatch.setattr(cpugemv, "MAX_TOKENS", 1000)  # every CPU expert (beam search's prefill has 42 tokens)
    worker = way == "worker"
    model, engine = _engine(ref_model, cpu_gemv="on", cpu_worker=worker)
    assert engine.executor.cpu_worker == worker  # without CUDA the worker thread runs them
    assert engine.executor.cpu_ahead
    engine.executor.cpu_ahead = way == "ahead"
    engine.set_planner(ALL_CPU)
    with torch.no_grad(), gemv_products():
        assert torch.equal(model(PROMPTS).logits, ref_logits)  # a prefill: experts with 1 to 14 tokens
        assert torch.equal(generate(model), ref_greedy)
        assert torch.equal(generate(model, num_beams=3), ref_beam)
    stats = engine.stats()
    assert stats["experts_cpu"] > 0 and stats["experts_cpu_gemv"] == stats["experts_cpu"]
    assert engine.describe()["cpu_gemv"] is True
    # One product ahead in every layer call with CPU experts (at most one expert's up projection per call).
    if way == "ahead":
        assert 0 < stats["products_ahead"] <= stats["experts_cpu"]
    else:
        assert stats["products_ahead"] == 0
    assert cpugemv.started() == 0


def test_a_failed_layer_call_leaves_no_product_started(bf16_reference, monkeypatch, two_threads):
    """A product started ahead of a call that then fails is joined and forgotten, so no later call can take it for
    its own (the rows' buffer and the weights are the same from call to call)."""
    ref_model, ref_logits, _, _ = bf16_reference
    monkeypatch.setattr(cpugemv, "MAX_TOKENS", 1000)
    model, engine = _engine(ref_model, cpu_gemv="on")
    engine.set_planner(ALL_CPU)
    executor = engine.executor
    queue = executor._queue_device_experts

    def failing(*args, **kwargs):
        assert cpugemv.started() == 1  # the first CPU expert's up projection, started ahead
        raise RuntimeError("the GPU's work could not be queued")

    monkeypatch.setattr(executor, "_queue_device_experts", failing)
    with torch.no_grad(), gemv_products():
        _queue_emptied()
        with pytest.raises(RuntimeError, match="could not be queued"):
            model(PROMPTS)
        assert cpugemv.started() == 0
        monkeypatch.setattr(executor, "_queue_device_experts", queue)
        assert torch.equal(model(PROMPTS).logits, ref_logits)


@pytest.mark.parametrize("share", [0.25, 0.75])
def test_a_split_experts_cpu_share_comes_from_the_kernel(bf16_reference, monkeypatch, two_threads, share):
    """Every output of the kernel is one sum in one order, whatever rows it is given: the CPU's rows of a split
    expert are the rows of the whole product, so the engine still matches the kernel's reference exactly."""
    ref_model, ref_logits, ref_greedy, ref_beam = bf16_reference
    monkeypatch.setattr(cpugemv, "MAX_TOKENS", 1000)
    model, engine = _engine(ref_model, cpu_gemv="on", split_experts=True)
    # One expert per layer call split, the others copied: the CPU's only products are the split's.
    engine.set_planner(forced_split(share, lambda layer, e: Where.COPY))
    kernel_calls = []
    linear = cpugemv.linear
    with torch.no_grad(), gemv_products():  # the reference's products (bound before the count below)
        # Counted: the engine's own calls of the kernel, not those of F.linear routed through it.
        monkeypatch.setattr(cpugemv, "linear", lambda *a, **k: kernel_calls.append(1) or linear(*a, **k))
        assert torch.equal(model(PROMPTS).logits, ref_logits)
        split_calls = engine.stats()["experts_split"]
        assert split_calls > 0 and engine.stats()["experts_cpu"] == 0
        # The split's up columns were started ahead of the GPU's work in every call: one product per row range.
        assert engine.stats()["products_ahead"] >= split_calls and cpugemv.started() == 0
        # Per split: the up rows (the gate and the up ranges of these layouts), and in the layers where the CPU's
        # share goes beyond the up projection (every other one) the down rows, all from the kernel.
        assert len(kernel_calls) >= 2 * split_calls
        assert torch.equal(generate(model), ref_greedy)
        assert torch.equal(generate(model, num_beams=3), ref_beam)


def test_auto_takes_the_kernel_where_it_was_measured_faster(bf16_reference):
    ref_model, ref_logits, ref_greedy, _ = bf16_reference
    model, engine = _engine(ref_model, cpu_gemv="auto")
    executor = engine.executor
    assert executor.gemv_for(1) and not executor.gemv_for(8)
    assert not executor.gemv_for(64)  # beyond the points measured
    # The planner plans with the faster way's times.
    assert executor.cost.cpu(1) == 0.5 and executor.cost.cpu(8) == COST.cpu(8) and executor.cost.cpu(64) == 20.0
    engine.set_planner(ALL_CPU)
    with torch.no_grad(), gemv_products():
        model(PROMPTS[:1, :1])  # one token: every CPU expert has 1 token, faster from the kernel
        assert engine.stats()["experts_cpu"] > 0 and engine.stats()["experts_cpu_gemv"] == engine.stats()["experts_cpu"]
        engine.reset_stats()
        assert torch.equal(generate(model), ref_greedy)
    # Outside gemv_products the experts that took F.linear still match F.linear's reference: mixed ways agree.
    with torch.no_grad():
        engine.reset_stats()
        engine.set_cost_model(replace(COST, cpu_gemv_ms=(5.0, 6.0)))  # a recalibration: the kernel slower
        assert not executor.gemv_for(1) and executor.cost.cpu_ms == COST.cpu_ms
        assert torch.equal(model(PROMPTS).logits, ref_model(PROMPTS).logits)
        assert engine.stats()["experts_cpu_gemv"] == 0


def test_off_and_unmeasured_calibrations_keep_f_linear(bf16_reference, caplog):
    ref_model = bf16_reference[0]
    caplog.set_level(logging.INFO, logger="fiddler_batch.engine.executor")
    _, engine = _engine(ref_model, cpu_gemv="off")
    assert not engine.executor.gemv_ready and engine.executor.cost is GEMV_COST
    _, engine = _engine(ref_model, cost=COST)  # auto, the default, with a calibration from before the kernel
    assert engine.spec.cpu_gemv == "auto"
    assert not engine.executor.gemv_ready and "did not measure the own kernel" in caplog.text
    # Float32 experts: the kernel takes bf16 weights only, whatever the setting.
    engine = Engine.from_model(build("mixtral"), EngineSpec(device="cpu", resident_share=0.25, cpu_gemv="on"))
    engine.set_cost_model(GEMV_COST)
    assert not engine.executor.gemv_ready and not engine.executor.gemv_possible()


def test_without_a_compiler_the_engine_uses_f_linear(bf16_reference, monkeypatch):
    ref_model, ref_logits, ref_greedy, _ = bf16_reference
    monkeypatch.setattr(cpugemv, "_kernel", lambda: None)
    model, engine = _engine(ref_model, cpu_gemv="on")
    assert not engine.executor.gemv_ready
    engine.set_planner(ALL_CPU)
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, ref_model(PROMPTS).logits)
    assert engine.stats()["experts_cpu"] > 0 and engine.stats()["experts_cpu_gemv"] == 0


def test_an_expert_from_the_kernel_computes_the_same_products():
    module = build("mixtral").to(torch.bfloat16).model.layers[0].mlp.experts
    layout = read_layout(module)
    torch.manual_seed(0)
    weights = random_expert(layout, "cpu")
    for n in (1, 2, 5):
        x = torch.randn(n, layout.hidden, dtype=torch.bfloat16)
        w = torch.rand(n, dtype=torch.bfloat16)
        with gemv_products():
            reference = expert_forward(module, layout, weights, x, w)
        assert torch.equal(expert_forward(module, layout, weights, x, w, gemv=True), reference)
        torch.testing.assert_close(
            expert_forward(module, layout, weights, x, w, gemv=True),
            expert_forward(module, layout, weights, x, w),
            rtol=1.6e-2,
            atol=1e-3,
        )


def test_calibration_measures_the_kernel_for_bf16_up_to_its_token_limit(quick_calibrations):
    cost = quick_calibrations[torch.bfloat16]
    measured = [n for n in cost.ladder if n <= cpugemv.MAX_TOKENS]
    assert len(cost.cpu_gemv_ms) == len(measured) < len(cost.ladder)
    assert all(t > 0 for t in cost.cpu_gemv_ms) and cost.meta["cpu_gemv_share_of_read"] > 0
    assert CostModel.from_json(cost.to_json()) == cost
    assert cost.cpu_gemv(cost.ladder[len(measured)]) is None
    assert quick_calibrations[torch.float32].cpu_gemv_ms is None


def test_cost_model_arithmetic_with_kernel_times():
    assert GEMV_COST.cpu_gemv(1) == 0.5 and GEMV_COST.cpu_gemv(4) == pytest.approx(0.5 + 3.5 * 3 / 7)
    assert GEMV_COST.cpu_gemv(9) is None and COST.cpu_gemv(1) is None
    assert GEMV_COST.gemv_faster(1) and not GEMV_COST.gemv_faster(8) and not GEMV_COST.gemv_faster(64)
    assert GEMV_COST.gemv_faster(8, than=5.0)
    assert GEMV_COST.fastest_cpu(1) == 0.5 and GEMV_COST.fastest_cpu(8) == 3.0
    assert GEMV_COST.with_fastest_cpu().cpu_ms == (0.5, 3.0, 20.0)
    assert GEMV_COST.with_fastest_cpu(gemv=False) is GEMV_COST
    both = replace(GEMV_COST, cpu_packed_ms=(2.0, 2.0, 10.0))
    assert both.with_fastest_cpu().cpu_ms == (0.5, 2.0, 10.0) and both.fastest_cpu(64) == 10.0
    old = GEMV_COST.to_json()
    del old["cpu_gemv_ms"]  # a calibration file from before the kernel
    assert CostModel.from_json(old).cpu_gemv_ms is None
    counts, resident = [1, 0, 0, 0], [False, True, True, True]
    assert layer_ms(counts, resident, GEMV_COST) < layer_ms(counts, resident, COST)  # the bound takes it too


def test_a_cached_calibration_without_kernel_times_or_cold_reads_is_measured_again(bf16_reference, monkeypatch, caplog):
    _, engine = _engine(bf16_reference[0], cost=None)
    path = assets.cost_cache_path(engine)
    cold = {"cold_experts": 4}  # experts read in turn, as `calibrate` does now
    old, new = replace(COST, meta=cold), replace(GEMV_COST, meta=cold)
    assets.save_cost_model(old, path, engine)
    measured = []

    def measure(quick: bool = False) -> CostModel:
        measured.append(quick)
        return new

    monkeypatch.setattr(engine, "measure_cost_model", measure)
    settings = EngineSpec(device="cpu")
    assert assets.cost_model_for(engine, settings) == new and measured == [True]
    assert "no times for the CPU's own kernel" in caplog.text
    assert assets.cost_model_for(engine, settings) == new and measured == [True]  # saved: read back
    # With the kernel off, an old entry is used as it is.
    assets.save_cost_model(old, path, engine)
    assert assets.cost_model_for(engine, EngineSpec(device="cpu", cpu_gemv="off")) == old and len(measured) == 1
    # One timed on one expert again and again (warm in the caches) is measured again, kernel or not.
    assets.save_cost_model(GEMV_COST, path, engine)
    assert assets.cost_model_for(engine, EngineSpec(device="cpu", cpu_gemv="off")) == new and len(measured) == 2
    assert "again and again" in caplog.text


@pytest.mark.skipif(not cpupack.onednn_packing(), reason="this PyTorch cannot pack bf16 weights")
def test_with_packed_weights_too_each_count_takes_the_fastest_way(bf16_reference):
    cost = replace(COST, cpu_packed_ms=(0.8, 2.0, 15.0), cpu_gemv_ms=(0.5, 2.5))
    _, engine = _engine(bf16_reference[0], cost=cost, cpu_packed="auto")
    executor = engine.executor
    assert executor.packed_experts() > 0
    assert executor.gemv_for(1, packed=executor.packed_for(1)) and executor.packed_for(8)
    assert not executor.gemv_for(8, packed=True) and executor.gemv_for(8, packed=False)  # 2.5 beats 3.0, not 2.0
    assert executor.cost.cpu_ms == (0.5, 2.0, 15.0)
    # Packed weights asked for outright: the kernel only when asked for outright too (then up to its limit).
    _, engine = _engine(bf16_reference[0], cost=cost, cpu_packed="on")
    assert not engine.executor.gemv_for(1, packed=True) and engine.executor.cost.cpu_ms == cost.cpu_packed_ms
    _, engine = _engine(bf16_reference[0], cost=cost, cpu_packed="on", cpu_gemv="on")
    assert engine.executor.gemv_for(1, packed=True) and engine.executor.cost.cpu_ms == (0.5, 2.5, 15.0)


def test_concurrent_first_builds_share_one_library(tmp_path):
    """Tasks of a Slurm array starting together on one cache folder: each compiles, one file results, all load it."""
    env = {**os.environ, "FIDDLER_BATCH_CACHE": str(tmp_path / "cache")}
    code = (
        "from fiddler_batch.engine import cpugemv; import torch; "
        "print(cpugemv._build(cpugemv._compiler())); "
        "w = torch.ones(8, 40, dtype=torch.bfloat16); x = torch.ones(1, 40, dtype=torch.bfloat16); "
        "assert torch.all(cpugemv.linear(x, w) == 40)"
    )
    pipe = subprocess.PIPE
    tasks = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=pipe, stderr=pipe, text=True) for _ in range(3)
    ]
    outs = [task.communicate(timeout=300) for task in tasks]
    assert all(task.returncode == 0 for task in tasks), [err for _, err in outs]
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1
    assert [p.name for p in (tmp_path / "cache" / "kernels").iterdir()] == [Path(paths.pop()).name]
