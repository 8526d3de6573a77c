"""Recipe arguments: YAML mirrored by dataclasses, command-line overrides by HF name, clear errors, and no
secret kept where the run would write it."""

import json
import os
import pickle
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import REPO
from vlm_recipes.config import ConfigError, auto_precision, parse_recipe_args, resolve_deepspeed
from vlm_recipes.ds_config import arch_list_deepspeed_can_parse, fp16_problem, secret_keys
from vlm_recipes.training import CHECKPOINT_COMPLETE, prepare_output_dir, training_dtype


def write_yaml(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


BASE = "model_name_or_path: some/model\ndataset_path: data.json\noutput_dir: {out}\nlearning_rate: 1.0e-5\n"


def test_yaml_values_then_command_line_overrides(tmp_path):
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out"))
    model_args, data_args, training_args = parse_recipe_args(
        tmp_path / "unused.yaml", ["--config", str(config), "--learning_rate", "3e-4", "--max_length", "64"]
    )
    assert model_args.model_name_or_path == "some/model" and data_args.dataset_path == "data.json"
    assert training_args.learning_rate == 3e-4 and data_args.max_length == 64  # command line wins
    assert training_args.bf16 is False and training_args.fp16 is False  # auto precision: fp32 without a GPU


@pytest.mark.parametrize(
    ("cuda", "bf16_supported", "expected"),
    [(True, True, {"bf16": True, "fp16": False}),  # Ampere and later
     (True, False, {"bf16": False, "fp16": True}),  # V100, T4: no bf16
     (False, False, {"bf16": False, "fp16": False})],  # CPU: fp32
)  # fmt: skip
def test_precision_is_chosen_per_gpu(monkeypatch, cuda, bf16_supported, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    assert auto_precision() == expected


def test_auto_precision_applies_unless_a_precision_is_given(tmp_path, monkeypatch):
    # What auto_precision picks on an Ampere GPU, here on the CPU (TrainingArguments would initialise CUDA if
    # torch.cuda said it had one): the arguments carry it unless --bf16 or --fp16 is given, on the command line
    # or in the YAML.
    monkeypatch.setattr("vlm_recipes.config.auto_precision", lambda: {"bf16": True, "fp16": False})
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out") + "use_cpu: true\n")
    _, _, training_args = parse_recipe_args(config, ["--config", str(config)])
    assert (training_args.bf16, training_args.fp16) == (True, False)
    _, _, training_args = parse_recipe_args(config, ["--config", str(config), "--bf16", "false"])
    assert (training_args.bf16, training_args.fp16) == (False, False)
    config.write_text(config.read_text() + "bf16: false\n")
    _, _, training_args = parse_recipe_args(config, ["--config", str(config)])
    assert (training_args.bf16, training_args.fp16) == (False, False)


def test_weights_load_in_the_training_precision_but_fp16_without_deepspeed_in_fp32():
    def dtype(bf16=False, fp16=False, deepspeed=False):
        return training_dtype(
            SimpleNamespace(bf16=bf16, fp16=fp16, deepspeed_plugin=object() if deepspeed else None)
        )

    assert dtype() == torch.float32
    assert dtype(bf16=True) == dtype(bf16=True, deepspeed=True) == torch.bfloat16
    assert dtype(fp16=True, deepspeed=True) == torch.float16  # DeepSpeed keeps fp32 master weights
    assert dtype(fp16=True) == torch.float32  # torch's GradScaler refuses fp16 gradients


def test_unknown_yaml_key_names_the_file_and_the_closest_field(tmp_path):
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out") + "learning_rat: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"recipe.yaml: unknown key\(s\): learning_rat \(did you mean learning_rate"
    ):
        parse_recipe_args(config, [])


def test_dora_without_lora_is_refused_with_the_fix(tmp_path):
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out") + "use_dora: true\n")
    with pytest.raises(ConfigError, match="--use_dora true .* pass --use_lora true as well"):
        parse_recipe_args(config, [])
    model_args, _, _ = parse_recipe_args(config, ["--use_lora", "true"])
    assert model_args.use_dora and model_args.use_lora


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        parse_recipe_args(tmp_path / "missing.yaml", [])


def test_local_model_folder_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out").replace("some/model", "model"))
    model_args, _, _ = parse_recipe_args(config, [])
    assert model_args.model_name_or_path == str(tmp_path / "model")


@pytest.mark.parametrize("given_in", ["command line", "yaml"])
def test_hub_token_is_cleared_from_the_arguments_and_handed_over_in_the_environment(
    tmp_path, monkeypatch, given_in
):
    monkeypatch.delenv("HF_TOKEN", raising=False)  # restored after the test
    in_yaml = given_in == "yaml"
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out") + ("hub_token: hf_SECRETabc\n" * in_yaml))
    token_flag = [] if in_yaml else ["--hub_token", "hf_SECRETabc"]
    _, _, training_args = parse_recipe_args(config, ["--config", str(config), *token_flag])
    assert training_args.hub_token is None
    assert os.environ["HF_TOKEN"] == "hf_SECRETabc"  # where huggingface_hub looks when given no token
    assert b"hf_SECRETabc" not in pickle.dumps(training_args)  # what the Trainer writes as training_args.bin


def test_credentials_in_a_deepspeed_config_are_found_by_key_name():
    shipped = {path.name: json.loads(path.read_text()) for path in (REPO / "ds_configs").glob("*.json")}
    assert shipped and all(secret_keys(config) == [] for config in shipped.values())
    config = {**shipped["zero3_offload.json"], "comet": {"enabled": True, "api_key": "SECRET"}}
    assert secret_keys(config) == ["comet.api_key"]
    # every key name that holds one, at any depth; not a value that merely mentions one
    nested = {"a": {"hub_token": "x", "b": {"db_password": "y", "client_secret": "z"}}, "note": "api_key"}
    assert secret_keys(nested) == ["a.hub_token", "a.b.db_password", "a.b.client_secret"]
    # Through a recipe, listed with the config's other problems:
    # test_config_suite.py::test_every_problem_of_a_deepspeed_config_is_listed_before_loading_weights.


def test_fp16_is_refused_only_for_the_config_whose_fp16_runs_never_trained():
    shipped = {path.stem: json.loads(path.read_text()) for path in (REPO / "ds_configs").glob("*.json")}
    refused = {name for name, config in shipped.items() if fp16_problem(config)}
    assert refused == {"zero2_offload_gpu_accum"}  # every step overflowed in fp16 on an H200; bf16 trains
    assert "zero2_offload.json" in fp16_problem(shipped["zero2_offload_gpu_accum"])  # the fix is named
    # the buffer without optimizer offload is not what failed
    on_gpu = {**shipped["zero2_offload_gpu_accum"], "zero_optimization": {"stage": 2}}
    assert fp16_problem(on_gpu) is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("9.0a", "9.0"),  # the H100 image's value: DeepSpeed 0.19.8 fails on it when it builds FusedAdam
        ("8.0;9.0a 10.0f+PTX", "8.0;9.0;10.0+PTX"),
        ("9.0 9.0a", "9.0"),
        ("8.0;9.0+PTX", None),  # nothing to change: left as the user wrote it
        ("", None),
    ],
)
def test_cuda_arch_variants_are_dropped_for_deepspeed(given, expected):
    environ = {"TORCH_CUDA_ARCH_LIST": given}
    assert arch_list_deepspeed_can_parse(environ) == expected
    assert environ["TORCH_CUDA_ARCH_LIST"] == (expected if expected is not None else given)


