"""Build a tiny, randomly initialised vision-language model, around a processor built here or a real one.

    python scripts/make_tiny_model.py --family llava --output_dir runs/tiny-llava
    python scripts/make_tiny_model.py --processor_from ../shared/real-checkpoints/llava-1.5-7b-hf \
        --output_dir runs/tiny-real-llava

With --family, the model comes from the family's real transformers config classes, the tokenizer is a
byte-level BPE trained here on a small embedded corpus, and the image processor and chat template are the
family's own kinds. For llava, llava-next, llava-onevision, the Qwen families and chexagent the template is written
to differ from the real checkpoints' on purpose (our own special tokens, an end token after every answer); for
gemma3, idefics3, internvl and mistral3 (recipes/image_text_to_text.py's) it is the real checkpoint's own, read from
../shared/real-checkpoints (or VLM_REAL_CHECKPOINTS), since their templates are what decides the labels.

With --processor_from, the folder's own processor files (tokenizer, chat template, image and video processor
configs: what a user's checkpoint ships) are saved unchanged next to a tiny random model made from the folder's
config.json, shrunk in width and depth only: the vocabulary size, the special-token ids, the patch and merge
sizes and the image size stay the real ones, so the image-token counts and the labels are those of the real
checkpoint. Works for llava, qwen2_vl, qwen2_5_vl and qwen3_vl configs.

Everything is saved with `save_pretrained`, so recipes and tests load it through the same `from_pretrained` path
a user's checkpoint takes. Nothing is downloaded.
"""

import argparse
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

# A vicuna-style template like LLaVA-1.5's, with the end-of-sequence token after every assistant turn so
# a fine-tuned model learns to stop. Content may be a string or a list of typed parts.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "USER: {% for p in parts -%}"
    "{%- if p['type'] == 'image' -%}<image>{{ '\\n' }}{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '\\n' }}"
    "{%- else -%}"
    "ASSISTANT: {% for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# Words the demo data and the tests use, plus common English, so the BPE has whole-word merges for them.
