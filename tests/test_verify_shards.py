"""Set-up verification of local shards: sha256 against manifest.json, sample keys unique, leakage warned."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from run_helpers import fit_args, make_shards
from shard_helpers import make_sample
from test_pipeline import write_shards

from data_pipelines import ShardDataModule
from data_pipelines.pipeline import resolve_shards
from sambridge import cli


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def shards(pristine, tmp_path) -> Path:
    """A private copy of the tiny synthetic shards (train: 4 shards of 4, val: 2 of 4, with manifests)."""
    return Path(shutil.copytree(pristine, tmp_path / "shards"))


def module(train: str, val: str | None = None, **kwargs) -> ShardDataModule:
    kwargs = {"image_size": 64, "batch_size": 2, "num_workers": 0, "negatives_per_image": 0, **kwargs}
    return ShardDataModule(train=train, val=val, **kwargs)


def change_a_byte(path: Path) -> None:
    """Flip one byte inside the first member's data (the tar stays readable; its sha256 changes)."""
    data = bytearray(path.read_bytes())
    data[520] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("form", ["directory", "brace pattern"])
def test_a_shard_changed_after_writing_stops_setup_naming_it(shards, form):
    changed = shards / "train" / "train-000001.tar"
    change_a_byte(changed)
    train = str(shards / "train") if form == "directory" else str(shards / "train/train-{000000..000003}.tar")
    with pytest.raises(ValueError, match="sha256") as raised:
        module(train).setup("fit")
    assert type(raised.value).__name__ == "ShardVerificationError"
    message = str(raised.value)
    assert message.count("\n") == 0  # one problem, one line
    assert message.startswith(f"{changed}: sha256 ") and "differs from manifest.json's" in message
    assert "verify_shards false" in message
    record = next(r for r in json.loads((shards / "train/manifest.json").read_text())["shards"]
                  if r["name"] == changed.name)
    assert record["sha256"][:12] in message


def test_two_shards_holding_the_same_key_stop_setup_naming_the_key_and_both_shards(tmp_path):
    names = write_shards(tmp_path / "a", [3, 3, 3], prefix="a")  # sizes.json only: no sha256 to compare
    copy = tmp_path / "a" / "a-000003.tar"
    shutil.copyfile(tmp_path / "a" / names[0], copy)
    (tmp_path / "a" / "sizes.json").write_text(json.dumps({**{n: 3 for n in names}, copy.name: 3}))
    with pytest.raises(ValueError, match="appears in") as raised:
        module(str(tmp_path / "a")).setup("fit")
    assert type(raised.value).__name__ == "ShardVerificationError"
    lines = str(raised.value).splitlines()
    first = tmp_path / "a" / names[0]
    assert lines[0] == "train shards: 3 problems (the same sample written twice? remove the duplicates or set " \
        "data.init_args.verify_shards false):"
    assert lines[1] == f"  key 'a0-000' appears in {first} and {copy}"
    assert len(lines) == 4 and "'a0-002'" in lines[3]


def test_clean_shards_pass_once_per_split_and_the_check_can_be_turned_off(shards, caplog):
    dm = module(str(shards / "train"), str(shards / "val"))
    with caplog.at_level("INFO"):
        dm.setup("fit")
        dm.setup("fit")  # Lightning may set up again: nothing is read twice
        dm.setup("validate")
    verified = [r.getMessage() for r in caplog.records if "verified" in r.getMessage()]
    assert len(verified) == 2, verified
    assert verified[0].startswith("train: verified 4 local shard(s), 16 unique sample key(s), "
                                  "sha256 of all 4 match manifest.json (")
    assert verified[1].startswith("val: verified 2 local shard(s), 8 unique sample key(s), sha256 of all 2 ")
    change_a_byte(shards / "train" / "train-000002.tar")
    off = module(str(shards / "train"), verify_shards=False)
    off.setup("fit")  # not read at set-up: training would skip what it cannot read
    assert len(off.train_dataloader()) == 8


def test_shards_without_checksums_are_checked_for_keys_and_said_so(tmp_path, caplog):
    write_shards(tmp_path / "raw", [3, 2], prefix="r")
    with caplog.at_level("INFO"):
        module(str(tmp_path / "raw")).setup("fit")
    assert "train: verified 2 local shard(s), 5 unique sample key(s), no sha256 to compare (no manifest.json " \
        "lists them)" in caplog.text


