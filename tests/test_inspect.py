"""inspect: good shards pass with correct statistics; tampered ones fail naming shard/sample/field; grid."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shard_helpers import make_sample

from data_pipelines.cli import main
from data_pipelines.inspect import inspect_shards, render_grid
from data_pipelines.schema import Query
from data_pipelines.writer import write_samples


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    items = [make_sample(i, height=24 + 8 * (i % 2), width=32) for i in range(7)]
    items[2].queries.append(Query("hidden", [], exhaustive=False))
    out = tmp_path / "shards"
    write_samples(items, out, prefix="t", max_count=3, progress=False)
    return out


def _rewrite_member(shard: Path, key: str, edit) -> None:
    """Rewrite one sample's json inside a shard (what a tampering or a broken copy would do)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name == f"{key}.json":
                data = json.dumps(edit(json.loads(data))).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_good_shards_pass_with_statistics(shards: Path, capsys: pytest.CaptureFixture) -> None:
    report, drawn = inspect_shards(shards, grid_samples=4, progress=False)
    assert report.ok, report.problems
    assert report.shards == 3 and report.totals.samples == 7
    assert report.totals.queries == 15 and report.totals.negatives == 7 and report.non_exhaustive == 1
    assert report.totals.instances == 10  # odd samples have two instances
    assert report.instances_per_query == {1: 4, 2: 3}
    assert report.image_sizes == {(32, 24): 4, (32, 32): 3}
    assert report.phrase_positive == {"thing 0": 3, "thing 1": 2, "thing 2": 2}
    assert report.phrase_negative == {"absent": 7}
    assert len(drawn) == 4 and len({s.key for s in drawn}) == 4

    grid = shards.parent / "grid.png"
    assert main(["inspect", str(shards), "--grid", str(grid), "--num", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images 7  queries 15  instances 10  negatives 7  non-exhaustive queries 1" in out
    assert "mean 1.43, median 1, max 2" in out and "OK: shards match the manifest" in out
    assert "absent" in out and "thing 0" in out
    with Image.open(grid) as img:
        assert img.format == "PNG" and img.size == (640, 736)
        pixels = np.asarray(img.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200  # images and overlays, not a blank canvas
    assert not list(shards.parent.glob("*.tmp"))


def test_tampered_sample_is_named(shards: Path, capsys: pytest.CaptureFixture) -> None:
    def break_bbox(meta):
        meta["queries"][0]["instances"][0]["bbox"] = [0, 0, 2, 2]
        return meta

    _rewrite_member(shards / "t-000001.tar", "s0004", break_bbox)
    report, _ = inspect_shards(shards, progress=False)
    problems = {(p.shard, p.key, p.field) for p in report.problems}
    assert problems == {
        ("t-000001.tar", None, "sha256"),
        ("t-000001.tar", "s0004", "queries[0].instances[0].bbox"),
        ("t-000001.tar", None, "samples"),
        ("t-000001.tar", None, "queries"),
        ("t-000001.tar", None, "instances"),
        ("t-000001.tar", None, "negatives"),
    }
    assert main(["inspect", str(shards), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert (
        "t-000001.tar, sample 's0004', field queries[0].instances[0].bbox: bbox [0, 0, 2, 2] disagrees" in out
    )
    assert "FAILED: 6 problem(s)" in out


def test_missing_stray_truncated_and_sizes(shards: Path) -> None:
    (shards / "t-000002.tar").unlink()
    (shards / "t-000009.tar").write_bytes(b"")
    with tarfile.open(shards / "t-000001.tar") as tar:
        cut = tar.getmembers()[3].offset_data + 10  # inside the second sample's image
    (shards / "t-000001.tar").write_bytes((shards / "t-000001.tar").read_bytes()[:cut])
    (shards / "sizes.json").write_text(json.dumps({"t-000000.tar": 3}))
    report, _ = inspect_shards(shards, progress=False)
    messages = [str(p) for p in report.problems]
    assert "t-000002.tar: listed in the manifest but missing" in messages
    assert "t-000009.tar: not listed in the manifest (left over or foreign)" in messages
    assert any(m.startswith("t-000001.tar: unreadable tar") for m in messages)
    assert any(m.startswith("sizes.json: disagrees with the manifest") for m in messages)


def test_missing_manifest(tmp_path: Path) -> None:
    report, _ = inspect_shards(tmp_path, progress=False)
    assert not report.ok and report.problems[0].shard == "manifest.json"


def test_render_grid_wide_image(tmp_path: Path) -> None:
    sample = make_sample(1, height=20, width=700)
    path = render_grid([sample], tmp_path / "sub" / "one.png", panel_size=200)
    with Image.open(path) as img:
        assert img.size == (200, 230)
