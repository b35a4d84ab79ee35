"""COCO detection data: generated shapes set, pycocotools loader round-trip, bbox AP, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distillbench.datasets.coco import CocoDataModule, CocoDetection, collate, load_coco
from distillbench.datasets.coco_eval import coco_metrics
from distillbench.datasets.errors import CorruptDatasetError, DatasetNotFoundError
from distillbench.datasets.shapes import main as shapes_main
from distillbench.datasets.shapes import make_shapes
from PIL import Image


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("coco"), num_train=4, num_val=6, image_size=64, seed=3)


def _perfect(ds: CocoDetection) -> dict:
    dets = {}
    for image_id in ds.ids:
        t = ds.target(image_id)
        dets[image_id] = {"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
    return dets


def test_generated_files_are_valid_coco_with_exact_boxes(shapes_root):
    for split in ("train", "val"):
        coco = load_coco(shapes_root / "annotations" / f"instances_{split}2017.json")
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["rectangle", "ellipse", "triangle"]
        assert len(coco.getImgIds()) == (4 if split == "train" else 6)
        for img in coco.loadImgs(coco.getImgIds()):
            pixels = np.asarray(Image.open(shapes_root / f"{split}2017" / img["file_name"]).convert("RGB"))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
            assert anns, "every image has at least one visible shape"
            for a in anns:
                assert a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3)
                x, y, w, h = (int(v) for v in a["bbox"])
                assert a["bbox"] == [float(x), float(y), float(w), float(h)] and w > 0 and h > 0
                assert 0 < a["area"] <= w * h
                assert x + w <= pixels.shape[1] and y + h <= pixels.shape[0]


def test_boxes_equal_the_drawn_mask_for_a_single_shape(tmp_path):
    # one-image sets: recompute the box from the pixels that differ from the (uniform) background
    checked = 0
    for seed in range(40):
        root = make_shapes(tmp_path / str(seed), num_train=1, num_val=1, image_size=48, seed=seed)
        doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
        if len(doc["annotations"]) != 1:
            continue
        px = np.asarray(Image.open(root / "val2017" / doc["images"][0]["file_name"]).convert("RGB"))
        colours, counts = np.unique(px.reshape(-1, 3), axis=0, return_counts=True)
        bg = colours[counts.argmax()] if counts.max() > px.shape[0] * px.shape[1] // 2 else None
        if bg is None:  # the shape covers most of the image: background colour is ambiguous
            continue
        ys, xs = np.nonzero(np.any(px != bg, axis=2))
        want = [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert doc["annotations"][0]["bbox"] == [float(v) for v in want]
        assert doc["annotations"][0]["area"] == float(len(xs))
        checked += 1
    assert checked >= 3


def test_generation_is_deterministic(tmp_path):
    a = make_shapes(tmp_path / "a", num_train=2, num_val=2, image_size=32, seed=7)
    b = make_shapes(tmp_path / "b", num_train=2, num_val=2, image_size=32, seed=7)
    c = make_shapes(tmp_path / "c", num_train=2, num_val=2, image_size=32, seed=8)
    ja = (a / "annotations" / "instances_val2017.json").read_text()
    assert ja == (b / "annotations" / "instances_val2017.json").read_text()
    assert ja != (c / "annotations" / "instances_val2017.json").read_text()


def test_cli_writes_layout(tmp_path):
    shapes_main(["--root", str(tmp_path), "--num-train", "1", "--num-val", "1", "--image-size", "32"])
    assert (tmp_path / "annotations" / "instances_train2017.json").is_file()
    assert len(list((tmp_path / "val2017").glob("*.png"))) == 1


def test_loader_round_trips_the_json(shapes_root):
    ds = CocoDetection(shapes_root, "val")
    doc = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    assert len(ds) == 6 and ds.num_classes == 3
    for idx in range(len(ds)):
        image, target = ds[idx]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        anns = [a for a in doc["annotations"] if a["image_id"] == target["image_id"]]
        want = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        )
        assert target["boxes"].dtype == torch.float32 and torch.equal(target["boxes"], want)
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in anns]  # ids 1..3 are already contiguous
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["iscrowd"].tolist() == [0] * len(anns)
    images, targets = collate([ds[0], ds[1]])
    assert len(images) == 2 and len(targets) == 2


def test_noncontiguous_category_ids_map_to_1_to_k(tmp_path, shapes_root):
    doc = json.loads((shapes_root / "annotations" / "instances_val2017.json").read_text())
    remap = {1: 5, 2: 17, 3: 90}
    for c in doc["categories"]:
        c["id"] = remap[c["id"]]
    for a in doc["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(doc))
    (tmp_path / "val2017").symlink_to(shapes_root / "val2017")
    ds = CocoDetection(tmp_path, "val")
    assert ds.label_to_cat == {1: 5, 2: 17, 3: 90}
    labels = torch.cat([ds[i][1]["labels"] for i in range(len(ds))])
    assert set(labels.tolist()) <= {1, 2, 3}
    m = coco_metrics(ds.coco, _perfect(ds), ds.label_to_cat)
    assert m["AP"] == pytest.approx(1.0)


def test_perfect_predictions_give_ap_one(shapes_root):
    ds = CocoDetection(shapes_root, "val")
    m = coco_metrics(ds.coco, _perfect(ds))
    assert set(m) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)


def test_shifted_or_wrong_class_predictions_score_below_one(shapes_root):
    ds = CocoDetection(shapes_root, "val")
    perfect = _perfect(ds)
    shifted = {k: {**d, "boxes": d["boxes"] + 6.0} for k, d in perfect.items()}
    wrong = {k: {**d, "labels": d["labels"] % 3 + 1} for k, d in perfect.items()}
    assert coco_metrics(ds.coco, shifted)["AP"] < 1.0
    assert coco_metrics(ds.coco, wrong)["AP"] == pytest.approx(0.0)


def test_no_detections_give_zeros(shapes_root):
    ds = CocoDetection(shapes_root, "val")
    assert coco_metrics(ds.coco, {}) == dict.fromkeys(("AP", "AP50", "AP75", "APs", "APm", "APl"), 0.0)
    empty = {i: {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)} for i in ds.ids}
    assert coco_metrics(ds.coco, empty)["AP"] == 0.0


def test_bad_label_is_a_clear_error(shapes_root):
    ds = CocoDetection(shapes_root, "val")
    bad = {ds.ids[0]: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([4])}}
    with pytest.raises(ValueError, match="label 4"):
        coco_metrics(ds.coco, bad)


def test_missing_layout_names_every_expected_path(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        CocoDetection(tmp_path, "val")
    msg = str(e.value)
    assert str(tmp_path / "val2017") in msg and str(tmp_path / "annotations" / "instances_val2017.json") in msg
    assert "cocodataset.org/#download" in msg and "distillbench.datasets.shapes" in msg


def test_datamodule_uses_data_root(monkeypatch, shapes_root, tmp_path):
    monkeypatch.setenv("DATA_ROOT", str(shapes_root.parent))
    (shapes_root.parent / "coco").exists() or (shapes_root.parent / "coco").symlink_to(shapes_root)
    dm = CocoDataModule(batch_size=2)
    dm.setup("fit")
    assert dm.num_classes == 3
    images, targets = next(iter(dm.val_dataloader()))
    assert len(images) == 2 and "boxes" in targets[0]
    monkeypatch.setenv("DATA_ROOT", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="train2017"):
        CocoDataModule().setup("fit")


def test_corrupt_json_is_a_clear_error(tmp_path):
    (tmp_path / "val2017").mkdir()
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [')
    with pytest.raises(CorruptDatasetError, match="not valid JSON"):
        CocoDetection(tmp_path, "val")
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": []}')
    with pytest.raises(CorruptDatasetError, match="not a COCO instances file"):
        CocoDetection(tmp_path, "val")