CORPUS = """
USER: ASSISTANT: What color is the shape? Which side of the picture is the shape on?
Answer with one word. red green blue yellow left right top bottom circle square triangle
yes no Is there an opacity in the lung? Describe the finding. There is a small opacity.
The lungs are clear. No acute findings. cardiomegaly effusion pneumothorax normal abnormal
You are a helpful assistant. Describe the image. What is in the picture? How many objects are there?
one two three four five the a an of in on at is are was were and or with without this that
Hello, how are you? I am fine, thank you. Please look at the image and answer the question.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

QWEN_TOKEN_NAMES = {
    "pad_token_id": "<|endoftext|>",
    "eos_token_id": "<|im_end|>",
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]  # fmt: skip

# Qwen2-VL's own chat template (ChatML, a default system turn, one vision span per image or video).
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(family: str = "llava") -> PreTrainedTokenizerFast:
    if family != "llava":
        return build_qwen_tokenizer()
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([line for line in CORPUS.splitlines() if line.strip()] * 20, trainer=trainer)
    # Like LLaMA's tokenizer: a plain tokenizer call prepends <s>; chat templates here do not write it.
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
    )


def train_bpe(special_tokens: list[str]) -> Tokenizer:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([line for line in CORPUS.splitlines() if line.strip()] * 20, trainer=trainer)
    return bpe


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    # Qwen's layout: no BOS, <|im_end|> ends a turn (and generation), <|endoftext|> pads.
    bpe = train_bpe(QWEN_SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        padding_side="right",
    )


def build_qwen(output_dir: Path, seed: int, family: str) -> None:
    """Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 56x56 images become 4x4 patches, merged 2x2 into 4 tokens."""
    tokenizer = build_qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in QWEN_TOKEN_NAMES.items()}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        bos_token_id=None,
    )
    # head_dim 16: the multimodal rotary sections (time, height, width) must add up to head_dim / 2.
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    patch_size = 16 if family.startswith("qwen3-vl") else 14
    if family == "qwen2-vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=patch_size)
        config = Qwen2VLConfig(
            text_config={**text, "rope_parameters": rope}, vision_config=vision, **MEDIA_IDS(ids)
        )
        model_class, processor_class, video_class = (
            Qwen2VLForConditionalGeneration,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )
    elif family == "qwen2.5-vl":
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=patch_size,
            window_size=56, fullatt_block_indexes=[1],
        )  # fmt: skip
        config = Qwen2_5_VLConfig(
            text_config={**text, "rope_parameters": rope}, vision_config=vision, **MEDIA_IDS(ids)
        )
        model_class, processor_class = Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        video_class = Qwen2VLVideoProcessor
    else:
        vision = dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=patch_size,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        )  # fmt: skip
        rope3 = {**rope, "mrope_interleaved": True}
        text3 = {**text, "head_dim": 16, "rope_parameters": rope3}
        if family == "qwen3-vl-moe":
            # 64 experts, two per token: on a micro-batch of about 250 tokens some experts get none, so the ranks
            # of a ZeRO-3 run route differently (Qwen3-VL-30B-A3B: 128 experts, 8 per token).
            from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

            text3.update(
                num_experts=64, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1
            )
            config = Qwen3VLMoeConfig(text_config=text3, vision_config=vision, **MEDIA_IDS(ids))
            model_class = Qwen3VLMoeForConditionalGeneration
        else:
            config = Qwen3VLConfig(text_config=text3, vision_config=vision, **MEDIA_IDS(ids))
            model_class = Qwen3VLForConditionalGeneration
        processor_class, video_class = Qwen3VLProcessor, Qwen3VLVideoProcessor
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = ids["pad_token_id"]
    model.generation_config.eos_token_id = ids["eos_token_id"]
    pixels = dict(min_pixels=(2 * patch_size) ** 2, max_pixels=(4 * patch_size) ** 2)
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch_size, merge_size=2, temporal_patch_size=2, **pixels
    )
    video_processor = video_class(patch_size=patch_size, merge_size=2, temporal_patch_size=2, **pixels)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def MEDIA_IDS(ids: dict) -> dict:  # noqa: N802 - reads like the constant it builds
    return {
        key: ids[key]
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }


def build_llava(output_dir: Path, seed: int) -> None:
    tokenizer = build_tokenizer()
    image_size, patch_size = 32, 8
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token; "default" drops it again
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


# A ChatML template of our own for the tiny OneVision: llava-onevision's real one writes "assistant \n" and puts
# {% generation %} markers around the answer but not around <|im_end|>; this one does neither, on purpose.
ONEVISION_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- for p in parts -%}"
    "{%- if p['type'] == 'image' -%}<image>\n{%- elif p['type'] == 'video' -%}<video>\n"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
# Any-resolution tiling at the tiny tile size (32 pixels): an image is resized to the best of these grids, cut into
# 32x32 tiles, and each tile plus a 32x32 overview becomes image tokens; so images of other shapes get other counts.
TINY_GRID_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def build_llava_next(output_dir: Path, seed: int) -> None:
    """Tiny LLaVA-NeXT (1.6): CLIP tiles of 32x32 pixels (16 patches + class token each), a Mistral language model,
    image_newline after each row of the unpadded tile grid; our vicuna-style template and BPE."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    tokenizer = build_tokenizer()
    image_size, patch_size = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size, projection_dim=32,
    )  # fmt: skip
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", image_grid_pinpoints=TINY_GRID_PINPOINTS,
        image_seq_length=(image_size // patch_size) ** 2,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=TINY_GRID_PINPOINTS,
    )  # fmt: skip
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )  # fmt: skip
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def build_llava_onevision(output_dir: Path, seed: int) -> None:
    """Tiny LLaVA-OneVision: SigLIP tiles of 32x32 pixels (16 patches, no class token), a Qwen2 language model,
    any-resolution images (at most 9 tiles' worth of features) and videos (frames pooled 2x2); our ChatML."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
    )

    bpe = train_bpe([*QWEN_SPECIAL_TOKENS, "<image>", "<video>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"}, padding_side="right",
    )  # fmt: skip
    image_size, patch_size = 32, 8
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=patch_size,
    )  # fmt: skip
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", image_grid_pinpoints=TINY_GRID_PINPOINTS,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    size = {"height": image_size, "width": image_size}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=TINY_GRID_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2, vision_feature_select_strategy="full",
        chat_template=ONEVISION_CHAT_TEMPLATE,
    )  # fmt: skip
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


# CheXagent-2's prompt shape as recipes/chexagent.py writes it (keep the two identical; the CheXagent test checks
# they are): plain USER:/ASSISTANT: turns, each image introduced as "Picture N:", the LM's own end-of-text token
# after every answer.
CHEXAGENT_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "USER: {% for p in parts -%}"
    "{%- if p['type'] == 'image' -%}{%- set image_count.value = image_count.value + 1 -%}"
    "Picture {{ image_count.value }}: <image>{{ '\\n' }}"
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{{ '\\n' }}"
    "{%- else -%}"
    "ASSISTANT: {% for p in parts if p['type'] == 'text' -%}{{ p['text'] }}{%- endfor -%}{{ eos_token }}{{ '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)


def build_chexagent_parts(output_dir: Path, seed: int) -> tuple[Path, Path]:
    """The two checkpoints CheXagent-2 is assembled from, tiny: a full SigLIP (like the CXR-adapted XraySigLIP
    encoders) with its image processor, and a Phi causal LM (like RadPhi-2) with a Phi-2-like tokenizer: one
    <|endoftext|> token for BOS, EOS and unknown, no padding token, no image token, a biased output layer."""
    vision_dir, text_dir = output_dir / "vision_encoder", output_dir / "language_model"
    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8)  # fmt: skip
    siglip_text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    SiglipModel(SiglipConfig(text_config=siglip_text, vision_config=vision)).save_pretrained(vision_dir)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(vision_dir)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(["<|endoftext|>"]),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        partial_rotary_factor=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    language_model = PhiForCausalLM(config)
    # Phi's output layer has a bias, which the LLaVA architecture has no place for: make it non-zero, so that
    # dropping it is visible.
    with torch.no_grad():
        language_model.lm_head.bias.normal_(std=0.02)
    language_model.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    return vision_dir, text_dir


def build_chexagent(output_dir: Path, seed: int) -> None:
    """Tiny CheXagent-2 shape: SigLIP vision encoder + MLP projector + Phi LM as a LLaVA-architecture model.

    Writes the two parts (output_dir/vision_encoder, output_dir/language_model, for recipes/chexagent.py's
    stage 1, which assembles them) and, in output_dir, the model that assembly makes from them before
    training: the same encoder and LM weights, "<image>" and "<pad>" appended to the vocabulary (their embedding
    and output rows set to the mean of the others), the LM's output bias dropped, a fresh projector."""
    vision_dir, text_dir = build_chexagent_parts(output_dir, seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(text_dir)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<image>"]}, replace_extra_special_tokens=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vision_config = SiglipVisionConfig.from_pretrained(vision_dir)
    # LLaVA reads hidden states: no pooling head. Set on the config (a keyword would reach 5.17's model instead).
    vision_config.vision_use_head = False
    vision = SiglipVisionModel.from_pretrained(vision_dir, config=vision_config)
    language_model = PhiForCausalLM.from_pretrained(text_dir)
    config = LlavaConfig(
        vision_config=vision.config,
        text_config={
            **language_model.config.to_dict(),
            "vocab_size": len(tokenizer),
            "pad_token_id": tokenizer.pad_token_id,
        },
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed + 1)
    model = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{name}": tensor for name, tensor in vision.state_dict().items()}
    for name, tensor in language_model.state_dict().items():
        if name == "lm_head.bias":
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(2, -1)])  # <image>, <pad>
        state[name.replace("model.", "model.language_model.", 1)] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("multi_modal_projector" in name for name in missing), (missing, unexpected)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor.from_pretrained(vision_dir),
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy="full",
        image_token="<image>",
        num_additional_image_tokens=0,  # SigLIP has no class token: one image token per patch
        chat_template=CHEXAGENT_CHAT_TEMPLATE,
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


