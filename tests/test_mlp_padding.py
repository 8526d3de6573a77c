"""--pad_mlp_widths true (vlm_recipes/mlp_padding.py): gated MLPs widened with zero units train exactly as the
checkpoint's widths do, keep the padding zero under AdamW, and save and load at the checkpoint's widths.

The tiny Qwen2.5-VL's MLPs are 64 (vision) and 128 (text) wide, multiples of 64; padding to multiples of 48 widens
both (to 96 and 144), so the real model classes, their state dicts and save_pretrained are what is tested."""

import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from tests.conftest import REPO, RESUME_RTOL, launch_recipe, logged_losses
from tests.test_packing import loss_and_gradients, records
from vlm_recipes.collator import ConversationCollator
from vlm_recipes.config import ConfigError
from vlm_recipes.data import ConversationDataset
from vlm_recipes.mlp_padding import check_mlp_padding, mlp_padding_applies, pad_gated_mlps

SINGLE_GPU = REPO / "accelerate_configs" / "single_gpu.yaml"


def test_a_padded_model_trains_saves_and_loads_as_the_checkpoints_widths_do(tiny_model, demo_data, tmp_path):
    folder = tiny_model("qwen2.5-vl")
    processor = AutoProcessor.from_pretrained(folder)
    image = sorted(demo_data.glob("**/*.png"))[0]
    dataset = ConversationDataset(records(image), processor, max_length=None)
    batch = ConversationCollator(processor, guard_text_only_batches=False)([dataset[k] for k in range(4)])

    def load():
        return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()

    plain, padded = load(), load()
    said = pad_gated_mlps(padded, multiple=48)
    assert "2 MLPs widened from 64 to 96" in said and "2 MLPs widened from 128 to 144" in said, said
    mlp = padded.model.visual.blocks[0].mlp
    assert mlp.gate_proj.weight.shape == (96, 32) and mlp.down_proj.weight.shape == (32, 96)
    assert padded.state_dict().keys() == plain.state_dict().keys()
    for name, tensor in padded.state_dict().items():  # the checkpoint's widths
        assert tensor.shape == plain.state_dict()[name].shape, name

    # the same loss and gradients; the padding's gradients zero
    plain_loss, plain_grads = loss_and_gradients(plain, batch)
    padded_loss, padded_grads = loss_and_gradients(padded, batch)
    assert padded_loss == pytest.approx(plain_loss, rel=1e-6)
    assert (
        mlp.gate_proj.weight.grad[64:].abs().max() == 0 and mlp.down_proj.weight.grad[:, 64:].abs().max() == 0
    )
    for name, grad in plain_grads.items():
        cut = padded_grads[name][tuple(slice(0, size) for size in grad.shape)]
        torch.testing.assert_close(cut, grad, rtol=1e-5, atol=1e-7, msg=name)

    # AdamW with weight decay: the padding stays exactly zero and the weights follow the unpadded model's
    for model in (plain, padded):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(3):
            loss_and_gradients(model, batch)
            optimizer.step()
    assert mlp.gate_proj.weight[64:].abs().max() == 0 and mlp.gate_proj.bias[64:].abs().max() == 0
    assert mlp.up_proj.weight[64:].abs().max() == 0 and mlp.down_proj.weight[:, 64:].abs().max() == 0
    trained = plain.state_dict()
    for name, tensor in padded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=1e-4, atol=1e-6, msg=name)

    # saved at the checkpoint's widths: loads as an ordinary model and answers the same
    padded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    assert reloaded.model.visual.blocks[0].mlp.gate_proj.weight.shape == (64, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, plain(**batch).logits, rtol=1e-4, atol=1e-5)

    # resuming: a checkpoint-width state dict loads into the padded model, padded again with zeros
    fresh = load()
    pad_gated_mlps(fresh, multiple=48)
    fresh.load_state_dict(trained)
    fresh_mlp = fresh.model.visual.blocks[0].mlp
    assert fresh_mlp.gate_proj.weight.shape == (96, 32) and fresh_mlp.gate_proj.weight[64:].abs().max() == 0
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, plain(**batch).logits, rtol=1e-4, atol=1e-5)


