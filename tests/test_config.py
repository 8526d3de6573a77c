"""Recipe arguments: YAML mirrored by dataclasses, command-line overrides by HF name, clear errors."""

import pytest

from vlm_recipes.config import ConfigError, parse_recipe_args


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


def test_unknown_yaml_key_names_the_file_and_the_closest_field(tmp_path):
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out") + "learning_rat: 1.0\n")
    with pytest.raises(
        ConfigError, match=r"recipe.yaml: unknown key\(s\): learning_rat \(did you mean learning_rate"
    ):
        parse_recipe_args(config, [])


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        parse_recipe_args(tmp_path / "missing.yaml", [])


def test_local_model_folder_is_recorded_by_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    config = write_yaml(tmp_path, BASE.format(out=tmp_path / "out").replace("some/model", "model"))
    model_args, _, _ = parse_recipe_args(config, [])
    assert model_args.model_name_or_path == str(tmp_path / "model")
