"""The streaming checkpoint reader against transformers' own loader: same tensors, same tokens, less memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from fiddler_batch import checkpoint as checkpoint_mod
from fiddler_batch.checkpoint import Binding, Checkpoint, CheckpointCorrupt, CheckpointUnsupported, assign
from tests.engine.families import COMMON, DENSE, build

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "dense"]
PROMPT = torch.tensor([[3, 17, 42, 99, 7, 128, 5, 64]])


def save(model: torch.nn.Module, folder: Path, shard: str | None = None) -> Path:
    """save_pretrained, as transformers writes checkpoints (legacy per-expert keys for MoE families)."""
    if shard is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=shard)
    return folder


def fill_all(ckpt: Checkpoint, model: torch.nn.Module) -> Binding:
    """bind + fill every name into fresh CPU tensors + tie, as the engine would (with its own devices)."""
    with ckpt.bind(model) as binding:
        for name in binding.names():
            dest = torch.empty(binding.shape(name), dtype=binding.dtype(name))
            binding.fill(name, dest)
            assign(model, name, dest)
        binding.tie_weights(model)
    return binding


def stream(folder: Path, dtype: torch.dtype | str = "auto") -> tuple[torch.nn.Module, Binding]:
    """The reader's whole load: open, skeleton, fill_all."""
    ckpt = Checkpoint.open(folder)
    model = ckpt.skeleton(AutoConfig.from_pretrained(folder), dtype)
    return model, fill_all(ckpt, model)


def assert_same_model(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    """Every state-dict tensor and buffer identical (values and dtype), no meta left, same implementations."""
    assert not [name for name, param in model.named_parameters() if param.device.type == "meta"]
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name
    buffers = dict(model.named_buffers())
    for name, buffer in reference.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    assert model.config._attn_implementation == reference.config._attn_implementation
    experts = [getattr(m.config, "_experts_implementation", None) for m in (model, reference)]
    assert experts[0] == experts[1]


def generate(model: torch.nn.Module) -> torch.Tensor:
    return model.generate(
        PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=6, do_sample=False, pad_token_id=0
    )


def expert_names(binding: Binding) -> list[str]:
    return [name for name in binding.names() if ".experts." in name and len(binding.shape(name)) >= 2]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, bool], Path]:
    """A saved tiny model per family, single-file or in several shards (the same weights), built once."""
    models: dict[str, torch.nn.Module] = {}
    cache: dict[tuple[str, bool], Path] = {}

    def get(family: str, sharded: bool = False) -> Path:
        if (family, sharded) not in cache:
            model = models.setdefault(family, build(family))
            folder = tmp_path_factory.mktemp(f"{family}-{'sharded' if sharded else 'single'}")
            cache[family, sharded] = save(model, folder, "150KB" if sharded else None)
        return cache[family, sharded]

    return get


@pytest.fixture(scope="module")
def references(folders: Callable[[str, bool], Path]) -> Callable[[str], torch.nn.Module]:
    """from_pretrained of each family's single-file checkpoint, loaded once: what the reader must reproduce."""
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = AutoModelForCausalLM.from_pretrained(folders(family, False))
        return cache[family]

    return get


