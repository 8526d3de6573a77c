"""Build a tiny, randomly initialised vision-language model with a locally built processor.

    python scripts/make_tiny_model.py --family llava --output_dir runs/tiny-llava

The model comes from the family's real transformers config classes, the tokenizer is a byte-level BPE
trained here on a small embedded corpus, and the image processor and chat template are the family's own
kinds. Everything is saved with `save_pretrained`, so recipes and tests load it through the same
`from_pretrained` path a user's checkpoint takes. Nothing is downloaded.
"""

import argparse
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
    PreTrainedTokenizerFast,
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


def build_tokenizer() -> PreTrainedTokenizerFast:
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


BUILDERS = {"llava": build_llava}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(BUILDERS), default="llava")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    BUILDERS[args.family](args.output_dir, args.seed)
    print(f"tiny {args.family} model and processor saved to {args.output_dir}")


if __name__ == "__main__":
    main()
