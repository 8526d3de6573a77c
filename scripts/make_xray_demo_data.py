"""Make synthetic chest-X-ray-like studies with CheXinstruct-style records, for the CheXagent demo and tests.

    python scripts/make_xray_demo_data.py --output_dir runs/demo/xray-data

Each study is a grayscale frontal (PA) image of a drawn chest: body, two dark lung fields, ribs, a bright
mediastinum, noise. Half the studies have an opacity (a bright, soft blob) in one lung; by radiological convention
the patient's left lung is on the right of the image. Some studies add a lateral view. Questions are yes/no ("Is
there an opacity in the lung?"), which lung ("left" / "right"), or a short finding ("Describe the finding." ->
"There is a small opacity in the left lung." / "The lungs are clear."), so exact-match accuracy measures whether
a model reads the image: answering without looking at it tops out near 1/2.

The records use every CheXinstruct shape: one image or a list of views, "qa_pair" as one {q, a} or a list of
them (two turns), and "text" / "target_text". Half the images are 16-bit PNGs (as exported from DICOM), half
8-bit. Writes train.jsonl, test.jsonl (held-out studies) and images/ under output_dir. Nothing here is clinical.
"""

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

YES_NO = "Is there an opacity in the lung?"
FINDING = "Describe the finding."
SIDE = "Which lung has the opacity? Answer left or right."
CLEAR = "The lungs are clear."
# The opacity's peak brightness and its size (Gaussian sigma in pixels of a 64-pixel image). The models see 32-pixel
# images in 8-pixel patches; at 0.35-0.5 and sigma 3.5-5 the blob changed one or two of the 16 image tokens, and the
# test's 80-step fine-tune learnt only the answers' prior (0.60 exact match with the images and with blank ones,
# issue 21). Spread over several patches, it is read.
OPACITY_BRIGHTNESS, OPACITY_SIGMA = (0.6, 0.8), (8, 10)


def finding(side: str | None) -> str:
    return f"There is a small opacity in the {side} lung." if side else CLEAR


def blob(shape, cx, cy, sigma) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def ellipse(shape, cx, cy, rx, ry) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return (((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1).astype(float)


def frontal_view(size: int, side: str | None, rng: random.Random) -> np.ndarray:
    """A PA chest: intensities in [0, 1], bright = dense. `side` is the patient's side of the opacity."""
    shape, s = (size, size), size / 64
    jitter = lambda spread: rng.uniform(-spread, spread) * s  # noqa: E731 - reads as a unit of image size
    image = 0.08 + 0.42 * ellipse(shape, size / 2 + jitter(2), size * 0.55, 27 * s, 30 * s)  # body
    lungs = []
    for sign in (-1, 1):  # image left (patient's right), then image right (patient's left)
        cx, cy = size / 2 + sign * (12 * s + jitter(1.5)), size * 0.5 + jitter(2)
        lung = ellipse(shape, cx, cy, 8.5 * s + jitter(1), 17 * s + jitter(2))
        image -= 0.28 * lung
        lungs.append((cx, cy))
    y = np.mgrid[:size, :size][0]
    image += 0.05 * (np.sin(y / (3.2 * s) + rng.uniform(0, 6.3)) > 0.6)  # ribs
    image += 0.30 * blob(shape, size / 2 + jitter(1), size * 0.62, 6 * s)  # mediastinum and heart
    if side is not None:
        cx, cy = lungs[1 if side == "left" else 0]
        brightness = rng.uniform(*OPACITY_BRIGHTNESS)
        image += brightness * blob(shape, cx + jitter(3), cy + jitter(7), rng.uniform(*OPACITY_SIGMA) * s)
    return image


def lateral_view(size: int, has_opacity: bool, rng: random.Random) -> np.ndarray:
    """A lateral chest: one lung field, the heart in front; an opacity shows here without its side."""
    shape, s = (size, size), size / 64
    image = 0.08 + 0.42 * ellipse(shape, size / 2, size * 0.55, 22 * s, 30 * s)
    image -= 0.25 * ellipse(shape, size * 0.5, size * 0.48, 14 * s, 18 * s)
    image += 0.3 * blob(shape, size * 0.38, size * 0.62, 7 * s)  # heart, anterior
    image += 0.2 * ellipse(shape, size * 0.74, size * 0.55, 3 * s, 26 * s)  # spine, posterior
    if has_opacity:
        cx, cy = size * 0.5 + rng.uniform(-6, 6) * s, size * 0.48 + rng.uniform(-9, 9) * s
        image += rng.uniform(*OPACITY_BRIGHTNESS) * blob(shape, cx, cy, rng.uniform(*OPACITY_SIGMA) * s)
    return image


def save_view(pixels: np.ndarray, path: Path, rng: random.Random, sixteen_bit: bool) -> None:
    noisy = np.clip(pixels + np.random.default_rng(rng.randrange(2**32)).normal(0, 0.02, pixels.shape), 0, 1)
    if (
        sixteen_bit
    ):  # 12 bits of a 16-bit PNG, as detectors export: a plain 8-bit conversion would clip it white
        Image.fromarray((noisy * 4095).round().astype(np.uint16)).save(path)
    else:
        Image.fromarray((noisy * 255).round().astype(np.uint8), mode="L").save(path)


def make_study(name: str, index: int, output_dir: Path, rng: random.Random, size: int) -> dict:
    side = rng.choice(["left", "right"]) if rng.random() < 0.5 else None
    kind = rng.choice(["yes_no", "finding", "two_views", "two_turns"])
    views = [frontal_view(size, side, rng)]
    if kind == "two_views":
        views.append(lateral_view(size, side is not None, rng))
    paths = []
    for view_index, view in enumerate(views):
        path = f"images/{name}_{index:04d}_{'pa' if view_index == 0 else 'lateral'}.png"
        save_view(view, output_dir / path, rng, sixteen_bit=rng.random() < 0.5)
        paths.append(path)
    record = {"id": f"{name}-{index:04d}", "image_path": paths if kind == "two_views" else paths[0]}
    yes_no = {"q": YES_NO, "a": "yes" if side else "no"}
    if kind in ("yes_no", "two_views"):
        record["qa_pair"] = yes_no
    elif kind == "finding":
        record.update(text=FINDING, target_text=finding(side))
    else:
        record["qa_pair"] = [yes_no, {"q": SIDE, "a": side} if side else {"q": FINDING, "a": CLEAR}]
    return record


def make_split(name: str, count: int, output_dir: Path, rng: random.Random, size: int) -> None:
    records = [make_study(name, index, output_dir, rng, size) for index in range(count)]
    (output_dir / f"{name}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))


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
    print(f"X-ray demo data: {args.num_train} train and {args.num_test} test studies in {args.output_dir}")


if __name__ == "__main__":
    main()
