"""One CLI convention (issue #22): inputs positional, what a verb writes behind ``--out``, old spellings
deprecated with one stderr line, ``--resume auto|never`` for train and tune, help on every option.

The verbs' work is replaced by recorders: these tests are about argv -> call, not the work itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from snag_dist.cli import build_parser, main


def parsers(parser: argparse.ArgumentParser, name: str = "snag-dist"):
    """(name, parser) of ``parser`` and of every subparser under it, recursively."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb, sub in action.choices.items():
                yield from parsers(sub, verb)


PARSERS = dict(parsers(build_parser()))


def test_every_verb_is_walked():
    assert set(PARSERS) == {"snag-dist", "prepare", "verify", "synth", "stream", "train", "eval", "export", "tune"}


@pytest.mark.parametrize("verb", sorted(PARSERS))
def test_every_option_has_help_and_closed_choices_are_shown(verb):
    parser = PARSERS[verb]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help and action.help.strip() and action.help != argparse.SUPPRESS, f"{verb} {name}: no help"
        if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
            assert "{" + ",".join(action.choices) + "}" in text, f"{verb} {name}: choices not in --help"


def test_options_checked_outside_argparse_list_their_closed_values():
    """prepare --text/--dtype are validated by PrepareOptions (one-line errors): their metavar lists the values."""
    from snag_dist.data.name_encoder import TEXT_ENCODERS

    text = PARSERS["prepare"].format_help()
    assert "{" + ",".join(TEXT_ENCODERS) + "}" in text and "{float16,float32}" in text


# -- --out ---------------------------------------------------------------------------------------
class Recorder:
    """Stands in for the function a verb calls; ``out`` is where it was told to write."""

    def __init__(self, monkeypatch) -> None:
        import snag_dist.data.prepare as prepare
        import snag_dist.data.synth as synth
        import snag_dist.engine.run as run
        import snag_dist.engine.stream_check as stream_check
        import snag_dist.export as export
        import snag_dist.report as report

        self.calls: list[tuple[str, object]] = []
        monkeypatch.setattr(prepare, "prepare", lambda src, out, opts, show_progress: self.calls.append(
            ("prepare", out)))
        monkeypatch.setattr(report, "print_manifest", lambda *a: None)
        monkeypatch.setattr(synth, "synth", lambda out, opts, progress: self.calls.append(("synth", out)) or {})
        monkeypatch.setattr(export, "export_run", lambda run_dir, out, ckpt: self.calls.append(("export", out)) or out)
        monkeypatch.setattr(run, "evaluate_run", lambda *a: self.calls.append(("eval", None)) or {"test": {"mrr": 0.5}})
        monkeypatch.setattr(stream_check, "run_stream_check",
                            lambda shards, **kw: self.calls.append(("stream", kw["out_json"])) or 0)


# verb, its argv before the output, the old spelling (None: positional), extra argv after it
OUTPUT_VERBS = [
    ("prepare", ["prepare", "SRC"], None, ["--quiet"]),
    ("synth", ["synth"], None, ["--entities", "60", "--triples", "240", "--quiet"]),
    ("export", ["export", "RUN"], None, []),
    ("eval", ["eval", "RUN"], "--json", []),
    ("stream", ["stream", "SHARDS"], "--out-json", []),
]


def _written(rec: Recorder, verb: str, tmp_path: Path) -> str | None:
    if verb == "eval":  # the metrics file itself
        target = tmp_path / "target"
        return str(target) if target.is_file() and json.loads(target.read_text()) == {"test": {"mrr": 0.5}} else None
    [(called, out)] = rec.calls
    assert called == verb
    return str(out)


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("verb,head,old,tail", OUTPUT_VERBS, ids=[v[0] for v in OUTPUT_VERBS])
def test_out_is_the_output_and_the_old_spelling_is_deprecated(verb, head, old, tail, monkeypatch, tmp_path, capsys):
    target = str(tmp_path / "target")
    rec = Recorder(monkeypatch)
    code, err = _run(capsys, [*head, "--out", target, *tail])
    assert code == 0 and err == [], err
    assert _written(rec, verb, tmp_path) == target

    rec.calls.clear()
    (tmp_path / "target").unlink(missing_ok=True)
    legacy = [target] if old is None else [old, target]
    code, err = _run(capsys, [*head, *legacy, *tail])
    assert code == 0 and len(err) == 1, err
    assert f"snag-dist {verb}: deprecated" in err[0] and f"--out {target}" in err[0], err
    assert _written(rec, verb, tmp_path) == target

    rec.calls.clear()
    code, err = _run(capsys, [*head, "--out", target, *legacy, *tail])
    assert code == 1 and len(err) == 1 and "give --out only" in err[0], err
    assert rec.calls == []


