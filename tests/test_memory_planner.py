"""The memory planner (vlm_recipes/memory.py, scripts/plan_memory.py): its arithmetic, the host-RAM check every
recipe runs before loading weights, and its estimates against peaks measured on real 2-process runs here.

What the measured cases compare, honestly: on this CPU-only machine a process's "GPU" memory is its own host
memory, so the planner's per-process figure (its per-GPU estimate plus this process's share of the node's host
estimate, `ConfigEstimate.process_bytes`) is compared with each rank's peak RSS (VmHWM, from
output_dir/run_stats/rank*.json, written by the recipes' RunStatsCallback), the larger of the two ranks. The
machine-wide peak is not used: other jobs share this machine. The tiny test models hold a few MB of state, so
their peak is the libraries' baseline alone; these cases use a 105M-parameter LLaVA-shaped model (the tiny
model's vision tower and processor, a larger language model) whose states, buffers and logits are 40-60% of the
peak. Two constants enter the estimate for CPU runs, both measured on runs that are not these cases: the
libraries' baseline per process (HOST_BASELINE_CPU_GIB, the tiny LLaVA's run) and CPU_RUN_SLACK (a 71M-parameter
ZeRO-3 offload run). The runs train in bf16 (`--bf16 true --use_cpu true`), as on a GPU, so DeepSpeed's
estimators apply as they are. Sequences are short here (the demo data), so the activation terms are checked
only through the logits; GPU runs with long sequences are compared in docs/benchmarks.md.
"""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from tests.conftest import REPO, launch_recipe
from tests.real_checkpoints import requires_real
from vlm_recipes import host_memory, memory
from vlm_recipes.config import ConfigError, ModelArguments
from vlm_recipes.data import ConversationDataset, load_records
from vlm_recipes.memory import (
    GIB,
    SPEED_ORDER,
    Hardware,
    TrainingSetup,
    estimate,
    estimate_all,
    load_model_config,
    model_shape,
    parameter_split,
    recommend,
)
from vlm_recipes.run_stats import read_run_stats

TOLERANCE = 0.20  # the target: within 20% of the measured peak


def shape_of(name):
    return model_shape(*load_model_config(name))


# ---- arithmetic ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, published_billions",
    [("llava-1.5-7b", 7.06), ("qwen2.5-vl-3b", 3.75), ("qwen2.5-vl-7b", 8.29)],
)
def test_parameter_counts_of_the_default_models_match_the_published_totals(name, published_billions):
    shape = shape_of(name)
    assert shape.total_params / 1e9 == pytest.approx(published_billions, rel=0.01)
    assert shape.vision_params > 0 and shape.projector_params > 0 and shape.language_params > 0


def test_counts_split_by_component_and_tied_embeddings_are_counted_once():
    qwen_3b, qwen_7b = shape_of("qwen2.5-vl-3b"), shape_of("qwen2.5-vl-7b")
    assert qwen_3b.tied_embeddings and not qwen_7b.tied_embeddings
    # Qwen2.5-VL-3B: embeddings 151936 x 2048, shared with lm_head; the 7B has its own lm_head.
    embeddings_7b = 152064 * 3584
    assert qwen_7b.largest_layer_params == embeddings_7b  # DeepSpeed's "largest layer": the embedding matrix
    assert qwen_3b.vision_params == qwen_7b.vision_params  # the same ViT, only the merger's output differs
    llava = shape_of("llava-1.5-7b")
    assert llava.projector_params == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # two linear layers with biases


def test_deepspeed_estimators_are_what_is_called(monkeypatch):
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    calls = []

    def spy(name, returned):
        def estimator(**kwargs):
            calls.append((name, kwargs))
            return returned

        return estimator

    monkeypatch.setattr(stage3, "estimate_zero3_model_states_mem_needs", spy("zero3", (7 * GIB, 3 * GIB, 0)))
    monkeypatch.setattr(
        stage_1_and_2, "estimate_zero2_model_states_mem_needs", spy("zero2", (5 * GIB, 2 * GIB))
    )
    shape, setup = shape_of("qwen2.5-vl-7b"), TrainingSetup.from_mode("full")
    hardware = Hardware(gpus_per_node=4, nodes=2)
    trainable, _ = parameter_split(shape, setup)
    expected_offloads = {
        "zero2": (False, None), "zero2_offload": (True, None), "zero3": (False, False),
        "zero3_offload_optimizer": (True, False), "zero3_offload": (True, True),
    }  # fmt: skip
    for config, (offload_optimizer, offload_param) in expected_offloads.items():
        calls.clear()
        result = estimate(config, shape, setup, hardware)
        (stage, kwargs), *others = calls
        assert not others and stage == config[:5]
        assert kwargs["total_params"] == trainable  # frozen parameters are added separately: weights only
        assert kwargs["num_gpus_per_node"] == 4 and kwargs["num_nodes"] == 2
        assert kwargs["cpu_offload"] is offload_optimizer
        if stage == "zero3":
            assert kwargs["cpu_offload_params"] is offload_param
            assert kwargs["largest_layer_params"] == shape.largest_layer_params
        gpu_part, host_part = (3, 7) if stage == "zero3" else (2, 5)
        assert result.gpu["trainable states (DeepSpeed's estimate)"] == gpu_part * GIB
        assert host_part * GIB in result.host.values()


