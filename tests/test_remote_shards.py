"""Remote shards: ``pipe:`` commands and http URLs that fail mid-stream are retried or counted, never lost."""

from __future__ import annotations

import http.server
import logging
import re
import shlex
import threading
from collections import Counter
from pathlib import Path

import pytest
from test_pipeline import all_keys, as_list, key_of, run_epoch, write_shards

from data_pipelines.pipeline import ShardStream, resolve_shards


def keys(batches: list[list[str]]) -> list[str]:
    return [k for batch in batches for k in batch]


def flaky_pipe(shard: Path, fail_bytes: int, flag: Path | None) -> str:
    """A ``pipe:`` URL that sends ``fail_bytes`` bytes, stalls, then exits 3 (a dropped transfer): every
    time (``flag`` None), or only the first time (``flag`` marks that it already failed)."""
    head = f"head -c {fail_bytes} {shlex.quote(str(shard))}; sleep 0.5; exit 3"
    if flag is None:
        return f"pipe:sh -c {shlex.quote(head)}"
    once = f"if [ -e {flag} ]; then cat {shlex.quote(str(shard))}; else touch {flag}; {head}; fi"
    return f"pipe:sh -c {shlex.quote(once)}"


def pipe_stream(urls: list[str], mode: str, **kwargs) -> ShardStream:
    """A stream of sample keys, 3 per batch, retrying at once."""
    return ShardStream(resolve_shards(urls), key_of, as_list, mode=mode, batch_size=3, retry_delay=0.0,
                       **kwargs)


@pytest.mark.timeout(60)
def test_a_pipe_that_fails_midway_is_read_again_after_the_samples_it_gave(tmp_path, caplog):
    write_shards(tmp_path, [10, 10])
    flag = tmp_path / "failed-once"
    urls = [f"pipe:cat {tmp_path / 'part-000000.tar'}", flaky_pipe(tmp_path / "part-000001.tar", 30000, flag)]
    data = pipe_stream(urls, "once")
    with caplog.at_level(logging.WARNING):
        seen = keys(run_epoch(data))
    assert flag.exists(), "the flaky pipe never failed: the test does not test the retry"
    assert sorted(seen) == all_keys([10, 10]), Counter(seen).most_common(3)  # each sample exactly once
    assert data.errors.count == 0
    retries = [r.message for r in caplog.records if "reading it again" in r.message]
    assert len(retries) == 1 and "part-000001.tar" in retries[0]
    delivered_first = int(re.search(r"failed after (\d+) sample", retries[0]).group(1))
    assert 0 < delivered_first < 10  # the retry continued after what the first attempt gave


@pytest.mark.timeout(60)
def test_a_shard_that_keeps_failing_is_counted_with_what_it_gave(tmp_path, caplog):
    write_shards(tmp_path, [10, 10])
    urls = [f"pipe:cat {tmp_path / 'part-000000.tar'}", flaky_pipe(tmp_path / "part-000001.tar", 30000, None)]
    data = pipe_stream(urls, "once", retries=2)
    with caplog.at_level(logging.WARNING):
        seen = keys(run_epoch(data))
    assert data.errors.count == 1
    failure = next(r.message for r in caplog.records if "skipped a bad sample or shard" in r.message)
    assert "part-000001.tar" in failure and "after 3 attempts" in failure
    assert "the rest of the shard skipped" in failure
    given = int(re.search(r"(\d+) sample\(s\) read, the rest", failure).group(1))
    shard0 = [k for k in all_keys([10, 10]) if k.startswith("part0-")]
    shard1 = [k for k in all_keys([10, 10]) if k.startswith("part1-")]
    assert 0 < given < 10 and len(seen) == len(set(seen)) == 10 + given  # nothing twice, nothing invented
    assert set(shard0) <= set(seen) and set(seen) - set(shard0) == set(shard1[:given])


@pytest.mark.timeout(60)
def test_an_exact_epoch_is_filled_despite_a_failing_shard(tmp_path):
    write_shards(tmp_path, [9, 9])
    urls = [f"pipe:cat {tmp_path / 'part-000000.tar'}", flaky_pipe(tmp_path / "part-000001.tar", 20000, None)]
    data = pipe_stream(urls, "exact", retries=0, num_samples=18, shuffle_buffer=0)
    batches = run_epoch(data)
    assert len(batches) == len(data) == 6  # the worker re-read its shards for the lost samples
    assert data.errors.count >= 1
    assert {k for k in all_keys([9, 9]) if k.startswith("part0-")} <= set(keys(batches))


@pytest.mark.timeout(60)
def test_a_command_exiting_non_zero_is_counted_even_after_writing_the_whole_shard(tmp_path):
    write_shards(tmp_path, [6])
    command = f"cat {tmp_path / 'part-000000.tar'}; exit 3"
    data = pipe_stream([f"pipe:sh -c {shlex.quote(command)}"], "once", retries=1)
    seen = keys(run_epoch(data))
    assert data.errors.count == 1  # the command failed: reported, not trusted silently
    assert len(seen) == len(set(seen)) and set(seen) <= set(all_keys([6]))  # the re-read added no duplicate


class _TruncatingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; the first request for each file is cut off after half of its bytes."""

    cut: set[str] = set()

    def do_GET(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.cut:
            self.wfile.write(body)
            return
        self.cut.add(self.path)
        self.wfile.write(body[:len(body) // 2])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.mark.timeout(60)
def test_http_shards_cut_off_by_the_server_are_read_again(tmp_path):
    write_shards(tmp_path, [8, 8])
    handler = lambda *a, **kw: _TruncatingHandler(*a, directory=str(tmp_path), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        pattern = f"http://127.0.0.1:{server.server_port}/part-{{000000..000001}}.tar"
        data = pipe_stream([pattern], "once")
        seen = keys(run_epoch(data))
    finally:
        server.shutdown()
    assert sorted(seen) == all_keys([8, 8])
    assert data.errors.count == 0 and len(_TruncatingHandler.cut) == 2
