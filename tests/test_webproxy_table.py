"""The KD³ web-proxy table: aggregation over seeds and the selection summary of the α = 0 epochs."""

from __future__ import annotations

import json

from distillbench.leaderboards.webproxy import load_records, main, render, selection_summary


def _record(seed, top1, history=(), status="finished"):
    return {
        "status": status,
        "seed": seed,
        "metrics": {"top1": top1},
        "history": list(history),
        "adapter_params": 100,
        "train_time_s": 2.0,
    }


def _write(folder, arm, record):
    path = folder / arm / "resnet20__resnet8" / f"seed{record['seed']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_table_means_stds_and_selection_of_the_second_half(tmp_path, capsys):
    sel = {"recall": 0.5, "kept_fraction": 0.4, "base_rate": 0.6, "time_s": 0.1, "fallback": 0.0}
    history = [
        {"select/alpha": 0.7, "select/precision": 0.2, **{f"select/{k}": v for k, v in sel.items()}},
        {"select/alpha": 0.0, "select/precision": 0.8, **{f"select/{k}": v for k, v in sel.items()}},
        {"select/alpha": 0.0, "select/precision": 0.9, **{f"select/{k}": v for k, v in sel.items()}},
    ]
    for seed, top1 in enumerate((90.0, 92.0, 94.0)):
        _write(tmp_path, "kd3", _record(seed, top1, history))
        _write(tmp_path, "kd_pool", _record(seed, top1 - 10))
    _write(tmp_path, "kd_pool", _record(3, 0.0, status="failed"))
    assert abs(selection_summary(_record(0, 1.0, history))["precision"] - 0.85) < 1e-12  # mean of the α = 0 epochs only
    arms, problems = load_records(tmp_path)
    assert sorted(arms) == ["kd3/resnet20__resnet8", "kd_pool/resnet20__resnet8"] and len(problems) == 1
    table = render(arms)
    assert "| `kd3/resnet20__resnet8` | 3 | 92.00 ± 2.00 | 90.00, 92.00, 94.00 | 0.850 | 0.500 |" in table
    assert "| `kd_pool/resnet20__resnet8` | 3 | 82.00 ± 2.00 | 80.00, 82.00, 84.00 | – |" in table
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "92.00 ± 2.00" in out.out and "status failed" in out.err
    assert main([str(tmp_path / "missing")]) == 2