# The planner's trainable and total counts against what each recipe really trains (its own freezing and PEFT
# wrapping, read from the run's run_stats): tests/conftest.py::assert_planner_counts_what_the_run_trained, called
# on the LLaVA, Qwen-VL and CheXagent runs of their recipe tests (full, LoRA with vision adapters, projector only).


def recommended(name, mode, **hardware):
    shape, setup = shape_of(name), TrainingSetup.from_mode(mode, micro_batch=2, seq_len=2048)
    machine = Hardware(**hardware)
    return recommend(estimate_all(shape, setup, machine), machine)


def test_offload_terms_measured_on_the_gpu_are_counted():
    """What the H100 runs showed DeepSpeed's estimators leave out (docs/benchmarks.md): the 16-bit gradients under
    optimizer-only offload, the fp32 accumulation buffer, the share ZeRO-3's offload ratio keeps on the GPU; and
    the activations LoRA adapters save."""
    shape, machine = shape_of("qwen2.5-vl-3b"), Hardware(gpus_per_node=2)
    setup = TrainingSetup.from_mode("full", micro_batch=2, seq_len=1024)
    trainable, _ = parameter_split(shape, setup)
    plain, accumulating = (
        estimate(name, shape, setup, machine) for name in ("zero2_offload", "zero2_offload_gpu_accum")
    )
    assert plain.gpu["16-bit gradients"] == trainable * 2
    assert accumulating.gpu["fp32 gradient accumulation (this GPU's partition)"] == trainable * 4 / 2
    assert "fp32 gradient accumulation (this GPU's partition)" not in plain.gpu

    partial = memory.read_ds_config("zero3_offload_optimizer")
    partial["zero_optimization"]["offload_optimizer"]["ratio"] = 0.7
    whole, split = (
        estimate("zero3_offload_optimizer", shape, setup, machine, ds_config=config)
        for config in (None, partial)
    )
    kept = split.gpu["optimizer states kept on the GPU (1 - offload ratio)"]
    assert kept == pytest.approx(0.3 * trainable * 12 / 2)
    states = "trainable states (DeepSpeed's estimate)"
    assert split.host[states] == pytest.approx(0.7 * whole.host[states])
    assert whole.gpu["16-bit gradients"] == trainable * 2 / 2  # ZeRO-3: this GPU's partition

    def language(checkpointing: bool, lora_r: int) -> float:
        mode_setup = TrainingSetup.from_mode(
            "lora" if lora_r else "full", lora_r=lora_r or 64, micro_batch=2, seq_len=1024,
            gradient_checkpointing=checkpointing,
        )  # fmt: skip
        return memory.activation_bytes(shape, mode_setup)["language model activations"]

    adapted_inputs = sum(shape.language_linear_inputs[name] for name in memory.DEFAULT_LORA_TARGETS)
    adapters = 2 * 1024 * adapted_inputs * memory.LORA_ACTIVATION_BYTES_PER_INPUT
    assert language(False, 64) - language(False, 0) == pytest.approx(adapters)
    assert language(True, 64) - language(True, 0) == pytest.approx(2 * adapters / shape.num_layers)


def test_more_memory_gives_a_faster_config():
    by_gpu_memory = [
        recommended("qwen2.5-vl-7b", "full", gpu_memory_gib=gib, host_ram_gib=256).config
        for gib in (24, 48, 141)
    ]
    assert by_gpu_memory == ["zero3_offload", "zero2_offload", "single_gpu"]
    by_host_ram = [
        recommended("llava-1.5-7b", "full", gpu_memory_gib=40, host_ram_gib=gib).config for gib in (128, 256)
    ]
    assert by_host_ram == [None, "zero2_offload"]
    ranks = [SPEED_ORDER.index(config) for config in by_gpu_memory]
    assert ranks == sorted(ranks, reverse=True)