def test_shards_without_checksums_cut_short_or_unreadable_are_named(tmp_path):
    from data_pipelines.verify import ShardVerificationError, verify_shards

    names = write_shards(tmp_path, [4, 4, 4], prefix="c")
    paths = [tmp_path / name for name in names]
    with tarfile.open(paths[0]) as tar:
        members = tar.getmembers()  # two per sample: json and image
    paths[0].write_bytes(paths[0].read_bytes()[:members[3].offset_data + 10])  # inside sample 1's 2nd member
    paths[1].write_bytes(b"not a tar at all" * 100)
    paths[2].write_bytes(paths[2].read_bytes()[:members[4].offset])  # at sample 2's header: 2 of 4 left
    with pytest.raises(ShardVerificationError) as raised:
        verify_shards(resolve_shards(str(tmp_path)), name="train", progress=False)
    lines = str(raised.value).splitlines()
    assert len(lines) == 4 and lines[0].startswith("train shards: 3 problems (cut short or rewritten? rewrite")
    assert lines[1] == (f"  {paths[0]}: cut short: member {members[3].name} ends at byte "
                        f"{members[3].offset_data + members[3].size} but the file has {members[3].offset_data + 10}")
    assert lines[2] == (f"  {paths[1]}: not a readable tar (ReadError: no tar header at its start (nor a gzip, bz2 "
                        "or xz one))")
    assert lines[3] == f"  {paths[2]}: holds 2 sample(s) but its source lists 4"


def test_remote_shards_are_counted_as_not_verifiable(tmp_path):
    from data_pipelines.verify import verify_shards

    write_shards(tmp_path, [2, 2], prefix="r")
    found = verify_shards(resolve_shards(f"pipe:cat {tmp_path}/r-{{000000..000001}}.tar"), name="train",
                          progress=False)
    assert (found.shards, found.remote) == (0, 2)
    assert "2 remote shard(s) not verifiable" in found.describe()


def test_a_key_twice_in_one_shard_a_shard_given_twice_and_the_count_beyond_ten(tmp_path):
    from data_pipelines.verify import ShardVerificationError, verify_shards

    twice = tmp_path / "twice.tar"
    with wds.TarWriter(str(twice)) as tar:
        for index, key in enumerate(["x", "y", "x"]):  # webdataset would yield two samples 'x'
            tar.write(make_sample(index, key=key).to_wds())
    names = write_shards(tmp_path, [12], prefix="d")
    copy = tmp_path / "copy.tar"
    shutil.copyfile(tmp_path / names[0], copy)
    shards = resolve_shards([str(twice), str(tmp_path / names[0]), str(tmp_path / names[0]), str(copy)])
    with pytest.raises(ShardVerificationError) as raised:
        verify_shards(shards, name="val", progress=False)
    lines = str(raised.value).splitlines()
    assert lines[0].startswith("val shards: 14 problems (the same sample written twice? remove the duplicates, "
                               "give each shard once or set data.init_args.verify_shards false):")
    assert lines[1:3] == [f"  key 'x' appears twice in {twice}",
                          f"  {tmp_path / names[0]}: given twice in the val sources"]
    assert lines[3] == f"  key 'd0-000' appears in {tmp_path / names[0]} and {copy}"
    assert len(lines) == 12 and lines[-1] == "  ... and 4 more"


def test_train_and_val_sharing_keys_is_warned(shards):
    dm = module(str(shards / "train"), str(shards / "train/train-{000000..000001}.tar"))
    with pytest.warns(UserWarning, match=r"train and val share 8 sample key\(s\), e.g. 'synthetic-train-"):
        dm.setup("fit")


def test_a_brace_pattern_without_manifest_names_the_source_lacking_phrases(tmp_path):
    write_shards(tmp_path / "raw", [2, 2], prefix="r")
    pattern = str(tmp_path / "raw/r-{000000..000001}.tar")
    with pytest.raises(ValueError) as raised:
        module(pattern, negatives_per_image=2).setup("fit")
    assert str(raised.value) == (f"{pattern}: no manifest.json beside the shards, so there are no phrases to "
                                 "draw negatives_per_image=2 from: give data.init_args.vocabulary FILE or set "
                                 "negatives_per_image 0")


def test_a_changed_shard_ends_fit_with_one_error_line_and_exit_code_2(shards, tmp_path, capsys):
    change_a_byte(shards / "val" / "val-000000.tar")
    with pytest.raises(SystemExit) as stopped:
        cli.main(fit_args(shards, tmp_path / "run", "--trainer.max_steps", "1", workers=0))
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert errors == [err[-1]] and len(errors) == 1
    assert errors[0].startswith(f"error: {shards / 'val' / 'val-000000.tar'}: sha256 ")
    assert "Traceback" not in "\n".join(err)