def test_padding_is_refused_before_loading_where_the_weights_are_not_whole_and_auto_steps_aside(tmp_path):
    from types import SimpleNamespace

    ds_json = tmp_path / "zero3.json"
    ds_json.write_text("{}")
    under_deepspeed = SimpleNamespace(deepspeed=str(ds_json))
    without = SimpleNamespace(deepspeed=None)
    full = SimpleNamespace(pad_mlp_widths="true", use_lora=False, load_in_4bit=False)
    lora = SimpleNamespace(pad_mlp_widths="true", use_lora=True, load_in_4bit=False)

    with pytest.raises(ConfigError) as refused:
        check_mlp_padding(lora, under_deepspeed)
    said = str(refused.value)  # both problems, in one message
    assert (
        "DeepSpeed holds the weights" in said and "--deepspeed none" in said and "--use_lora false" in said
    ), said
    with pytest.raises(ConfigError, match="auto, true or false, not 'maybe'"):
        check_mlp_padding(SimpleNamespace(pad_mlp_widths="maybe", use_lora=False), without)

    check_mlp_padding(full, without)  # whole weights, full fine-tune: padded
    assert mlp_padding_applies(full, without)
    for model_args, training_args in ((full, under_deepspeed), (lora, without)):
        auto = SimpleNamespace(**{**vars(model_args), "pad_mlp_widths": "auto"})
        check_mlp_padding(auto, training_args)  # auto never fails: it leaves the widths as they are
        assert not mlp_padding_applies(auto, training_args)
        assert mlp_padding_applies(SimpleNamespace(**{**vars(auto), "use_lora": False}), without)
    off = SimpleNamespace(pad_mlp_widths="false", use_lora=False, load_in_4bit=False)
    check_mlp_padding(off, without)
    assert not mlp_padding_applies(off, without)


def test_a_recipe_run_pads_by_default_without_deepspeed_trains_as_unpadded_and_resumes(
    tiny_model, demo_data, tmp_path
):
    """The recipe end to end on one process without DeepSpeed (the single_gpu config, as `make train` picks it):
    `auto` pads, the run logs the losses of the same run unpadded, its checkpoints and final model are saved at the
    checkpoint's widths, and a run resumed from a padded checkpoint ends where the uninterrupted one did."""
    # Every tiny model's widths are multiples of 64, unlike the real 3,420: this one's vision MLP is 90 wide.
    base = tiny_model("qwen2.5-vl")
    config = AutoConfig.from_pretrained(base)
    config.vision_config.intermediate_size = 90
    torch.manual_seed(0)
    odd = tmp_path / "tiny-qwen2.5-vl-mlp-90"
    AutoModelForImageTextToText.from_config(config).save_pretrained(odd)
    AutoProcessor.from_pretrained(base).save_pretrained(odd)

    def run(output_dir, *extra):
        args = [
            "--config", "recipes/configs/qwen_vl_demo.yaml", "--model_name_or_path", odd,
            "--dataset_path", demo_data / "train.json", "--image_root", demo_data, "--output_dir", output_dir,
            "--overwrite_output_dir", "false", "--freeze_vision_tower", "false", "--max_steps", "4",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", *extra,
        ]  # fmt: skip
        result = launch_recipe("qwen_vl.py", args, num_processes=1, accelerate_config=SINGLE_GPU)
        return result.stdout + result.stderr

    padded_dir, plain_dir = tmp_path / "padded", tmp_path / "plain"
    log = run(padded_dir, "--save_strategy", "steps", "--save_steps", "2")  # --pad_mlp_widths auto
    assert "--pad_mlp_widths: 2 MLPs widened from 90 to 128 with zero units (saved at 90)" in log, log[-3000:]
    assert "widened" not in run(plain_dir, "--pad_mlp_widths", "false")
    padded_losses, plain_losses = logged_losses(padded_dir), logged_losses(plain_dir)
    assert sorted(padded_losses) == [1, 2, 3, 4]
    for step, loss in plain_losses.items():
        assert padded_losses[step] == pytest.approx(loss, rel=1e-5), (padded_losses, plain_losses)

    # saved at the checkpoint's widths: an ordinary model, with the weights the unpadded run trained
    plain = AutoModelForImageTextToText.from_pretrained(plain_dir, dtype=torch.float32).state_dict()
    for folder in (padded_dir, padded_dir / "checkpoint-2"):
        reloaded = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
        assert reloaded.config.vision_config.intermediate_size == 90
        assert reloaded.model.visual.blocks[0].mlp.gate_proj.weight.shape == (90, 32)
    final = AutoModelForImageTextToText.from_pretrained(padded_dir, dtype=torch.float32).state_dict()
    for name, tensor in plain.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    # resumed from the padded checkpoint-2 (the optimizer's moments at the padded widths): the same last steps
    interrupted = tmp_path / "interrupted"
    shutil.copytree(padded_dir, interrupted, ignore=shutil.ignore_patterns("run_stats", "checkpoint-4"))
    (interrupted / "model.safetensors").unlink()
    (interrupted / "trainer_state.json").unlink()
    log = run(interrupted, "--save_strategy", "steps", "--save_steps", "2")
    assert f"resuming from {interrupted / 'checkpoint-2'}" in log, log[-3000:]
    resumed = logged_losses(interrupted)
    for step in (3, 4):
        assert resumed[step] == pytest.approx(padded_losses[step], rel=RESUME_RTOL), (resumed, padded_losses)
