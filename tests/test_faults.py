"""Faults a user makes end every command with one clear line and exit code 2; bugs keep their traceback.

Faults injected below the CLI are tested beside the code that catches them: checkpoints (flipped
bytes, ``auto`` ordering, killed writes) in test_checkpointing.py, shard verification at set-up in
test_verify_shards.py, writer ``--resume`` with other arguments in test_synthetic.py, sample validation
(RLE size, NaN boxes, truncated images, file names) in test_schema.py, converters that must drop and
count rather than guess in test_convert_*.py.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import webdataset as wds
from run_helpers import fit_args, make_shards, one_thread  # noqa: F401  (fixture)
from test_pipeline import corrupt_json

from sambridge import cli

ROOT = Path(__file__).resolve().parents[1]


def run_main(args: list[str], capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stopped:
        cli.main(args)
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_shipped_config_without_its_sam2_checkpoint_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    """As a new user runs it, from the repository: the official checkpoint is not downloaded yet (the run
    directory in tmp_path: the logger claims its run directory before the model is built)."""
    monkeypatch.chdir(ROOT)
    code, err = run_main(["fit", "--config", "configs/trainer/default.yaml", "--config", "configs/data/shards.yaml",
                          "--config", "configs/grounding/sam2.1_hiera_t_lora.yaml",
                          "--model.init_args.sam2_checkpoint", "checkpoints/not_downloaded.pt",
                          "--trainer.default_root_dir", str(tmp_path)], capsys)
    assert code == 2
    assert err[-1] == ("error: SAM2 checkpoint not found: checkpoints/not_downloaded.pt "
                       "(run with --debug for the traceback)")
    assert not any("Traceback" in line for line in err)


def test_a_missing_shard_directory_names_it(tmp_path, capsys):
    code, err = run_main(["fit", "--config", str(ROOT / "configs/demo/grounding_tiny.yaml"),
                          "--data.init_args.train", str(tmp_path / "missing"),
                          "--trainer.default_root_dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err[-1].startswith("error: 1 shard(s) of ") and str(tmp_path / "missing") in err[-1]


def test_a_tool_command_on_a_missing_file_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    args = ["evaluate", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json")]
    code, err = run_main(args, capsys)
    assert code == 2 and err == [f"error: [Errno 2] No such file or directory: '{tmp_path / 'gt.json'}' "
                                 "(run with --debug for the traceback)"]
    with pytest.raises(FileNotFoundError):
        cli.main([*args, "--debug"])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise ZeroDivisionError("a bug, not the user's fault")

    monkeypatch.setattr(cli, "_tool", lambda name: broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["evaluate"])


def test_the_user_error_is_found_behind_the_wrapping_exceptions():
    from sambridge.models.checkpoint_io import CheckpointError

    try:
        try:
            raise CheckpointError("SAM2 checkpoint not found: x.pt")
        except CheckpointError as inner:
            raise ValueError("Does not validate against any of the Union subtypes") from inner
    except ValueError as outer:
        assert str(cli.user_error(outer)) == "SAM2 checkpoint not found: x.pt"
    assert cli.user_error(RuntimeError("bug")) is None


@pytest.mark.usefixtures("one_thread")
def test_skipped_training_samples_are_logged_per_epoch_and_summed_up_at_the_end(tmp_path, caplog):
    shards = make_shards(tmp_path / "shards")
    first = sorted((shards / "train").glob("*.tar"))[0]
    key = next(iter(wds.WebDataset(str(first), shardshuffle=False)))["__key__"]
    corrupt_json(first, key)
    out = tmp_path / "run"
    with caplog.at_level("INFO"):
        cli.main(fit_args(shards, out, "--trainer.max_steps", "8", "--trainer.limit_val_batches", "1",
                          workers=0))
    rows = list(csv.DictReader(open(next(out.rglob("metrics.csv")))))
    skipped = [float(r["data/skipped_train"]) for r in rows if r.get("data/skipped_train")]
    assert skipped and skipped[0] >= 1  # the exact epoch re-reads its shards to fill the gap: >= 1
    assert any(r.get("data/skipped_train/sample_breaks_the_schema") for r in rows)
    assert "data health (rank 0): skipped samples/shards: train " in caplog.text
    assert "sample breaks the schema" in caplog.text