# ---- which DeepSpeed config a run uses -------------------------------------------------------------------------

SHARED = str(REPO / "ds_configs" / "zero3_offload.json")
ZERO2 = str(REPO / "ds_configs" / "zero2.json")
LAUNCHER_ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": ZERO2}
LAUNCHER_SHARED = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": SHARED}
YAML = REPO / "recipes" / "configs" / "llava.yaml"


def test_every_recipe_yaml_names_the_shared_zero3_offload_config():
    import yaml

    for path in sorted((REPO / "recipes" / "configs").glob("*.yaml")):
        assert yaml.safe_load(path.read_text())["deepspeed"] == "ds_configs/zero3_offload.json", path


def test_plain_launch_takes_the_yaml_config_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(
        tmp_path
    )  # ds_configs/... is then found beside the recipes, not in the working directory
    chosen, line = resolve_deepspeed("ds_configs/zero3_offload.json", None, YAML, environ={})
    assert chosen == SHARED and f"(deepspeed in {YAML})" in line


def test_launcher_config_replaces_the_yaml_and_says_so():
    assert resolve_deepspeed("ds_configs/zero3_offload.json", None, YAML, LAUNCHER_SHARED) == (None, None)
    chosen, line = resolve_deepspeed("ds_configs/zero3_offload.json", None, YAML, LAUNCHER_ZERO2)
    assert (
        chosen is None and "the launcher config wins" in line and ZERO2 in line
    )  # accelerate hands over zero2
    chosen, line = resolve_deepspeed(
        "ds_configs/zero3_offload.json", None, YAML, {"ACCELERATE_USE_FSDP": "true"}
    )
    assert chosen is None and "FSDP" in line