# Width and depth of the tiny models built around real processor files (--processor_from); every key that a
# config does not have is skipped. head_dim 16 = hidden 64 / 4 heads; Qwen's rotary sections (time, height,
# width) must then add up to head_dim / 2 = 8.
TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_window_layers=2)  # fmt: skip
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, depth=2, num_attention_heads=2,
                   num_heads=2, embed_dim=32, mlp_ratio=2, projection_dim=32, out_hidden_size=64,
                   fullatt_block_indexes=[1], deepstack_visual_indexes=[0])  # fmt: skip
TINY_MROPE_SECTION = [2, 3, 3]


def shrunk(config_dict: dict, sizes: dict) -> dict:
    return {**config_dict, **{key: value for key, value in sizes.items() if key in config_dict}}


def tiny_config_from(real_dir: Path):
    """The real config of `real_dir`, as narrow and shallow as the tiny models, everything else unchanged."""
    from transformers import AutoConfig

    real = AutoConfig.from_pretrained(real_dir)
    config = real.to_dict()
    # layer_types lists one entry per real layer; dropped, it is rebuilt for the tiny depth.
    text = {k: v for k, v in shrunk(config["text_config"], TINY_TEXT).items() if k != "layer_types"}
    for rope_key in ("rope_parameters", "rope_scaling"):
        if isinstance(text.get(rope_key), dict) and "mrope_section" in text[rope_key]:
            text[rope_key] = {**text[rope_key], "mrope_section": TINY_MROPE_SECTION}
    vision = shrunk(config["vision_config"], TINY_VISION)
    if real.model_type == "qwen2_vl":  # Qwen2-VL's vision hidden_size is its merger's output: the text width
        vision["hidden_size"] = text["hidden_size"]
    if "out_hidden_size" in vision:
        vision["out_hidden_size"] = text["hidden_size"]
    return type(real).from_dict({**config, "text_config": text, "vision_config": vision})