@pytest.mark.parametrize("argv", [["prepare", "SRC"], ["synth", "--entities", "6", "--triples", "9"], ["export", "RUN"],
                                  ["train", "--config", "quickstart"]], ids=lambda a: a[0])
def test_no_output_is_a_one_line_error(argv, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    code, err = _run(capsys, argv)
    assert code == 1 and len(err) == 1 and "pass --out" in err[0], err
    assert rec.calls == []


@pytest.mark.parametrize("argv,verb", [(["eval", "RUN"], "eval"), (["stream", "SHARDS"], "stream")])
def test_an_optional_output_may_be_left_out(argv, verb, monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    code, err = _run(capsys, argv)
    assert code == 0 and err == [], err
    assert rec.calls == [(verb, None if verb == "eval" else "")]


# -- tune --resume auto|never ----------------------------------------------------------------------
@pytest.fixture
def searches(monkeypatch) -> list[dict]:
    """tune's run_search, recorded (no Ray)."""
    import snag_dist.tune.runner as runner

    calls: list[dict] = []
    monkeypatch.setattr(runner, "run_search", lambda cfg, space, out, **kw: calls.append({"out": out, **kw}))
    return calls


def _tune(out: Path, *extra: str) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    return ["tune", "--space", str(root / "tuning" / "quickstart.yaml"), "--config", "quickstart", "--out", str(out),
            "--quiet", *extra]


def test_tune_resume_never_is_the_default_and_refuses_a_saved_search(searches, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(_tune(out)) == 0
    assert searches == [{"out": out.resolve(), "resume": False, "verbose": 0}]
    assert (out / "base.yaml").is_file() and (out / "space.yaml").is_file()
    (out / "tuner.pkl").write_bytes(b"state")  # what Ray leaves in a search folder
    base = (out / "base.yaml").read_bytes()
    for argv in (_tune(out), _tune(out, "--resume", "never")):
        code, err = _run(capsys, argv)
        assert code == 1 and len(err) == 1 and "already holds a search" in err[0] and "--resume auto" in err[0], err
    assert len(searches) == 1 and (out / "base.yaml").read_bytes() == base  # a refused command writes nothing


def test_tune_resume_auto_continues_a_saved_search_or_starts_one(searches, tmp_path, capsys):
    out = tmp_path / "exp"
    code, err = _run(capsys, _tune(out, "--resume", "auto"))  # nothing there yet: a fresh search
    assert code == 0 and err == [] and searches[-1]["resume"] is False
    (out / "tuner.pkl").write_bytes(b"state")
    code, err = _run(capsys, ["tune", "--resume", "auto", "--out", str(out), "--quiet"])  # sources: the saved copies
    assert code == 0 and err == [] and searches[-1] == {"out": out.resolve(), "resume": True, "verbose": 0}


def test_tune_bare_resume_is_a_deprecated_auto(searches, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(_tune(out)) == 0
    (out / "tuner.pkl").write_bytes(b"state")
    code, err = _run(capsys, ["tune", "--resume", "--out", str(out)])
    assert code == 0 and len(err) == 1 and "deprecated" in err[0] and "--resume auto" in err[0], err
    assert searches[-1]["resume"] is True


def test_tune_resume_auto_without_a_saved_search_needs_config_and_space(searches, tmp_path, capsys):
    code, err = _run(capsys, ["tune", "--resume", "auto", "--out", str(tmp_path / "exp")])
    assert code == 1 and len(err) == 1 and "tune needs --config" in err[0], err
    assert searches == []


def test_train_and_tune_share_the_resume_values():
    for verb in ("train", "tune"):
        [resume] = [a for a in PARSERS[verb]._actions if "--resume" in a.option_strings]
        assert list(resume.choices) == ["auto", "never"] and resume.default == "never"
