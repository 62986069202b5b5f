"""Run logs: trimming on resume keeps exactly the records before the resumed epoch."""

from __future__ import annotations

import json

from snag_dist.logging import MetricsLogger, read_jsonl, trim_jsonl


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_trim_keeps_exactly_the_lines_before_the_epoch(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = ['{"epoch": 0, "loss": 3.5}', '{"epoch": 1, "loss": 2.25}', "", '{"note": "no epoch"}',
             '{"epoch": 2, "loss": 1.0}', '{"epoch": 1.0, "loss": 9}', '{"epoch": 3}']
    path.write_text("\n".join(lines) + "\n")
    assert trim_jsonl(path, 2) == 4
    # kept as written (no re-encoding), in order; blank lines and epochs >= 2 dropped
    assert path.read_text() == "\n".join(lines[i] for i in (0, 1, 3, 5)) + "\n"
    assert trim_jsonl(path, 0) == 0
    assert path.read_text() == ""
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no temp file left


def test_trim_of_a_missing_file_creates_nothing(tmp_path):
    assert trim_jsonl(tmp_path / "metrics.jsonl", 3) == 0
    assert not any(tmp_path.iterdir())


def test_logger_rewind_trims_both_logs(tmp_path):
    _write(tmp_path / "train.jsonl", [{"epoch": e, "loss": 1.0 / (e + 1)} for e in range(4)])
    _write(tmp_path / "metrics.jsonl", [{"epoch": e, "split": "valid", "mrr": e / 10} for e in (1, 3)])
    logger = MetricsLogger(tmp_path, enabled=False)
    logger.enabled = True  # no TensorBoard writer: rewind only touches the JSONL files
    logger.rewind(2)
    assert [r["epoch"] for r in read_jsonl(tmp_path / "train.jsonl")] == [0, 1]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"epoch": 1, "split": "valid", "mrr": 0.1}]