# ---------------------------------------------------------------------------------------------------------------
# Equivalence with from_pretrained


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_model_equals_from_pretrained(
    folders: Callable[[str, bool], Path], references: Callable[[str], torch.nn.Module], family: str
) -> None:
    """Single file and several shards (same weights) both load exactly what from_pretrained loads."""
    reference = references(family)
    tokens = generate(reference)
    for sharded in (False, True):
        folder = folders(family, sharded)
        assert (len(Checkpoint.open(folder).files) > 1) == sharded
        model, binding = stream(folder)
        assert_same_model(model, reference)
        assert not binding.unexpected
        assert torch.equal(generate(model), tokens)
    fused = [name for name in expert_names(binding) if name.endswith("gate_up_proj")]
    if family not in ("dense", "gpt_oss"):  # saved in the legacy layout: two sources per expert, concatenated
        assert fused and len(binding.sources(fused[0])) == 2 * binding.shape(fused[0])[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_expert_rows_one_index_at_a_time(
    folders: Callable[[str, bool], Path], references: Callable[[str], torch.nn.Module], family: str
) -> None:
    """Each expert read alone into a smaller [E', ...] buffer, in any order, equals that row of the fused tensor."""
    folder = folders(family, True)
    reference = references(family).state_dict()
    ckpt = Checkpoint.open(folder)
    with ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(folder), "auto")) as binding:
        names = expert_names(binding)
        assert names
        for name in names:
            experts = binding.shape(name)[0]
            chosen = [experts - 1, 0, experts // 2]  # E' = 3 rows of E
            rows = torch.full((len(chosen), *binding.shape(name)[1:]), float("nan"), dtype=binding.dtype(name))
            for slot, index in enumerate(chosen):
                binding.fill(name, rows[slot], index=index)
            assert torch.equal(rows, reference[name][chosen]), name


def test_expert_row_into_strided_bfloat16_dest(
    folders: Callable[[str, bool], Path], references: Callable[[str], torch.nn.Module]
) -> None:
    """A non-contiguous destination of another dtype goes through staging and still gets exactly the cast row."""
    folder = folders("mixtral", False)
    reference = references("mixtral").state_dict()
    ckpt = Checkpoint.open(folder)
    with ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(folder), "auto")) as binding:
        name = "model.layers.1.mlp.experts.gate_up_proj"
        rows, hidden = binding.shape(name)[1:]  # [2I, H]
        dest = torch.empty(hidden, rows, dtype=torch.bfloat16).t()  # [2I, H], column-major
        binding.fill(name, dest, index=5)
        assert torch.equal(dest, reference[name][5].to(torch.bfloat16))


@pytest.mark.parametrize("staging", [256, 1024], ids=["row-split", "row-blocks"])
def test_small_staging_buffer_splits_large_tensors(
    folders: Callable[[str, bool], Path],
    references: Callable[[str], torch.nn.Module],
    monkeypatch: pytest.MonkeyPatch,
    staging: int,
) -> None:
    """With a tiny staging buffer every tensor is copied in many chunks (blocks of rows, or pieces of one row)."""
    monkeypatch.setattr(checkpoint_mod, "STAGING_BYTES", staging)
    folder = folders("qwen2_moe", True)
    reference = references("qwen2_moe").state_dict()
    ckpt = Checkpoint.open(folder)
    with ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(folder), "auto")) as binding:
        for name in binding.names():
            dest = torch.empty(binding.shape(name)[::-1], dtype=torch.float64).permute(
                *reversed(range(len(binding.shape(name))))
            )  # same shape, every stride reversed
            binding.fill(name, dest)
            assert torch.equal(dest, reference[name].double()), name


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_float32_checkpoint_into_bfloat16(folders: Callable[[str, bool], Path], family: str) -> None:
    """Dtype conversion chunk by chunk equals from_pretrained(dtype=bfloat16), keep-in-fp32 routers included."""
    folder = folders(family, False)
    assert Checkpoint.open(folder).dtype() == torch.float32
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    model, _ = stream(folder, torch.bfloat16)
    assert_same_model(model, reference)
    assert torch.equal(generate(model), generate(reference))


def test_names_read_the_files_in_order(folders: Callable[[str, bool], Path]) -> None:
    ckpt = Checkpoint.open(folders("olmoe", True))
    with ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(ckpt.folder), "auto")) as binding:
        first = [binding._target(name).first_source() for name in binding.names()]
    positions = [(source.shard, source.offset) for source in first]
    assert positions == sorted(positions)
    assert ckpt.nbytes == sum(os.path.getsize(path) for path in ckpt.files) - sum(
        8 + int.from_bytes(path.read_bytes()[:8], "little") for path in ckpt.files
    )


