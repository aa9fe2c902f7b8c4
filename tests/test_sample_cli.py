"""`latentpatch sample`: a thin face over latentpatch.sampling.generate.sample; bad input is `error: ...` and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from latentpatch.errors import UserError
from tiny_runs import make_tiny_run
from typer.testing import CliRunner

from latentpatch.cli.app import app, main

OPTIONS = ["--n", "--out", "--prompt", "--prompts", "--class", "--steps", "--guidance", "--seed", "--batch-size",
           "--sampler", "--churn", "--weights", "--device", "--checkpoint"]


def _main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run the console entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["latentpatch", "sample", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_help_explains_every_option():
    result = CliRunner().invoke(app, ["sample", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in OPTIONS:
        assert option in result.output
    assert "heun" in result.output and "dpmpp_2m" in result.output and "ema" in result.output


def test_sample_writes_the_job_and_reports(tiny_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    code, stdout, _ = _main(monkeypatch, capsys, tiny_run, "--n", 3, "--out", out, "--steps", 3, "--batch-size", 2,
                            "--seed", 4, "--churn", 0.5, "--device", "cpu", "--no-progress")
    assert code == 0
    assert f"3 images in {out}" in stdout and "3 new here" in stdout
    assert sorted(p.name for p in out.glob("0*.png")) == ["00000000.png", "00000001.png", "00000002.png"]
    first = json.loads((out / "images.jsonl").read_text().splitlines()[0])
    assert (first["seed"], first["steps"], first["churn"], first["sampler"]) == (4, 3, 0.5, "heun")
    code, stdout, _ = _main(monkeypatch, capsys, tiny_run, "--n", 3, "--out", out, "--steps", 3, "--seed", 4,
                            "--churn", 0.5, "--device", "cpu", "--no-progress")
    assert code == 0 and "3 were there already, 0 new" in stdout


def test_class_and_prompts_file_options(tiny_class_run, tmp_path, monkeypatch, capsys):
    code, _, _ = _main(monkeypatch, capsys, tiny_class_run, "--n", 2, "--class", 1, "--guidance", 1.5,
                       "--out", tmp_path / "o", "--steps", 2, "--sampler", "euler", "--weights", "raw",
                       "--device", "cpu", "--no-progress")
    assert code == 0
    lines = [json.loads(x) for x in (tmp_path / "o" / "images.jsonl").read_text().splitlines()]
    assert [(r["class"], r["guidance"], r["sampler"], r["weights"]) for r in lines] == [(1, 1.5, "euler", "raw")] * 2


def _empty_prompts(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    return ["--prompts", tmp_path / "empty.txt"]


BAD_INPUTS = [
    ("no-checkpoint", lambda run, cls, tmp: [tmp / "bare"], "has no checkpoint yet"),
    ("not-a-run", lambda run, cls, tmp: [tmp], "is not a latentpatch run folder"),
    ("prompt-unconditional", lambda run, cls, tmp: [run, "--prompt", "a cat"], "this model is not text-conditioned"),
    ("class-out-of-range", lambda run, cls, tmp: [cls, "--class", 3], "class 3 is out of range"),
    ("class-unconditional", lambda run, cls, tmp: [run, "--class", 0], "this model has no classes"),
    ("n-zero", lambda run, cls, tmp: [run, "--n", 0], "--n must be a whole number >= 1"),
    ("out-under-file", lambda run, cls, tmp: [run, "--out", tmp / "file.txt" / "sub"], "cannot create the output"),
    ("steps-zero", lambda run, cls, tmp: [run, "--steps", 0], "--steps must be a whole number >= 1"),
    ("guidance-negative", lambda run, cls, tmp: [run, "--guidance", -1], "--guidance must be >= 0"),
    ("unknown-sampler", lambda run, cls, tmp: [run, "--sampler", "ddim"], "unknown sampler 'ddim'"),
    ("missing-prompts", lambda run, cls, tmp: [run, "--prompts", tmp / "nope.txt"], "prompts file not found"),
    ("empty-prompts", lambda run, cls, tmp: [run, *_empty_prompts(tmp)], "holds no prompts"),
    ("both-prompts", lambda run, cls, tmp: [run, "--prompt", "a", "--prompts", tmp / "p.txt"], "not both"),
    ("bad-weights", lambda run, cls, tmp: [run, "--weights", "best"], "weights must be 'ema' or 'raw'"),
    ("churn-dpmpp", lambda run, cls, tmp: [run, "--sampler", "dpmpp_2m", "--churn", 1], "deterministic"),
]


@pytest.mark.parametrize("make_args,message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(tiny_run, tiny_class_run, tmp_path, monkeypatch, capsys,
                                                 make_args, message):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    make_tiny_run(tmp_path / "bare", checkpoint=False)
    args = make_args(tiny_run, tiny_class_run, tmp_path)
    defaults = {"--n": 1, "--out": tmp_path / "out", "--steps": 2, "--device": "cpu"}
    args += [x for k, v in defaults.items() if k not in args for x in (k, v)]
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True


def test_the_console_command_exits_2_with_a_message(tiny_run, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "latentpatch.cli", "sample", str(tiny_run), "--n", "1", "--out", str(tmp_path / "o"),
         "--guidance", "-2"], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: --guidance must be >= 0") and "Traceback" not in done.stderr


def test_the_command_builds_one_sample_options_with_its_defaults_and_calls_sample(tmp_path, monkeypatch, capsys):
    from latentpatch.sampling import generate as generate_module
    from latentpatch.sampling.generate import JobResult
    from latentpatch.sampling.options import DEFAULTS, SampleOptions

    seen = []

    def fake_sample(run, n, *, options, **kw):
        seen.append(options)
        return JobResult(kw["out"], n, n, 0, 1.0)

    monkeypatch.setattr(generate_module, "sample", fake_sample)
    code, out, _ = _main(monkeypatch, capsys, tmp_path / "run", "--n", 2, "--out", tmp_path / "a")
    assert code == 0 and "2 images in" in out
    _main(monkeypatch, capsys, tmp_path / "run", "--n", 2, "--out", tmp_path / "b", "--steps", 5, "--churn", 0.5,
          "--batch-size", 3)
    assert seen == [DEFAULTS, SampleOptions(steps=5, churn=0.5, batch_size=3)]


def test_sample_and_eval_spell_every_sampling_option_once_with_its_default_and_help():
    """The sampling options have one home (SampleOptions): both commands show each one with its default and help,
    and eval takes churn like sample."""
    import dataclasses

    import typer

    from latentpatch.cli.app import app
    from latentpatch.sampling.options import DEFAULTS, SampleOptions

    commands = typer.main.get_command(app).commands
    for name in ("sample", "eval"):
        params = {p.name: p for p in commands[name].params}
        for field in dataclasses.fields(SampleOptions):
            param = params[field.name]
            assert param.help == field.metadata["help"]
            assert param.default == getattr(DEFAULTS, field.name)
    assert "--churn" in commands["eval"].params[[p.name for p in commands["eval"].params].index("churn")].opts


def test_an_unknown_sampling_option_in_python_is_refused_in_one_line(tiny_run):
    import latentpatch as lp

    with pytest.raises(UserError, match=r"^unknown sampling option gudiance; the options are steps, sampler"):
        lp.sample(tiny_run, n=1, gudiance=2.0)
