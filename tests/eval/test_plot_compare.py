"""plot_compare overlays one metric of several runs and refuses a run that has none of it."""

import json

import pytest

from snag_dist.plots import plot_compare


def write_run(folder, rows):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_plot_compare_writes_a_png_and_names_a_run_without_the_metric(tmp_path):
    a = write_run(tmp_path / "a", [{"epoch": e, "split": "valid", "hits@1": e / 10} for e in range(5)]
                  + [{"epoch": 4, "split": "test", "hits@1": 0.3}])
    b = write_run(tmp_path / "b", [{"epoch": e, "split": "valid", "hits@1": e / 20} for e in range(5)])
    out = plot_compare({"on": a, "off": b}, tmp_path / "plots" / "cmp.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    c = write_run(tmp_path / "c", [{"epoch": 0, "split": "test", "hits@1": 0.1}])
    with pytest.raises(ValueError, match=r"c/metrics.jsonl: no 'valid' rows with 'hits@1'"):
        plot_compare({"on": a, "c": c}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