# ---------------------------------------------------------------------------------------------------------------
# Tied weights, fused checkpoints, skeleton


def tied_llama(tmp_path: Path) -> Path:
    config = getattr(transformers, DENSE[0])(**{**COMMON, **DENSE[2], "tie_word_embeddings": True})
    torch.manual_seed(1)
    return save(getattr(transformers, DENSE[1])(config).eval(), tmp_path / "tied")


def test_tied_embeddings_are_filled_once_and_tied_after(tmp_path: Path) -> None:
    folder = tied_llama(tmp_path)
    ckpt = Checkpoint.open(folder)
    with ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(folder), "auto")) as binding:
        assert binding.tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert "lm_head.weight" not in binding.names()
    model, _ = stream(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_pretrained(folder)
    assert_same_model(model, reference)
    assert torch.equal(generate(model), generate(reference))


def test_tie_weights_without_transformers_tie_mapping(tmp_path: Path) -> None:
    """Aliases known only by identity in the skeleton are re-tied too."""
    folder = tied_llama(tmp_path)
    ckpt = Checkpoint.open(folder)
    model = ckpt.skeleton(AutoConfig.from_pretrained(folder), "auto")
    model.all_tied_weights_keys = {}
    fill_all(ckpt, model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cpu"


def test_tied_weights_when_the_checkpoint_holds_the_head(tmp_path: Path) -> None:
    """Only lm_head.weight on disk: it is the one filled, and tying goes from it to the embedding."""
    folder = tied_llama(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    model, binding = stream(folder)
    assert binding.tied == {"model.embed_tokens.weight": "lm_head.weight"}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(folder))


def test_fused_checkpoint_reads_expert_slices(references: Callable[[str], torch.nn.Module], tmp_path: Path) -> None:
    """A checkpoint already holding [E, 2I, H] keys binds them directly; one expert reads only its rows."""
    reference = references("mixtral")
    folder = tmp_path / "fused"
    reference.config.save_pretrained(folder)
    fused = {key: tensor.contiguous() for key, tensor in reference.state_dict().items()}
    save_file(fused, folder / "model.safetensors", metadata={"format": "pt"})
    model, binding = stream(folder)
    assert binding.sources("model.layers.0.mlp.experts.gate_up_proj") == ["model.layers.0.mlp.experts.gate_up_proj"]
    assert_same_model(model, reference)
    ckpt = Checkpoint.open(folder)
    with ckpt.bind(ckpt.skeleton(reference.config, "auto")) as binding:
        row = torch.empty(binding.shape("model.layers.2.mlp.experts.down_proj")[1:])
        binding.fill("model.layers.2.mlp.experts.down_proj", row, index=6)
        assert torch.equal(row, reference.state_dict()["model.layers.2.mlp.experts.down_proj"][6])


def test_skeleton_parameters_on_meta_buffers_real(folders: Callable[[str, bool], Path]) -> None:
    ckpt = Checkpoint.open(folders("deepseek_v3", False))
    register = torch.nn.Module.register_parameter
    model = ckpt.skeleton(AutoConfig.from_pretrained(ckpt.folder), torch.bfloat16)
    assert torch.nn.Module.register_parameter is register  # the patch is undone
    assert not model.training
    assert {param.device.type for param in model.parameters()} == {"meta"}
    assert {buffer.device.type for buffer in model.buffers()} == {"cpu"}
    reference = AutoModelForCausalLM.from_pretrained(ckpt.folder, dtype=torch.bfloat16)
    dtypes = {name: t.dtype for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert dtypes == {name: t.dtype for name, t in [*reference.named_parameters(), *reference.named_buffers()]}
    assert torch.float32 in dtypes.values()  # keep-in-fp32 modules (which ones depends on the version)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16


def test_auto_dtype_follows_the_config_then_the_checkpoint(folders: Callable[[str, bool], Path]) -> None:
    ckpt = Checkpoint.open(folders("mixtral", False))
    config = AutoConfig.from_pretrained(ckpt.folder)
    config.dtype = torch.float16
    assert next(ckpt.skeleton(config, "auto").parameters()).dtype == torch.float16
    assert config.dtype == torch.float16  # the caller's config is left alone
    config.dtype = None
    assert next(ckpt.skeleton(config, "auto").parameters()).dtype == ckpt.dtype() == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# What the reader refuses


def test_only_pytorch_bin_is_unsupported(tmp_path: Path) -> None:
    torch.save({"model.norm.weight": torch.ones(4)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointUnsupported, match="pytorch_model.bin"):
        Checkpoint.open(tmp_path)


def test_missing_key_names_the_parameter(folders: Callable[[str, bool], Path], tmp_path: Path) -> None:
    source = folders("dense", False)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointUnsupported, match=r"model\.norm\.weight"):
        ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(source), "auto"))


@pytest.mark.parametrize("change", ["append-transpose", "chunk-instead"])
def test_unsupported_conversion_names_the_operation(
    folders: Callable[[str, bool], Path], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    from transformers import conversion_mapping
    from transformers.core_model_loading import Chunk, Transpose, WeightConverter

    real = conversion_mapping.get_model_conversion_mapping

    def altered(model: torch.nn.Module, *args: object, **kwargs: object) -> list[object]:
        mapping = real(model, *args, **kwargs)
        for entry in mapping:
            if isinstance(entry, WeightConverter):
                if change == "append-transpose":
                    entry.operations.append(Transpose(dim0=1, dim1=2))
                else:
                    entry.operations[:] = [Chunk(dim=0)]
        return mapping

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", altered)
    ckpt = Checkpoint.open(folders("mixtral", False))
    with pytest.raises(CheckpointUnsupported, match="Transpose" if change == "append-transpose" else "Chunk"):
        ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(ckpt.folder), "auto"))


