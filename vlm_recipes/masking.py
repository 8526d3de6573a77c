"""Turn one conversation into model inputs whose labels cover only the assistant's words.

The approach works with any chat template, with or without `{% generation %}` markers:

1. Render the conversation as text with the processor's own template.
2. Find each assistant turn's characters by rendering the conversation up to that turn with the generation
   prompt (where the answer starts) and up to the end of the turn (where it ends). The turn's end token
   (`</s>`, `<|im_end|>`, ...) is part of the span; whitespace the template writes after it is not.
3. Tokenize the plain text once to map characters to tokens, run the processor on the same text (it expands
   each image placeholder into the model's image tokens), and carry the mask across the expansion.

Image, video and padding tokens never carry labels. Truncation never cuts through an image span.
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# Per-token outputs of a processor: padded and truncated along the sequence. Everything else a processor
# returns (pixel values, image grids, image sizes) is per image and is concatenated by the collator.
PER_TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids", "token_type_ids")


class SampleError(ValueError):
    """A conversation that cannot be turned into a training sample; the message says why and what to do."""


@dataclass(frozen=True)
class CharSpan:
    start: int
    end: int


def render(processor, messages, add_generation_prompt=False) -> str:
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_char_spans(processor, messages, text: str) -> list[CharSpan]:
    """Character spans of `text` that hold the assistant turns, each with its end token."""
    special_tokens = sorted(processor.tokenizer.all_special_tokens, key=len, reverse=True)
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Processors cannot render an empty conversation, so a conversation opened by the assistant is
        # handled like the templates below.
        before = render(processor, messages[:index], add_generation_prompt=True) if index else None
        through = render(processor, messages[: index + 1])
        if (
            before is not None
            and text.startswith(before)
            and text.startswith(through)
            and len(through) > len(before)
        ):
            start, end = len(before), len(through.rstrip())
        else:
            # Templates that rewrite earlier turns (dropping reasoning, say) break the prefix property:
            # find the answer text itself, then take a special token written right after it.
            answer = "".join(part["text"] for part in message["content"] if part["type"] == "text")
            start = text.find(answer, cursor)
            if not answer or start < 0:
                raise SampleError(
                    f"the chat template does not render assistant turn {index} as a prefix of the whole "
                    "conversation, and its text was not found in the rendered conversation"
                )
            end = start + len(answer)
            gap = len(text[end:]) - len(text[end:].lstrip())  # templates may put a space before the end token
            for token in special_tokens:
                if text.startswith(token, end + gap):
                    end += gap + len(token)
                    break
        spans.append(CharSpan(start, end))
        cursor = end
    return spans


def token_mask_from_spans(offsets, spans: list[CharSpan]) -> list[bool]:
    """A token is an answer token when its characters overlap an assistant span."""
    return [any(start < span.end and end > span.start for span in spans) for start, end in offsets]


def media_token_ids(processor) -> set[int]:
    ids = {getattr(processor, name, None) for name in ("image_token_id", "video_token_id")}
    return {token_id for token_id in ids if token_id is not None}


def expand_mask(plain_ids, plain_mask, expanded_ids, media_ids: set[int]) -> list[bool]:
    """Carry a mask over the plain token ids to the processor's ids, where each image placeholder is
    repeated once per image feature. Placeholder runs are never labelled."""
    mask, i, j = [], 0, 0
    while j < len(expanded_ids):
        token = expanded_ids[j]
        if i >= len(plain_ids) or plain_ids[i] != token:
            raise SampleError(
                "the processor's tokens differ from the tokenizer's beyond image placeholder expansion "
                f"(position {j}); the processor must only repeat image/video tokens"
            )
        if token in media_ids:
            while i < len(plain_ids) and plain_ids[i] == token:
                i += 1
            while j < len(expanded_ids) and expanded_ids[j] == token:
                mask.append(False)
                j += 1
            continue
        mask.append(plain_mask[i])
        i += 1
        j += 1
    if i != len(plain_ids):
        raise SampleError("the processor dropped tokens the tokenizer produced; the texts do not line up")
    return mask


def add_special_tokens_for(processor, text: str) -> bool:
    # The processor's own rule at inference (`apply_chat_template(tokenize=True)`): add the tokenizer's
    # special tokens unless the template already wrote the BOS token. Training must tokenize the same way.
    bos = processor.tokenizer.bos_token
    return not (bos is not None and text.startswith(bos))


def tokenize_conversation(
    processor, messages, images, max_length: int | None = None, videos=None
) -> dict[str, torch.Tensor]:
    """Model inputs for one conversation: per-token tensors are 1-D, per-image tensors keep their shape."""
    text = render(processor, messages)
    spans = assistant_char_spans(processor, messages, text)
    add_special = add_special_tokens_for(processor, text)
    plain = processor.tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    plain_mask = token_mask_from_spans(plain["offset_mapping"], spans)
    media = {"images": images or None, **({"videos": videos} if videos else {})}
    encoded = processor(text=[text], **media, add_special_tokens=add_special, return_tensors="pt")

    sample = {key: value[0] if key in PER_TOKEN_KEYS else value for key, value in encoded.items()}
    input_ids = sample["input_ids"]
    media_ids = media_token_ids(processor)
    mask = expand_mask(plain["input_ids"], plain_mask, input_ids.tolist(), media_ids)
    sample["labels"] = torch.where(torch.tensor(mask), input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    if max_length is not None and len(input_ids) > max_length:
        last_media = max((k for k, t in enumerate(input_ids.tolist()) if t in media_ids), default=-1)
        if last_media >= max_length:
            raise SampleError(
                f"{len(input_ids)} tokens, and cutting at max_length={max_length} would cut through an image "
                f"span (its last image token is at position {last_media}); raise max_length, lower the image "
                "resolution, or shorten the conversation"
            )
        sample = {
            key: value[:max_length] if key in PER_TOKEN_KEYS else value for key, value in sample.items()
        }
    if not (sample["labels"] != IGNORE_INDEX).any():
        raise SampleError(
            "no assistant tokens are left to learn from"
            + (f" within max_length={max_length}" if max_length else "")
            + "; raise max_length or check that the conversation has an assistant turn"
        )
    return sample
