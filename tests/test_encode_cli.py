"""`latentpatch encode` as a user runs it: a real process killed mid-run resumes, errors are one clear line."""

import json
import signal

import pytest
from helpers import encode_killed_midway, make_image_folder, photo, run_main, save_image, stored_count, verify_store
from typer.testing import CliRunner

from latentpatch.cli.app import app
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError


def test_a_killed_encode_resumes_and_stores_every_image_exactly_once(tmp_path):
    src, out = tmp_path / "images", tmp_path / "store"
    make_image_folder(src, n=12, size=[32, (40, 32)], modes=("RGB", "L"))
    args = [src, "--vae", "pixel", "--resolution", 32, "--out", out, "--batch-size", 1, "--shard-size", 2,
            "--workers", 0, "--no-progress"]
    def second_encode():  # while it runs, a second encode into the same folder fails at once, corrupting nothing
        second = CliRunner().invoke(app, ["encode", *map(str, args)])
        assert isinstance(second.exception, UserError) and "another encode is writing to" in str(second.exception)

    assert encode_killed_midway(args, out, while_running=second_encode) == -signal.SIGKILL
    done_before = stored_count(out)
    assert 4 <= done_before < 12, "the first run should have been killed mid-run"

    resumed = invoke(*args)  # the rerun may as well run in this process
    assert resumed.exit_code == 0, resumed.output
    assert f"already present: {done_before}" in resumed.output.splitlines()
    store = LatentStore(out)
    files = sorted(i.file for i in store.items)
    assert files == sorted(p.name for p in src.iterdir()) and len(files) == len(set(files)) == 12
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(s.file for s in store.manifest.shards)
    verify_store(store)
    assert len(store.load()["mean"]) == 12

    again = invoke(*args)
    assert again.exit_code == 0 and again.output.strip() == f"store is up to date: 12 images in {out}"


def invoke(*args):
    return CliRunner().invoke(app, ["encode", *map(str, args)])


def test_user_errors_print_one_line_and_exit_2_without_a_traceback(tmp_path, monkeypatch, capsys):
    nowhere = tmp_path / "nowhere"
    code, _, err = run_main(monkeypatch, capsys, "encode", nowhere, "--vae", "pixel", "--resolution", 32, "--out",
                            tmp_path / "store")
    assert code == 2 and "Traceback" not in err
    assert err.strip() == f"error: image folder {nowhere} does not exist"


def test_summary_reports_encoded_converted_skipped_and_up_to_date(tmp_path):
    src, out = tmp_path / "images", tmp_path / "store"
    make_image_folder(src, n=4, size=32, modes=("RGB", "L", "P", "RGBA"), formats=("png",))
    (src / "zero.jpg").write_bytes(b"")
    save_image(photo(1, 16), src / "tiny.png")
    (src / "metadata.csv").write_text("file_name,text\nimg_000.png,hello\n")
    args = [src, "--vae", "pixel", "--resolution", 32, "--out", out, "--workers", 0, "--no-progress"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert lines[0].startswith(f"encoded 4 images (4 files) into {out} in ") and "images/s); the store holds 4" in lines[0]
    assert "already present: 0" in lines and "converted to RGB: L 1, P 1, RGBA 1" in lines
    assert f"skipped 2 files (empty file 1, smaller than resolution 1); list in {out / 'encode_report.json'}" in lines
    assert LatentStore(out).captions[0] == "hello"
    second = invoke(*args)
    assert second.output.splitlines()[0] == f"store is up to date: 4 images in {out}"


@pytest.mark.parametrize(
    "change, message",
    [
        (["--vae", "no/such-vae"], "autoencoder 'no/such-vae'"),
        (["--resolution", 0], "resolution must be a positive size"),
        (["--batch-size", 0], "--batch-size must be at least 1"),
        (["--store", "everything"], "--store must be one of mean-std, sample"),
        (["--resolution", 16], "resolution: the store has [32, 32], this run asks for [16, 16]"),
        (["SRC_IS_A_FILE"], "is not a folder"),
        (["EMPTY"], "no images found in"),
    ],
)
def test_bad_options_raise_user_errors(tmp_path, change, message):
    src, out = tmp_path / "images", tmp_path / "store"
    make_image_folder(src, n=2, size=32, formats=("png",))
    (tmp_path / "empty").mkdir()
    base = {"src": src, "--vae": "pixel", "--resolution": 32, "--out": out, "--workers": 0, "--no-progress": None}
    assert invoke(*[x for k, v in base.items() for x in ([v] if k == "src" else [k] if v is None else [k, v])]).exit_code == 0
    opts = dict(base)
    if change == ["SRC_IS_A_FILE"]:
        opts["src"] = src / "img_000.png"
    elif change == ["EMPTY"]:
        opts["src"] = tmp_path / "empty"
    else:
        opts[change[0]] = change[1]
    result = invoke(*[x for k, v in opts.items() for x in ([v] if k == "src" else [k] if v is None else [k, v])])
    assert isinstance(result.exception, UserError), result.output
    assert message in str(result.exception)


def test_a_rerun_over_a_file_that_cannot_be_read_changes_no_file(tmp_path):
    """A symlink loop cannot even be stat'ed: it is skipped once, remembered, and a rerun with nothing new
    leaves the manifest and the first run's report as they were, byte for byte."""
    src, out = tmp_path / "images", tmp_path / "store"
    make_image_folder(src, n=2, size=32, formats=("png",))
    (src / "loop.png").symlink_to("loop.png")
    save_image(photo(1, 16), src / "tiny.png")  # a second, ordinary skip
    args = [src, "--vae", "pixel", "--resolution", 32, "--out", out, "--workers", 0, "--no-progress"]
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    report = json.loads((out / "encode_report.json").read_text())
    assert report["encoded"] == 2 and {s["file"] for s in report["skipped_files"]} == {"loop.png", "tiny.png"}
    files = [out / "manifest.json", out / "encode_report.json"]
    before = [(p.read_bytes(), p.stat().st_mtime_ns) for p in files]

    second = invoke(*args)
    assert second.exit_code == 0, second.output
    assert second.output.splitlines()[0] == f"store is up to date: 2 images in {out}"
    assert [(p.read_bytes(), p.stat().st_mtime_ns) for p in files] == before


def test_every_encode_option_is_one_field_read_by_the_command_and_the_api():
    import dataclasses
    import inspect

    import latentpatch as lp
    from latentpatch.encoding.options import EncodeOptions

    fields = {f.name: f for f in dataclasses.fields(EncodeOptions)}
    api = inspect.signature(lp.encode).parameters
    assert list(api)[:4] == ["src", "out", "vae", "resolution"]
    assert {k: p.default for k, p in list(api.items())[4:]} == {k: f.default for k, f in fields.items()}
    command = next(c for c in app.registered_commands if c.name == "encode")
    cli = {p.name: p.default for p in inspect.signature(command.callback).parameters.values()}
    assert set(cli) == {"src", "vae", "resolution", "out"} | {k for k, f in fields.items() if f.metadata["cli"]}
    assert cli["batch_size"].help == fields["batch_size"].metadata["help"] and cli["progress"].default is True
    with pytest.raises(TypeError, match="unexpected keyword argument 'batchsize'"):
        lp.encode("images", "store", "pixel", 32, batchsize=4)