def test_command_line_deepspeed_that_contradicts_the_launcher_is_refused():
    with pytest.raises(
        ConfigError, match=r"runs DeepSpeed \(.*zero2.json\), but --deepspeed ds_configs/zero3"
    ):
        resolve_deepspeed(None, "ds_configs/zero3_offload.json", YAML, LAUNCHER_ZERO2)
    with pytest.raises(ConfigError, match="asks for no DeepSpeed"):
        resolve_deepspeed(None, "none", YAML, LAUNCHER_ZERO2)
    with pytest.raises(ConfigError, match="runs FSDP"):
        resolve_deepspeed(None, "ds_configs/zero2.json", YAML, {"ACCELERATE_USE_FSDP": "true"})
    assert resolve_deepspeed(None, "ds_configs/zero2.json", YAML, LAUNCHER_ZERO2) == (
        None,
        None,
    )  # they agree
    assert resolve_deepspeed("ds_configs/zero3_offload.json", "none", YAML, {}) == (None, None)
    with pytest.raises(ConfigError, match="ds_configs/zero9.json .*does not exist"):
        resolve_deepspeed("ds_configs/zero9.json", None, YAML, {})


def test_contradiction_is_refused_by_the_recipe_before_anything_loads(tmp_path, monkeypatch):
    for name, value in LAUNCHER_ZERO2.items():
        monkeypatch.setenv(name, value)
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out"))
    with pytest.raises(ConfigError, match="Pick one"):
        parse_recipe_args(config, ["--config", str(config), "--deepspeed", "ds_configs/zero3_offload.json"])


def test_only_checkpoints_every_rank_finished_are_resumed_from(tmp_path, caplog):
    # both have rank 0's trainer_state.json; only checkpoint-5 was finished by every rank
    for step in (5, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-5" / CHECKPOINT_COMPLETE).write_text('{"files": ["trainer_state.json"]}')
    (tmp_path / "checkpoint-20").mkdir()  # cut off before rank 0 finished
    # marked complete, but a file its marker lists was deleted since (by hand, or a disk clean-up)
    (tmp_path / "checkpoint-15").mkdir()
    (tmp_path / "checkpoint-15" / CHECKPOINT_COMPLETE).write_text(
        '{"files": ["trainer_state.json", "gone.pt"]}'
    )
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text("{}")

    def arguments(resume=None):
        return SimpleNamespace(
            output_dir=str(tmp_path), overwrite_output_dir=False, resume_from_checkpoint=resume
        )

    assert prepare_output_dir(arguments()) == str(tmp_path / "checkpoint-5")
    assert f"ignoring {tmp_path / 'checkpoint-10'}: its writing did not finish on every rank" in caplog.text
    assert f"ignoring {tmp_path / 'checkpoint-20'}" in caplog.text
    assert f"ignoring {tmp_path / 'checkpoint-15'}" in caplog.text
    # asked for by name: resumed from, with a warning; without trainer_state.json: refused
    assert prepare_output_dir(arguments(str(tmp_path / "checkpoint-10"))) == str(tmp_path / "checkpoint-10")
    assert f"has no {CHECKPOINT_COMPLETE}" in caplog.text
    with pytest.raises(ConfigError, match="checkpoint-20 is not a complete checkpoint"):
        prepare_output_dir(arguments(str(tmp_path / "checkpoint-20")))