def test_quantized_checkpoint_is_unsupported(folders: Callable[[str, bool], Path]) -> None:
    """GPT-OSS as published (mxfp4 experts) needs transformers' quantizer: refused, with the method named."""
    ckpt = Checkpoint.open(folders("gpt_oss", False))
    config = AutoConfig.from_pretrained(ckpt.folder)
    model = ckpt.skeleton(config, "auto")
    config.quantization_config = {"quant_method": "mxfp4"}
    with pytest.raises(CheckpointUnsupported, match="mxfp4"):
        ckpt.skeleton(config, "auto")
    model.config.quantization_config = {"quant_method": "mxfp4"}
    with pytest.raises(CheckpointUnsupported, match="mxfp4"):
        ckpt.bind(model)


def copy_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def test_truncated_shard_fails_at_open_naming_the_file(folders: Callable[[str, bool], Path], tmp_path: Path) -> None:
    folder = copy_checkpoint(folders("mixtral", True), tmp_path / "copy")
    shard = Checkpoint.open(folder).files[1]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(CheckpointCorrupt, match="the shard is truncated") as error:
        Checkpoint.open(folder)
    assert error.value.filename == str(shard)
    assert str(error.value).startswith(str(shard))
    assert isinstance(error.value, OSError)


def test_shard_truncated_after_open_fails_the_read(folders: Callable[[str, bool], Path], tmp_path: Path) -> None:
    """A short read raises (naming file and tensor) instead of leaving part of the destination unwritten."""
    folder = copy_checkpoint(folders("mixtral", False), tmp_path / "copy")
    ckpt = Checkpoint.open(folder)
    with ckpt.bind(ckpt.skeleton(AutoConfig.from_pretrained(folder), "auto")) as binding:
        last = binding.names()[-1]
        os.truncate(ckpt.files[0], binding._target(last).first_source().offset + 8)
        with pytest.raises(CheckpointCorrupt, match="inside tensor .* the shard is truncated") as error:
            binding.fill(last, torch.empty(binding.shape(last), dtype=binding.dtype(last)))
        assert error.value.filename == str(ckpt.files[0])
        with pytest.raises(CheckpointCorrupt):  # the staged path too
            binding.fill(last, torch.empty(binding.shape(last), dtype=torch.float64))