def test_recommendation_names_what_rules_out_the_faster_configs():
    choice = recommended("qwen2.5-vl-7b", "full", gpu_memory_gib=48, host_ram_gib=256)
    assert choice.reason.startswith("zero2_offload: the fastest that fits with 10% to spare")
    assert "faster configs do not fit: single_gpu (GPU " in choice.reason and "zero3 (GPU " in choice.reason
    nothing = recommended("qwen2.5-vl-7b", "full", gpu_memory_gib=24, host_ram_gib=64)
    assert nothing.config is None and "Use LoRA" in nothing.reason
    pure_bf16 = recommended("llava-1.5-7b", "full", gpu_memory_gib=80, host_ram_gib=128)
    assert pure_bf16.config == "single_gpu" and "no fp32 master copy" in pure_bf16.reason


# ---- the host-RAM check every recipe runs ------------------------------------------------------------------------


def recipe_arguments(ds_config: str, model: str = "qwen2.5-vl-7b", **training):
    model_args = ModelArguments(  # the recipes' own dataclass: a field the planner reads is never missing here
        model_name_or_path=model, freeze_vision_tower=True, freeze_projector=False, freeze_language_model=False,
        use_lora=False, lora_r=64, lora_target_modules=list(memory.DEFAULT_LORA_TARGETS),
    )  # fmt: skip
    data_args = SimpleNamespace(max_length=2048)
    training_args = SimpleNamespace(
        deepspeed=str(REPO / "ds_configs" / f"{ds_config}.json"), per_device_train_batch_size=2,
        gradient_checkpointing=True, dataloader_num_workers=0, world_size=1, use_cpu=False,
        skip_memory_check=False,
    )  # fmt: skip
    for key, value in training.items():
        setattr(training_args, key, value)
    return training_args, model_args, data_args


def test_host_memory_check_refuses_an_offload_config_the_machine_cannot_hold(monkeypatch):
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: 16 * GIB)
    with pytest.raises(ConfigError) as refused:
        host_memory.check_host_memory(*recipe_arguments("zero3_offload"))
    message = str(refused.value)
    assert "ds_configs/zero3_offload.json needs about" in message and "only 16.0 GiB is available" in message
    for fix in (
        "--use_lora true",
        "more nodes",
        "ds_configs/zero3.json",
        "more RAM",
        "scripts/plan_memory.py",
    ):
        assert fix in message
    assert "--skip_memory_check true" in message
    # The same config with room to spare, a config that offloads nothing, or an explicit skip: no refusal.
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: 4096 * GIB)
    host_memory.check_host_memory(*recipe_arguments("zero3_offload"))
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: 16 * GIB)
    host_memory.check_host_memory(*recipe_arguments("zero3"))
    host_memory.check_host_memory(*recipe_arguments("zero3_offload", skip_memory_check=True))


def test_host_memory_check_counts_the_records_each_process_holds_and_their_mapped_table(
    monkeypatch, tmp_path
):
    table_file = tmp_path / "records.arrow"
    with table_file.open("wb") as sparse:  # 3 GiB as the page cache sees it, no disk used
        sparse.truncate(3 * GIB)

    class Records:  # what the check reads of data.read_records' result: its length and its mapped file
        table = SimpleNamespace(cache_files=[{"filename": str(table_file)}])

        def __len__(self):
            return 20_000_000

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    arguments = recipe_arguments("zero3_offload", world_size=2)
    hardware = memory.hardware_from_environment(arguments[0])
    shape, setup = memory.planned_run(arguments[1], arguments[2], arguments[0])
    ds_path = REPO / "ds_configs" / "zero3_offload.json"
    model_only = host_memory.host_need(
        memory.host_estimate_for_run(ds_path, shape, setup, hardware), hardware
    )
    # The model states fit with 1 GiB to spare; two processes' share of 20M records plus the 3 GiB table do not.
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: model_only + 1 * GIB)
    host_memory.check_host_memory(*arguments)
    with pytest.raises(ConfigError, match="20,000,000 records"):
        host_memory.check_host_memory(*arguments, records=(Records(), None))  # the eval set may be absent
    counted = 2 * 20_000_000 * memory.RECORD_HEAP_BYTES + 3 * GIB
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: model_only + counted - 1)
    with pytest.raises(ConfigError, match=rf"20,000,000 records: {counted / GIB:.1f} GiB of it"):
        host_memory.check_host_memory(*arguments, records=(Records(), None))
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: model_only + counted)
    host_memory.check_host_memory(*arguments, records=(Records(), None))


