"""leaderboards/reported.yaml: the shipped file validates; malformed files give specific errors."""

from __future__ import annotations

import pytest
import yaml
from distillbench.benchmark.protocol import list_protocols
from distillbench.leaderboards.reported import ReportedError, default_path, load_reported


def test_shipped_file_loads_and_holds_the_spec_numbers():
    results = load_reported()
    assert {r.protocol for r in results} == {"cifar100", "cifar100-hetero", "imagenet"} <= set(list_protocols())
    by_key = {(r.protocol, r.pair, r.method, r.source): r for r in results}
    dkd = by_key[("cifar100", "resnet32x4__resnet8x4", "dkd", "mdistiller-readme")]
    assert dkd.top1 == 76.32 and dkd.verified and "mdistiller" in dkd.citation
    assert by_key[("cifar100", "resnet32x4__resnet8x4", "dkd", "nd-readme")].top1 == 75.44
    assert by_key[("cifar100", "none__resnet32x4", "vanilla", "dkd-paper-crd")].verified is False
    assert by_key[("imagenet", "resnet50__mobilenetv1", "kd", "mdistiller-readme")].top1 == 70.50
    assert by_key[("cifar100-hetero", "swin_tiny_patch4_window7_224__resnet18", "ofa", "ofa-paper")].top1 == 80.54
    assert (
        sum(r.protocol == "cifar100" and r.source == "mdistiller-readme" for r in results) == 22
    )  # 11 pairs × KD, DKD


def _write(tmp_path, mutate):
    data = yaml.safe_load(default_path().read_text())
    mutate(data)
    path = tmp_path / "reported.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["results"][0].pop("top1"), r"results\[0\]: missing key\(s\) top1"),
        (lambda d: d["results"][0].update(top1=170.0), r"results\[0\]\.top1: expected a percentage"),
        (lambda d: d["results"][0].update(source="blog"), r"results\[0\]\.source: 'blog' is not one of"),
        (lambda d: d["results"][0].update(teacher=None), r"teacher is null but method is 'kd'"),
        (lambda d: d["results"][0].update(verified="yes"), r"verified: expected true or false"),
        (lambda d: d["results"][0].update(epochs=3), r"unknown key\(s\) epochs"),
        (lambda d: d["results"].append(dict(d["results"][0])), r"repeats results\[0\]"),
        (lambda d: d.update(schema_version=2), "schema_version 2 is not 1"),
        (lambda d: d.pop("sources"), "expected exactly the keys"),
    ],
)
def test_malformed_entries_are_named(tmp_path, mutate, message):
    with pytest.raises(ReportedError, match=message):
        load_reported(_write(tmp_path, mutate))


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ReportedError, match="does not exist"):
        load_reported(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("results: [1, 2\n")
    with pytest.raises(ReportedError, match="malformed YAML"):
        load_reported(tmp_path / "bad.yaml")