def build_around_real_processor(real_dir: Path, output_dir: Path, seed: int) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(real_dir)
    config = tiny_config_from(real_dir)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)  # real ones say 16 bits
    tokenizer = processor.tokenizer
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


# The tiny models of recipes/image_text_to_text.py's architectures carry their real checkpoint's chat template (the
# part that decides the labels), from ../shared/real-checkpoints beside the repository (or VLM_REAL_CHECKPOINTS), on
# our BPE and tiny widths; each processor's own way of wrapping an image in tokens is kept.
REAL_CHECKPOINTS = Path(
    os.environ.get("VLM_REAL_CHECKPOINTS")
    or Path(__file__).resolve().parents[2] / "shared" / "real-checkpoints"
)


def real_chat_template(name: str) -> str:
    path = REAL_CHECKPOINTS / name / "chat_template.jinja"
    if not path.is_file():
        raise SystemExit(
            f"this family's tiny model uses the real chat template of {name}, and {path} is missing: put "
            "../shared/real-checkpoints beside the repository or point VLM_REAL_CHECKPOINTS at a copy"
        )
    return path.read_text()


def tokenizer_with(special: list[str], bos: str | None = None, **named) -> PreTrainedTokenizerFast:
    """Our BPE with the checkpoint's special tokens; a plain call prepends `bos` where the real tokenizer does."""
    bpe = train_bpe(special)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, bpe.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **({"bos_token": bos} if bos else {}), **named)


def tiny_text(tokenizer, **extra) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, **extra,
    )  # fmt: skip


TINY_VISION_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def save_tiny(model_class, config, processor, output_dir: Path, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_class(config)
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def build_gemma3(output_dir: Path, seed: int) -> None:
    """Tiny Gemma 3: SigLIP 32x32 (16 patches, pooled to 4 soft tokens), each image written <start_of_image> and
    expanded by the processor to "\\n\\n<start_of_image>" + 4 soft tokens + "<end_of_image>\\n\\n"; turns end
    <end_of_turn>, which is an eos of the model's generation config but not the tokenizer's eos."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    images = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = tokenizer_with(
        ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", *images.values()], bos="<bos>",
        eos_token="<eos>", pad_token="<pad>", extra_special_tokens=images,
    )  # fmt: skip
    ids = {f"{key}_index": tokenizer.convert_tokens_to_ids(token) for key, token in images.items()}
    ids = {"boi_token_index": ids["boi_token_index"], "eoi_token_index": ids["eoi_token_index"],
           "image_token_index": ids["image_token_index"]}  # fmt: skip
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    text = tiny_text(tokenizer, sliding_window=64)
    text["eos_token_id"] = [tokenizer.eos_token_id, end_of_turn]
    vision = SiglipVisionConfig(**TINY_VISION_TOWER, image_size=32, patch_size=8)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, **ids)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        chat_template=real_chat_template("gemma-3-4b-it"), image_seq_length=4,
    )  # fmt: skip
    save_tiny(Gemma3ForConditionalGeneration, config, processor, output_dir, seed)


def build_internvl(output_dir: Path, seed: int) -> None:
    """Tiny HF-native InternVL (InternVL3-hf layout): 32x32 crops (up to 4 and a thumbnail) of 16 patches, pixel
    shuffled to 4 tokens each, written <img> + <IMG_CONTEXT> x 4 per crop + </img>; a Qwen2 language model."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
        InternVLVisionConfig,
        Qwen2Config,
    )

    images = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
              "video_token": "<video>"}  # fmt: skip
    tokenizer = tokenizer_with(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *images.values()], eos_token="<|im_end|>",
        pad_token="<|endoftext|>", extra_special_tokens=images,
    )  # fmt: skip
    vision = InternVLVisionConfig(**TINY_VISION_TOWER, image_size=[32, 32], patch_size=[8, 8])
    config = InternVLConfig(
        vision_config=vision, text_config=Qwen2Config(**tiny_text(tokenizer)), downsample_ratio=0.5,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
    )  # fmt: skip
    size = {"height": 32, "width": 32}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=size, crop_to_patches=True, min_patches=1, max_patches=4),
        video_processor=InternVLVideoProcessor(size=size), tokenizer=tokenizer, image_seq_length=4,
        chat_template=real_chat_template("internvl3-1b-hf"),
    )  # fmt: skip
    save_tiny(InternVLForConditionalGeneration, config, processor, output_dir, seed)


