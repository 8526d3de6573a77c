"""Make a small, learnable visual question set in the LLaVA conversation format, with PNG images.

    python scripts/make_demo_data.py --output_dir runs/demo/data

Each image is a coloured shape on a grey background, in the left or right half. Each question asks for the
shape's colour or its side, answered in one word, so exact-match accuracy measures whether a model reads the
image: a model that ignores it scores at most about 1/4 on colour and 1/2 on side. Writes train.json,
test.json and images/ under output_dir.
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 60, 220), "yellow": (235, 210, 20)}
SIDES = ("left", "right")
SHAPES = ("circle", "square")
QUESTIONS = {
    "color": "What color is the shape? Answer with one word.",
    "side": "Which side of the picture is the shape on? Answer with one word.",
}


def draw_image(color: str, side: str, shape: str, rng: random.Random, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (128, 128, 128))
    radius = rng.randint(size // 6, size // 4)
    half = size // 2
    cx = rng.randint(radius, half - radius) + (half if side == "right" else 0)
    cy = rng.randint(radius, size - radius - 1)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


def make_split(name: str, count: int, output_dir: Path, rng: random.Random, size: int) -> list[dict]:
    records = []
    for index in range(count):
        color, side, shape = rng.choice(list(COLORS)), rng.choice(SIDES), rng.choice(SHAPES)
        image_name = f"images/{name}_{index:04d}.png"
        draw_image(color, side, shape, rng, size).save(output_dir / image_name)
        kind = rng.choice(list(QUESTIONS))
        records.append(
            {
                "id": f"{name}-{index:04d}",
                "image": image_name,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{QUESTIONS[kind]}"},
                    {"from": "gpt", "value": color if kind == "color" else side},
                ],
            }
        )
    (output_dir / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--num_train", type=int, default=800)
    parser.add_argument("--num_test", type=int, default=100)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    (args.output_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    make_split("train", args.num_train, args.output_dir, rng, args.image_size)
    make_split("test", args.num_test, args.output_dir, rng, args.image_size)
    print(f"demo data: {args.num_train} train and {args.num_test} test questions in {args.output_dir}")


if __name__ == "__main__":
    main()