def test_damaged_header_and_missing_shard(folders: Callable[[str, bool], Path], tmp_path: Path) -> None:
    folder = copy_checkpoint(folders("mixtral", True), tmp_path / "copy")
    files = Checkpoint.open(folder).files
    files[0].write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointCorrupt, match="header length"):
        Checkpoint.open(folder)
    files[0].unlink()
    with pytest.raises(CheckpointCorrupt, match="missing"):
        Checkpoint.open(folder)


# ---------------------------------------------------------------------------------------------------------------
# Peak memory, measured from /proc/self/status in a fresh process

MEASURE = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    import transformers.models.mixtral.modeling_mixtral
    from contextlib import suppress
    from fiddler_batch.bench import hostmemory
    from fiddler_batch.bench.hostmemory import status
    from fiddler_batch.checkpoint import Checkpoint

    def reset_peak():
        with suppress(OSError):
            hostmemory.reset_peak()

    mode, folder = sys.argv[1], sys.argv[2]
    config = AutoConfig.from_pretrained(folder)
    if mode == "stream":
        ckpt = Checkpoint.open(folder)
        reset_peak()
        before = status()
        model = ckpt.skeleton(config, "auto")
        binding = ckpt.bind(model)
        kept = []
        for name in binding.names():
            dest = torch.empty(binding.shape(name), dtype=binding.dtype(name))
            binding.fill(name, dest)
            kept.append(dest)
        after = status()
        binding.close()
    else:
        reset_peak()
        before = status()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
        after = status()
    print(json.dumps({"before": before, "after": after}))
    """
)


def big_mixtral(folder: Path) -> Path:
    """About 390 MB of bfloat16, written fast: meta model, uninitialised storage, a cheap random fill."""
    config = transformers.MixtralConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=16000,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    pattern = torch.empty(1 << 20, dtype=torch.bfloat16)
    pattern.uniform_(-0.05, 0.05, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for param in model.parameters():
            flat = param.view(-1)
            for start in range(0, flat.numel(), pattern.numel()):  # tiling a random block: fast and not all zeros
                flat[start : start + pattern.numel()] = pattern[: flat.numel() - start]
    model.save_pretrained(folder)
    return folder


def measure(mode: str, folder: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-c", MEASURE, mode, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def result(process: subprocess.Popen[str]) -> dict[str, dict[str, int]]:
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_memory_is_about_one_copy(tmp_path: Path) -> None:
    folder = big_mixtral(tmp_path / "big")
    nbytes = Checkpoint.open(folder).nbytes
    assert 300e6 < nbytes < 600e6
    streamed, loaded = measure("stream", folder), measure("from_pretrained", folder)
    mib = 1 << 20
    report = {}
    for label, process in (("stream", streamed), ("from_pretrained", loaded)):
        before, after = result(process).values()
        report[label] = {
            "peak_growth": after["VmHWM"] - before["VmRSS"],
            "anon_growth": after["RssAnon"] - before["RssAnon"],
            "file_growth": after["RssFile"] - before["RssFile"],
        }
        growth = ", ".join(f"{key} {value / mib:.0f} MiB" for key, value in report[label].items())
        print(f"{label}: checkpoint {nbytes / mib:.0f} MiB, {growth}")
    assert report["stream"]["peak_growth"] <= 1.1 * nbytes + 64 * mib
    assert report["stream"]["file_growth"] <= 32 * mib  # code pages of lazily imported modules
    assert report["stream"]["anon_growth"] >= 0.95 * nbytes  # the destinations really were written