def big_llava_config_folder(folder):
    """A LLaVA-architecture config of about 70B parameters: config.json only, no weights (the check must not
    need them)."""
    tiny = LlavaConfig()
    tiny.text_config.update(dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80))
    tiny.save_pretrained(folder)
    return folder


@pytest.mark.distributed
def test_recipe_refuses_an_offload_run_bigger_than_host_ram_before_loading_anything(
    tiny_llava, demo_data, tmp_path
):
    model_dir = big_llava_config_folder(tmp_path / "llava-70b-config-only")
    # and processor files, as a checkpoint has: the check counts the image tokens the run's processor makes
    AutoProcessor.from_pretrained(tiny_llava).save_pretrained(model_dir)
    args = [
        "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", model_dir,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", tmp_path / "out",
    ]  # fmt: skip
    result = launch_recipe("llava.py", args, num_processes=1, check=False)
    assert result.returncode != 0
    assert "ds_configs/zero3_offload.json needs about" in result.stderr and "is available" in result.stderr
    assert "Loading weights" not in result.stderr


# ---- the script ----------------------------------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location("plan_memory", REPO / "scripts" / "plan_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def printed_table(out: str) -> dict[str, tuple[float, float, bool]]:
    """The planner's table as printed: config -> (per-GPU GiB, host GiB per node, fits)."""
    rows = {}
    for line in out.split("fits (10% margin)", 1)[1].split("Recommendation:", 1)[0].strip().splitlines():
        name, gpu, host, fits = line.split()[:4]
        rows[name] = (float(gpu), float(host), fits == "yes")
    return rows


