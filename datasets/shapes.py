"""A generated detection dataset in exactly the COCO layout: rendered rectangles, ellipses and triangles.

``make_shapes(root, ...)`` writes ``<root>/train2017/*.png``, ``<root>/val2017/*.png`` and
``<root>/annotations/instances_{train,val}2017.json``. Every box is the tight box of the pixels actually
drawn for that object (computed from its rendered mask after later shapes occlude it), so ground truth is
exact. Deterministic from ``seed``. CLI: ``python -m distillbench.datasets.shapes --root DIR``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]


def _draw(draw: ImageDraw.ImageDraw, kind: int, x0: int, y0: int, x1: int, y1: int, fill) -> None:
    if kind == 1:
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif kind == 2:
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _mask_box(mask: np.ndarray) -> list[float] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _split(root: Path, split: str, num: int, image_size: int, rng: np.random.Generator, first_ann: int) -> int:
    img_dir = root / f"{split}2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_ann
    min_side = max(4, image_size // 8)
    for i in range(num):
        image_id = i + 1
        bg = tuple(int(v) for v in rng.integers(0, 60, 3))
        img = Image.new("RGB", (image_size, image_size), bg)
        draw = ImageDraw.Draw(img)
        owner = np.zeros((image_size, image_size), dtype=np.int32)  # index+1 of the shape owning each pixel
        objs = []
        for k in range(int(rng.integers(1, 4))):
            kind = int(rng.integers(1, 4))
            w, h = (int(v) for v in rng.integers(min_side, image_size // 2 + 1, 2))
            x0 = int(rng.integers(0, image_size - w))
            y0 = int(rng.integers(0, image_size - h))
            fill = tuple(int(v) for v in rng.integers(100, 256, 3))
            _draw(draw, kind, x0, y0, x0 + w - 1, y0 + h - 1, fill)
            m = Image.new("L", (image_size, image_size), 0)
            _draw(ImageDraw.Draw(m), kind, x0, y0, x0 + w - 1, y0 + h - 1, 255)
            owner[np.asarray(m) > 0] = k + 1
            objs.append(kind)
        for k, kind in enumerate(objs):
            mask = owner == k + 1
            box = _mask_box(mask)
            if box is None:  # fully occluded by later shapes
                continue
            x, y, w, h = box
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": kind,
                    "bbox": box,
                    "area": float(mask.sum()),
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            ann_id += 1
        name = f"{image_id:012d}.png"
        img.save(img_dir / name)
        images.append({"id": image_id, "file_name": name, "width": image_size, "height": image_size})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    doc = {
        "info": {"description": "distillbench shapes (generated)", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    return ann_id


def make_shapes(root, *, num_train: int = 64, num_val: int = 16, image_size: int = 64, seed: int = 0) -> Path:
    """Write the shapes dataset under ``root`` in COCO layout and return ``root``."""
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    _split(root, "train", num_train, image_size, rng, 1)
    _split(root, "val", num_val, image_size, rng, 1)
    return root


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Generate the COCO-format shapes detection dataset.")
    p.add_argument("--root", required=True)
    p.add_argument("--num-train", type=int, default=64)
    p.add_argument("--num-val", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    root = make_shapes(a.root, num_train=a.num_train, num_val=a.num_val, image_size=a.image_size, seed=a.seed)
    print(f"wrote shapes dataset to {root}")


if __name__ == "__main__":
    main()