def build_idefics3(output_dir: Path, seed: int) -> None:
    """Tiny Idefics3 (SmolVLM's architecture; other module names: vision_model, connector, text_model): images up to
    64 pixels split into 32x32 tiles plus a global view, each <fake_token_around_image><row_r_col_c> + 4 <image>
    tokens (pixel shuffle 2); SmolVLM2's template, whose answers start with a space and end <end_of_utterance>."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tiles = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]
    tokenizer = tokenizer_with(
        ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
         "<global-img>", *tiles],
        bos="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
    )  # fmt: skip
    vision = Idefics3VisionConfig(**TINY_VISION_TOWER, image_size=32, patch_size=8)
    config = Idefics3Config(
        vision_config=vision, text_config=LlamaConfig(**tiny_text(tokenizer)), scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
        chat_template=real_chat_template("smolvlm2-256m-video-instruct"),
    )  # fmt: skip
    save_tiny(Idefics3ForConditionalGeneration, config, processor, output_dir, seed)


def build_mistral3(output_dir: Path, seed: int) -> None:
    """Tiny Mistral 3 (Mistral-Small-3.1 layout): a Pixtral tower taking each image at its own size up to 64 pixels
    (8-pixel patches merged 2x2), rows of [IMG] tokens ended by [IMG_BREAK] and the image by [IMG_END]; the real
    template, which writes a default system prompt with today's date when none is given."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralImageProcessor,
        PixtralProcessor,
        PixtralVisionConfig,
    )

    tokenizer = tokenizer_with(
        ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
         "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        bos="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    vision = PixtralVisionConfig(**TINY_VISION_TOWER, head_dim=16, image_size=64, patch_size=8)
    config = Mistral3Config(
        vision_config=vision, text_config=MistralConfig(**tiny_text(tokenizer), sliding_window=None),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
    )  # fmt: skip
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=8, spatial_merge_size=2,
        chat_template=real_chat_template("mistral-small-3.1-24b-instruct-2503"),
    )  # fmt: skip
    save_tiny(Mistral3ForConditionalGeneration, config, processor, output_dir, seed)


BUILDERS = {
    "llava": build_llava,
    "qwen2-vl": lambda output_dir, seed: build_qwen(output_dir, seed, "qwen2-vl"),
    "qwen2.5-vl": lambda output_dir, seed: build_qwen(output_dir, seed, "qwen2.5-vl"),
    "qwen3-vl": lambda output_dir, seed: build_qwen(output_dir, seed, "qwen3-vl"),
    "qwen3-vl-moe": lambda output_dir, seed: build_qwen(output_dir, seed, "qwen3-vl-moe"),
    "chexagent": build_chexagent,
    "llava-next": build_llava_next,
    "llava-onevision": build_llava_onevision,
    "gemma3": build_gemma3,
    "internvl": build_internvl,
    "idefics3": build_idefics3,
    "mistral3": build_mistral3,
}
# `make demo MODEL=...` names the family by its recipe: the default Qwen is 2.5, image-text-to-text's is Gemma 3.
BUILDERS["qwen-vl"] = BUILDERS["qwen2.5-vl"]
BUILDERS["image-text-to-text"] = BUILDERS["gemma3"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family", choices=sorted(BUILDERS), default="llava",
        help="qwen-vl is qwen2.5-vl, image-text-to-text is gemma3 (the names make demo MODEL=... gives)",
    )  # fmt: skip
    parser.add_argument(
        "--processor_from",
        type=Path,
        help="a checkpoint folder without weights (config.json + processor files): the tiny model keeps its "
        "processor and its config's vocabulary, token ids and patch sizes (--family is then ignored)",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.processor_from:
        build_around_real_processor(args.processor_from, args.output_dir, args.seed)
        print(f"tiny model around the processor of {args.processor_from} saved to {args.output_dir}")
        return
    BUILDERS[args.family](args.output_dir, args.seed)
    print(f"tiny {args.family} model and processor saved to {args.output_dir}")


if __name__ == "__main__":
    main()