@pytest.mark.parametrize("gpu_memory_gib", [80, 48])
def test_script_prints_a_table_and_a_recommendation_from_a_recipe_yaml(capsys, gpu_memory_gib):
    load_script().main(
        ["--config", "recipes/configs/qwen_vl_lora.yaml", "--host_ram_gib", "125",
         "--gpu_memory_gib", str(gpu_memory_gib)]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "Model: qwen2.5-vl-7b, 8.29B parameters" in out
    assert (
        "lora r=64" in out
        and "micro-batch 4 x 4096 tokens (1024 image tokens each, --max_pixels 802816)" in out
    )
    rows = printed_table(out)
    assert list(rows) == [c for c in SPEED_ORDER if c != "multi_gpu"]  # DDP needs more than one GPU
    for name, (gpu, host, fits) in rows.items():  # what "fits" means: both figures within the 10% margin
        assert fits is (gpu <= 0.9 * gpu_memory_gib and host <= 0.9 * 125), (name, gpu, host, fits)
    fastest_fitting = next(name for name, (_, _, fits) in rows.items() if fits)
    assert f"Recommendation: {fastest_fitting}: the fastest that fits" in out
    if gpu_memory_gib == 48:  # a 48 GB GPU: only full offload leaves enough of it free
        assert [name for name, (_, _, fits) in rows.items() if fits] == ["zero3_offload"]


def test_script_json_and_unknown_model_offline(capsys):
    load_script().main(
        [
            "--model",
            "llava-hf/llava-1.5-7b-hf",
            "--mode",
            "projector",
            "--gpus",
            "8",
            "--host_ram_gib",
            "512",
            "--json",
        ]
    )
    out = capsys.readouterr().out
    planned = json.loads(
        out[out.index("{\n") :]
    )  # after DeepSpeed's accelerator line where it is imported first
    assert planned["model"]["name"] == "llava-1.5-7b" and planned["setup"]["mode"] == "projector only"
    assert [c["config"] for c in planned["configs"]] == [c for c in SPEED_ORDER if c != "single_gpu"]
    assert planned["recommendation"]["config"] == "multi_gpu"
    with pytest.raises(SystemExit) as exited:  # offline (tests/conftest.py), as CI is
        load_script().main(["--model", "some-org/not-a-known-model"])
    assert "Offline, the planner knows llava-1.5-7b, qwen2.5-vl-3b" in str(exited.value.code)
    assert "pass a local folder holding its config.json" in str(exited.value.code)


# ---- estimates against measured peaks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_llava(tiny_llava, tmp_path_factory):
    """105M parameters: the tiny LLaVA's vision tower and processor, a 4-layer, 1024-wide language model with a
    32000-token vocabulary (rows beyond the tokenizer's are never used, but are trained and make real logits)."""
    tiny = LlavaConfig.from_pretrained(tiny_llava)
    text = tiny.text_config.to_dict() | dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=tiny.vision_config.to_dict(), text_config=text, image_token_id=tiny.image_token_id,
        vision_feature_layer=tiny.vision_feature_layer, projector_hidden_act="gelu",
        vision_feature_select_strategy=tiny.vision_feature_select_strategy,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("models") / "small-llava"
    model.save_pretrained(path)
    AutoProcessor.from_pretrained(tiny_llava).save_pretrained(path)
    return path


def longest_sample_tokens(model_dir, demo_data, max_length: int = 128) -> int:
    """The planner's seq_len for the demo data: its longest sample, image tokens included (llava_demo.yaml's
    max_length is 128; batches are padded to their longest sample)."""
    processor = AutoProcessor.from_pretrained(model_dir)
    records = load_records(demo_data / "train.json", demo_data, "train", False)
    dataset = ConversationDataset(records, processor, max_length)
    return max(len(dataset[k]["input_ids"]) for k in range(len(dataset)))


LORA = ["--use_lora", "true", "--freeze_language_model", "true", "--lora_r", "16"]
MEASURED_CASES = {  # accelerate config, planner mode, micro-batch, recipe arguments
    "zero3_offload, full, micro-batch 2": ("zero3_offload", "full", 2, []),
    "zero2, full, micro-batch 2": ("zero2", "full", 2, []),
    "zero3_offload, LoRA r=16, micro-batch 2": ("zero3_offload", "lora", 2, LORA),
}


# About 90 s each on CI's CPU (bf16 is emulated there): a benchmark's size, so they run in `make test-extended`, not
# in `make test` (the planner's figures are also checked against GPU runs: docs/benchmarks.md).
@pytest.mark.extended
@pytest.mark.distributed
@pytest.mark.parametrize("case", MEASURED_CASES)
def test_estimate_is_within_20_percent_of_the_measured_peak(small_llava, demo_data, tmp_path, case):
    config, mode, micro_batch, extra = MEASURED_CASES[case]
    args = [
        "--config", "recipes/configs/llava_demo.yaml", "--model_name_or_path", small_llava,
        "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", tmp_path / "run",
        # 2 steps: every buffer exists after the first optimizer step (bf16 is emulated on CPUs without AVX-512 BF16,
        # about 30 s a step of the full case on CI's machine)
        "--max_steps", "2", "--per_device_train_batch_size", micro_batch, "--gradient_accumulation_steps", "1",
        "--bf16", "true", "--use_cpu", "true", *extra,
    ]  # fmt: skip
    launch_recipe(  # 2 processes, as `hardware` below, whatever VLM_TEST_NUM_PROCESSES says
        "llava.py", args, num_processes=2, accelerate_config=REPO / "accelerate_configs" / f"{config}.yaml"
    )
    measured = max(rank["process_peak_rss_gib"] for rank in read_run_stats(tmp_path / "run"))

    setup = TrainingSetup.from_mode(
        mode, lora_r=16, micro_batch=micro_batch, seq_len=longest_sample_tokens(small_llava, demo_data),
        gradient_checkpointing=True, dataloader_workers=0,  # as llava_demo.yaml
    )  # fmt: skip
    hardware = Hardware(gpus_per_node=2, device="cpu")
    planned = estimate(config, model_shape(*load_model_config(str(small_llava))), setup, hardware)
    estimated = planned.process_bytes(hardware) / GIB
    print(f"{case}: estimated {estimated:.2f} GiB per process, measured peak RSS {measured:.2f} GiB")
    assert abs(estimated - measured) <= TOLERANCE * measured, (case, estimated, measured)


# ---- the default of `make train`, and the plain launch's hint -------------------------------------------------------


@pytest.mark.parametrize("yaml_name", ["qwen_vl.yaml", "llava.yaml"])
def test_make_trains_pick_is_the_fastest_that_fits_and_agrees_with_the_h200_measurements(capsys, yaml_name):
    """On one H200 (139 GiB, 125 GiB of host RAM) single_gpu measured fastest for these full fine-tunes, while the
    shipped zero3_offload was the slowest (docs/benchmarks.md); the pick says why and how to force another."""
    load_script().main(["--pick", "--config", f"recipes/configs/{yaml_name}", "--gpus", "1",
                        "--gpu_memory_gib", "139", "--host_ram_gib", "125"])  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out.strip() == "accelerate_configs/single_gpu.yaml"  # all make reads
    assert captured.err.startswith(
        "make train: accelerate_configs/single_gpu.yaml: memory planner (as given): "
    )
    assert "the fastest that fits" in captured.err and "ACCELERATE_CONFIG=" in captured.err


def test_make_trains_pick_without_a_gpu_or_a_known_model_is_the_shared_config(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    load_script().main(["--pick", "--config", "recipes/configs/llava.yaml", "--gpus", "2"])
    captured = capsys.readouterr()
    assert captured.out.strip() == "accelerate_configs/zero3_offload.yaml" and "no CUDA GPU" in captured.err
    load_script().main(["--pick", "--model", "someone/unknown-vlm", "--gpu_memory_gib", "80"])
    captured = capsys.readouterr()
    assert (
        captured.out.strip() == "accelerate_configs/zero3_offload.yaml"
        and "someone/unknown-vlm" in captured.err
    )


@pytest.mark.parametrize("gpu_memory_gib, faster", [(139, "single_gpu"), (24, None)])
def test_the_plain_launch_names_a_faster_config_that_fits(monkeypatch, capsys, gpu_memory_gib, faster):
    hardware = memory.Hardware(
        gpus_per_node=1, gpu_memory_gib=gpu_memory_gib, host_ram_gib=125, device="cuda"
    )
    monkeypatch.setattr(memory, "hardware_from_environment", lambda training_args: hardware)
    monkeypatch.setattr(host_memory, "meminfo_available_bytes", lambda: 125 * GIB)
    host_memory.check_host_memory(*recipe_arguments("zero3_offload", model="qwen2.5-vl-3b"))
    said = capsys.readouterr().err
    if faster is None:  # on a 24 GB GPU only the run's own offload config fits: nothing to say
        assert "memory planner:" not in said
        return
    assert said.startswith(
        f"memory planner: {faster} fits this machine too and is faster than zero3_offload: "
    )
    assert f"--config_file accelerate_configs/{faster}.yaml recipes/<recipe>.py --deepspeed none" in said


@requires_real("qwen3-vl-30b-a3b-instruct")
def test_the_real_qwen3_vl_moe_config_counts_every_expert_and_the_experts_as_the_largest_layer():
    """Qwen3-VL-30B-A3B's config (../shared/real-checkpoints): 31.07B parameters, 30.5B of them the language model's;
    each layer's 128 experts are one module of 128 x 3 x 768 x 2048 parameters, the largest DeepSpeed gathers."""
    from tests.real_checkpoints import real_folder

    name, config = memory.load_model_config(str(real_folder("qwen3-vl-30b-a3b-instruct")))
    shape = memory.model_shape(name, config)
    assert config.model_type == "qwen3_vl_moe"
    assert round(shape.total_params / 1e9, 2) == 31.07 and round(shape.language_params / 1e9, 1) == 30.5
    assert shape.largest_layer_params == 128 * 3 * 768 * 2048


def test_the_planner_takes_gemma_3s_pooled_image_tokens_from_its_config():
    """Gemma 3's tower sees (896 / 14)^2 = 4,096 patches and pools them to mm_tokens_per_image = 256 tokens: the
    planner's default is the config's 256, not the patch count (a recipe passes its processor's measured count)."""
    from transformers import Gemma3Config

    shape = memory.model_shape("gemma-3", Gemma3Config())
    assert shape.default_image_tokens == 256


def test_a_config_the_recipes_refuse_in_fp16_is_not_picked_for_an_fp16_run():
    # Qwen2.5-VL-3B full at 4 x 4096 with fp32 masters on an 80 GB GPU: zero2_offload_gpu_accum is the fastest that
    # fits, but in fp16 it never trained (make test-gpu on an H200) and the recipes refuse it there.
    shape, machine = shape_of("qwen2.5-vl-3b"), Hardware(gpus_per_node=1, gpu_memory_gib=80, host_ram_gib=128)
    picks = {}
    for fp16 in (False, True):
        setup = TrainingSetup.from_mode("full", micro_batch=4, seq_len=4096, fp16=fp16)
        choice = recommend(estimate_all(shape, setup, machine), machine, fp32_master_weights=True)
        picks[fp16] = choice.config
        if fp16:
            assert choice.fits["zero2_offload_gpu_accum"] == "refused in fp16", choice.fits
    assert picks == {False: "zero2_offload_gpu_accum", True: "zero2_offload"}
