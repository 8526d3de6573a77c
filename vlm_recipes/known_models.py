"""The architectures of the recipes' default models, by their published dimensions, so that the memory planner
and the benchmark know them offline (no hub access): `known_config("Qwen/Qwen2.5-VL-3B-Instruct")`.

Only shapes live here, never weights. Each entry's dimensions are those of the model's published config.json;
the CheXagent-2 entry is the shape recipes/chexagent.py assembles (docs/chexagent.md): a SigLIP ViT-L/16 at
384x384 and Phi-2, as a LLaVA-architecture model.
"""

from dataclasses import dataclass

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    PhiConfig,
    PretrainedConfig,
    Qwen2_5_VLConfig,
    SiglipVisionConfig,
)


@dataclass(frozen=True)
class KnownModel:
    hub_id: str
    recipe: str  # the recipe that trains it: llava, qwen_vl or chexagent
    image_size: int  # the side of the square image the benchmark feeds (the model's native size for fixed-size towers)
    build_config: callable

    def config(self, **text_overrides) -> PretrainedConfig:
        return self.build_config(**text_overrides)


def llava_1_5_7b(**text_overrides) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
        pad_token_id=32001, **text_overrides,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=32000, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", tie_word_embeddings=False,
    )  # fmt: skip


def qwen2_5_vl(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
               vocab_size, tie_word_embeddings, **text_overrides) -> Qwen2_5_VLConfig:  # fmt: skip
    text = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=128000, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        tie_word_embeddings=tie_word_embeddings, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )  # fmt: skip
    text.update(text_overrides)
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=hidden_size,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2,
    )  # fmt: skip
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip


def qwen2_5_vl_3b(**text_overrides) -> Qwen2_5_VLConfig:
    return qwen2_5_vl(2048, 11008, 36, 16, 2, 151936, True, **text_overrides)


def qwen2_5_vl_7b(**text_overrides) -> Qwen2_5_VLConfig:
    return qwen2_5_vl(3584, 18944, 28, 28, 4, 152064, False, **text_overrides)


def chexagent_2_3b(**text_overrides) -> LlavaConfig:
    vision = SiglipVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=384, patch_size=16, vision_use_head=False,
    )  # fmt: skip
    text = PhiConfig(
        vocab_size=51202, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, partial_rotary_factor=0.4, layer_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=51201, **text_overrides,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=51200, vision_feature_layer=-1,
        vision_feature_select_strategy="full", projector_hidden_act="gelu", tie_word_embeddings=False,
    )  # fmt: skip


KNOWN_MODELS = {
    "llava-1.5-7b": KnownModel("llava-hf/llava-1.5-7b-hf", "llava", 336, llava_1_5_7b),
    "qwen2.5-vl-3b": KnownModel("Qwen/Qwen2.5-VL-3B-Instruct", "qwen_vl", 448, qwen2_5_vl_3b),
    "qwen2.5-vl-7b": KnownModel("Qwen/Qwen2.5-VL-7B-Instruct", "qwen_vl", 448, qwen2_5_vl_7b),
    "chexagent-2-3b": KnownModel("StanfordAIMI/CheXagent-2-3b", "chexagent", 384, chexagent_2_3b),
}


def find_known_model(name: str) -> tuple[str, KnownModel] | None:
    """A known model by its short name or hub id (case-insensitive), or None."""
    wanted = name.lower().rstrip("/")
    for short, known in KNOWN_MODELS.items():
        if wanted in (short, known.hub_id.lower(), known.hub_id.lower().split("/")[-1]):
            return short, known
    return None
