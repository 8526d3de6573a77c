r"""Check a dataset the way a recipe's preflight does, without training: every record is read, its images
decoded, and it is tokenized with the model's processor at --max_length.

    python scripts/validate_data.py --model_name_or_path llava-hf/llava-1.5-7b-hf \
        --dataset_path data/train.json --image_root data --max_length 2048

Reports every problem with the file, the record and the fix (malformed lines, unknown roles, no assistant
turn, missing or corrupt images, placeholder/image count mismatches, image spans cut by max_length, samples
left without assistant tokens, images the image processor refuses), then exits 1; exits 0 when every record
becomes a training sample. Either way it says how many images the model's image processor downscales (losing
detail), upscales, or crops or stretches out of shape, with the most extreme of each. Only the processor is loaded
(tokenizer, image processor, chat template), never the weights. For Qwen-VL, pass the run's --min_pixels and
--max_pixels so the images are measured against the same caps.
"""

import argparse
import sys

from transformers import AutoProcessor

from vlm_recipes.data import ConversationDataset, DataError, read_records
from vlm_recipes.preflight import preflight


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model_name_or_path", required=True, help="the checkpoint whose processor is used")
    parser.add_argument(
        "--dataset_path", required=True, help="LLaVA/chat/CheXinstruct JSON or JSONL, or datasets"
    )
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--dataset_split", default="train")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--allow_images_outside_root", action="store_true")
    parser.add_argument(
        "--per_device_train_batch_size", type=int, default=1,
        help="the run's samples per micro-batch: what must agree within one (videos' frame counts) is checked",
    )  # fmt: skip
    parser.add_argument(
        "--num_workers", type=int, default=0, help="processes decoding and tokenizing in parallel"
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="run code shipped with the checkpoint"
    )
    parser.add_argument("--min_pixels", type=int, default=None, help="Qwen-VL: the run's min_pixels")
    parser.add_argument("--max_pixels", type=int, default=None, help="Qwen-VL: the run's max_pixels")
    args = parser.parse_args()
    if (args.min_pixels is None) != (args.max_pixels is None):
        parser.error("give both --min_pixels and --max_pixels (the run's values, as in its YAML), or neither")
    try:
        # Records that cannot be read are listed with the preflight's problems: one run shows every problem.
        records, unread = read_records(
            args.dataset_path, args.image_root, args.dataset_split, args.allow_images_outside_root
        )
        # Qwen's image processors take the pixel caps as their size, and Qwen2/2.5-VL checkpoints' top-level
        # min_pixels / max_pixels override `size`: give both, as recipes/qwen_vl.py does.
        caps = (
            {
                "size": {"shortest_edge": args.min_pixels, "longest_edge": args.max_pixels},
                "min_pixels": args.min_pixels,
                "max_pixels": args.max_pixels,
            }
            if args.max_pixels
            else {}
        )
        processor = AutoProcessor.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code, **caps
        )
        preflight(ConversationDataset(records, processor, args.max_length), args.dataset_path,
                  num_workers=args.num_workers, unread=unread,
                  batch_size=args.per_device_train_batch_size)  # fmt: skip
    except DataError as error:
        print(error, file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
