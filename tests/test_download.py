"""Tests of download.py."""
import hashlib
import http.server
import threading
import time

import h5py
import pytest

import download
from data import load_trajectories
from tests.helpers import assert_one_line_error, run_cli, write_d4rl


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves server.body with HTTP Range support, misbehaving as server.plan says: one entry per
    request, the last repeating. "ok"; "drop": half the bytes, then close; "stall": half, then
    silence; "long"/"short": announce 1000 bytes more/less than the file has ("long" ignores
    Range); "no-range": ignore Range; "busy": 503; "missing": 404."""

    def do_GET(self):
        srv = self.server
        how = srv.plan[min(len(srv.ranges), len(srv.plan) - 1)]
        srv.ranges.append(self.headers.get("Range"))
        if how in ("busy", "missing"):
            return self.send_error(503 if how == "busy" else 404)
        body, start = srv.body, 0
        if self.headers.get("Range") and how not in ("no-range", "long"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        announced = len(payload) + {"long": 1000, "short": -1000}.get(how, 0)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        if how in ("drop", "stall"):
            self.wfile.write(payload[:len(payload) // 2])
            self.wfile.flush()
            if how == "stall":
                time.sleep(1.5)
            return
        self.wfile.write(payload[:announced])

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server(tmp_path):
    """A local server for one file; set .body and .plan, read .ranges (the Range header of each
    request) and .url."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHandler)
    server.body = write_d4rl(tmp_path / "source.hdf5", [300] * 4).read_bytes()
    server.plan, server.ranges = ["ok"], []
    server.url = f"http://127.0.0.1:{server.server_address[1]}/halfcheetah_expert-v2.hdf5"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def fetch(server, dest, **kw):
    return download.download("halfcheetah-expert-v2", dest, url=server.url, backoff=0, timeout=0.5, **kw)


@pytest.mark.parametrize("plan, asks_resume", [
    (["ok"], False),
    (["drop", "ok"], True),          # resumes from the byte where the connection dropped
    (["stall", "ok"], True),         # a dead connection times out, then resumes
    (["busy", "drop", "ok"], True),  # 503 is retried
    (["drop", "no-range"], True),    # a server that ignores Range: start over, still correct
])
def test_download_survives_a_bad_connection_and_verifies(tmp_path, flaky_server, plan, asks_resume):
    flaky_server.plan = plan
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    fetch(flaky_server, dest)
    assert dest.read_bytes() == flaky_server.body
    assert len(flaky_server.ranges) == len(plan)
    assert (flaky_server.ranges[-1] == f"bytes={len(flaky_server.body) // 2}-") == asks_resume
    recorded = (tmp_path / "data" / "halfcheetah-expert-v2.hdf5.sha256").read_text()
    assert recorded == f"{hashlib.sha256(flaky_server.body).hexdigest()}  {dest.name}\n"
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name, dest.name + ".sha256"]
    load_trajectories(dest)


@pytest.mark.parametrize("plan, body, problem", [
    (["long"], None, "connection ended after"),  # announces more than it ever sends
    (["short"], None, "not a usable D4RL dataset"),  # complete by its own header, but truncated
    (["ok"], b"<html>Please log in to the hotel wifi</html>", "not a usable D4RL dataset"),
    (["missing"], None, "server answered 404"),
])
def test_download_never_leaves_a_bad_file_under_the_final_name(tmp_path, flaky_server, plan, body, problem):
    flaky_server.plan = plan
    flaky_server.body = body or flaky_server.body
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    with pytest.raises(download.DownloadError, match=problem) as err:
        fetch(flaky_server, dest, retries=2)
    assert "\n" not in str(err.value) and flaky_server.url in str(err.value)
    if plan == ["long"]:  # the bytes it did send are kept for a later resume, and it says so
        assert "run again to resume" in str(err.value) and len(flaky_server.ranges) == 3
        assert [p.name for p in dest.parent.iterdir()] == [dest.name + ".part"]
    else:
        assert not dest.parent.exists()  # not even the data/ folder it made


def test_interrupted_download_resumes_on_the_next_run(tmp_path, flaky_server):
    flaky_server.plan = ["drop"]
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    with pytest.raises(download.DownloadError, match="kept in"):
        fetch(flaky_server, dest, retries=0)
    flaky_server.plan, flaky_server.ranges = ["ok"], []
    fetch(flaky_server, dest)
    assert flaky_server.ranges == [f"bytes={len(flaky_server.body) // 2}-"]
    assert dest.read_bytes() == flaky_server.body


def test_a_changed_file_fails_its_recorded_checksum(tmp_path, flaky_server):
    dest = tmp_path / "data" / "halfcheetah-expert-v2.hdf5"
    fetch(flaky_server, dest)
    fetch(flaky_server, dest)  # present and intact: verified, not fetched again
    assert len(flaky_server.ranges) == 1
    with h5py.File(dest, "a") as f:
        f["rewards"][0] += 1.0
    with pytest.raises(download.DownloadError, match="SHA-256 no longer matches"):
        fetch(flaky_server, dest)
    proc = run_cli("train.py", "--data", str(dest), "--max-steps", "1")
    assert_one_line_error(proc, str(dest), "SHA-256")


def test_unreachable_host_says_offline_and_names_data_flag(tmp_path):
    dest = tmp_path / "data" / "x.hdf5"
    with pytest.raises(download.DownloadError, match="Offline.*--data"):
        download.download("halfcheetah-expert-v2", dest, url="http://127.0.0.1:9/x.hdf5", retries=1,
                          backoff=0)
    assert not dest.parent.exists()


def test_download_names_every_dataset_and_lists_their_sizes(flaky_server, monkeypatch, capsys):
    proc = run_cli("download.py", "--help")
    assert proc.returncode == 0
    for name in download.DATASETS:
        body, quality = name.removesuffix("-v2").split("-", 1)
        assert f"{{{','.join(download.BODIES)}}}" in proc.stdout and quality in proc.stdout
    monkeypatch.setattr(download, "DATASETS", {"halfcheetah-expert-v2": flaky_server.url,
                                               "hopper-expert-v2": "http://127.0.0.1:9/none.hdf5"})
    download.main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "halfcheetah-expert-v2" and f"{len(flaky_server.body) / 1e6:,.0f} MB" in lines[0]
    assert lines[1].split()[0] == "hopper-expert-v2" and "size unknown" in lines[1]


def test_dataset_addresses_follow_d4rl_naming():
    assert len(download.DATASETS) == 18
    assert download.DATASETS["walker2d-full-replay-v2"].endswith("/gym_mujoco_v2/walker2d_full_replay-v2.hdf5")
    assert download.DATASETS["halfcheetah-medium-replay-v2"].endswith(
        "/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5")
