"""What a gateway admin runs it by: log lines, the access log, LogLevel, Prometheus
``/metrics``, ``shifter-imagegw --check``, layer cache pruning. A real gateway under
gunicorn (several workers), real munge credentials, a real registry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from world.gateway import Gateway
from world.imagebuild import File, RandomData, build_layer, push_image
from world.ports import free_port

SYS = "testsys"
ALICE = "shifter-alice"


@pytest.fixture(scope="module")
def gw(tmp_path_factory, munged, registry, test_users):
    work = tmp_path_factory.mktemp("gwops")
    gateway = Gateway(
        work,
        munge_socket=munged.socket,
        registry=registry,
        workers=3,
        extra={"AccessLog": str(work / "access.log"), "LogLevel": "INFO"},
    )
    with gateway:
        yield gateway


def push(registry, tmp_path: Path, repo: str, content: object = "x\n"):
    layer = build_layer([File("hello", content)], "gzip", tmp_path / repo.replace("/", "_"))
    push_image(registry, repo, "v1", [layer], {"Cmd": ["/hello"]})
    return f"{registry.host}/{repo}:v1", layer


def scrape(gw: Gateway) -> dict[str, float]:
    """Every sample of /metrics as ``name{label="v",...}`` → value."""
    resp = requests.get(gw.url + "/metrics", timeout=10, headers={"Connection": "close"})
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def log_lines(gw: Gateway, *words: str) -> list[str]:
    text = gw.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if all(w in line for w in words)]


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


# -- /metrics -----------------------------------------------------------------------------


def test_metrics_count_pulls_lookups_and_refused_credentials(gw, registry, tmp_path):
    tag, _ = push(registry, tmp_path, "ops/counted")
    before = scrape(gw)
    assert gw.wait_status(tag, user=ALICE)["status"] == "READY"
    ok = gw.request("GET", f"/api/lookup/{SYS}/docker/{tag}/", user=ALICE)
    assert ok.status_code == 200
    missing = gw.request("GET", f"/api/lookup/{SYS}/docker/{registry.host}/ops/none:1/")
    assert missing.status_code == 404
    refused = gw.request("GET", f"/api/list/{SYS}/", header="MUNGE:garbage:")
    assert refused.status_code == 401
    # Requests land on any of the 3 workers: every scrape adds up all of them.
    scrapes = [scrape(gw) for _ in range(6)]
    assert all(s == scrapes[0] for s in scrapes[1:])
    after = scrapes[-1]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta('shifter_imagegw_pulls_total{state="READY"}') == 1
    assert delta('shifter_imagegw_pulls_total{state="FAILURE"}') == 0
    assert delta("shifter_imagegw_pulls_started_total") == 1
    assert delta('shifter_imagegw_pull_duration_seconds_count{state="READY"}') == 1
    assert delta('shifter_imagegw_lookups_total{result="found"}') == 1
    assert delta('shifter_imagegw_lookups_total{result="not_found"}') == 1
    assert delta("shifter_imagegw_auth_failures_total") == 1
    # The queue is read from the shared store: nothing in flight now.
    assert not any(k.startswith("shifter_imagegw_queue_depth{") and v for k, v in after.items())


def test_metrics_directory_is_the_services_own(gw):
    # PROMETHEUS_MULTIPROC_DIR: made by the service under StateDirectory, per worker files.
    mdir = gw.workdir / "state" / "prometheus"
    assert mdir.is_dir() and any(mdir.glob("*.db"))


# -- log lines ----------------------------------------------------------------------------


def test_a_failed_pull_leaves_one_log_line_with_its_reason(gw, registry):
    tag = f"{registry.host}/ops/never-pushed:1"
    rec = gw.wait_status(tag, user=ALICE)
    assert rec["status"] == "FAILURE"
    lines = wait_for(lambda: log_lines(gw, "pull failed", f"tag={tag} "))
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"user={ALICE} system={SYS}" in line
    assert re.search(r"duration=\d+\.\ds", line)
    assert line.endswith(f"reason={rec['status_message']}")
    assert len(log_lines(gw, "pull start", f"tag={tag} ")) == 1
    assert log_lines(gw, "pull done", f"tag={tag} ") == []


def test_a_pull_logs_start_and_done_with_id_and_duration(gw, registry, tmp_path):
    tag, _ = push(registry, tmp_path, "ops/logged", "logged\n")
    rec = gw.wait_status(tag, user=ALICE)
    assert rec["status"] == "READY"
    done = wait_for(lambda: log_lines(gw, "pull done", f"tag={tag} "))
    assert len(done) == 1
    assert f"user={ALICE} system={SYS} tag={tag} id={rec['id']} duration=" in done[0]
    assert len(log_lines(gw, "pull start", f"user={ALICE}", f"tag={tag} ")) == 1


def test_refused_credentials_and_admin_actions_are_logged(gw, registry, tmp_path):
    resp = gw.request("GET", f"/api/list/{SYS}/", header="MUNGE:refused-for-the-log:")
    assert resp.status_code == 401
    assert resp.json()["message"].count("authentication failed") == 1, resp.json()  # said once
    lines = wait_for(lambda: log_lines(gw, "credential refused", "peer=127.0.0.1"))
    assert lines and "reason=" in lines[-1] and f"GET /api/list/{SYS}/" in lines[-1]
    tag, _ = push(registry, tmp_path, "ops/expired", "expire me\n")
    rec = gw.wait_status(tag)
    resp = gw.request("GET", f"/api/expire/{SYS}/docker/{tag}/", user="root")
    assert resp.status_code == 200
    assert wait_for(
        lambda: log_lines(gw, "expire user=root", f"tag={tag} ", f"id={rec['id']}", "expired=True")
    )
    refused = gw.request("GET", f"/api/autoexpire/{SYS}/", user=ALICE)
    assert refused.status_code == 403
    assert wait_for(lambda: log_lines(gw, "admin refused action=autoexpire", f"user={ALICE}"))
    assert gw.request("GET", f"/api/autoexpire/{SYS}/", user="root").status_code == 200
    assert wait_for(lambda: log_lines(gw, "autoexpire user=root", f"system={SYS}"))


def test_access_log_in_gunicorn_format(gw):
    gw.request("GET", "/healthz", auth=False)
    access = gw.workdir / "access.log"
    line = wait_for(
        lambda: [x for x in access.read_text().splitlines() if '"GET /healthz HTTP/1.1" 200' in x]
    )
    # gunicorn's default: host - - [time] "request" status bytes "referer" "agent"
    assert re.match(r'127\.0\.0\.1 - - \[[^]]+\] "GET /healthz HTTP/1.1" 200 \d+ "-" "', line[-1])


def test_info_level_logs_no_debug_lines(gw):
    gw.request("GET", f"/api/lookup/{SYS}/docker/ops/not-there:1/", user=ALICE)
    gw.request("GET", "/healthz", auth=False)
    assert log_lines(gw, "lookup not found") == []
    assert log_lines(gw, " DEBUG ") == []


@pytest.mark.parametrize("level", ["DEBUG", "ERROR"])
def test_log_level_decides_what_is_logged(tmp_path, munged, registry, test_users, level):
    gateway = Gateway(
        tmp_path, munge_socket=munged.socket, registry=registry, extra={"LogLevel": level}
    )
    with gateway:
        gateway.request("GET", f"/api/lookup/{SYS}/docker/ops/not-there:1/", user=ALICE)
        gateway.request("GET", f"/api/list/{SYS}/", header="MUNGE:garbage:")
        time.sleep(0.5)
    # The service's Prometheus files went with it.
    assert not (tmp_path / "state" / "prometheus").exists()
    lookup = log_lines(gateway, "lookup not found", f"user={ALICE}")
    refused = log_lines(gateway, "credential refused")
    if level == "DEBUG":
        assert len(lookup) == 1 and len(refused) == 1
    else:
        assert lookup == [] and refused == []
        assert log_lines(gateway, " INFO ") == [] and log_lines(gateway, " WARNING ") == []


# -- --check --------------------------------------------------------------------------------


def run_check(config: dict, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "imagegw.service", "--check", "-c", str(path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_a_sound_config(gw):
    out = run_check(gw.config, gw.workdir / "check-ok.json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("check-ok.json: OK")


def test_check_lists_every_problem_and_suggests_keys(gw, tmp_path, test_users):
    config = json.loads(json.dumps(gw.config))
    config["CacheDirectroy"] = config.pop("CacheDirectory")  # a typo
    config["LogLevel"] = "LOUD"
    del config["AccessLog"]
    root_only = tmp_path / "root-only"
    root_only.mkdir(mode=0o755)
    config["ExpandDirectory"] = str(root_only)
    config["MongoDBURI"] = f"mongodb://127.0.0.1:{free_port()}/"  # nothing listens there
    plat = config["Platforms"][SYS]
    plat["mungeSocketPath"] = str(tmp_path / "no-munge.socket")
    plat["local"]["imageDir"] = str(tmp_path / "no-such-dir")
    started = time.monotonic()
    out = run_check(config, tmp_path / "bad.json", "--user", ALICE)
    assert time.monotonic() - started < 30  # the MongoDB check times out quickly
    assert out.returncode == 1
    err = out.stderr
    wanted = [
        "WARNING: .* unknown key CacheDirectroy; did you mean CacheDirectory\\?",
        "ERROR: .*required key CacheDirectory is missing",
        "ERROR: .*LogLevel must be one of DEBUG, INFO",
        f"ERROR: .*ExpandDirectory {root_only} is not writable by the service user {ALICE}",
        f"ERROR: .*local.imageDir {tmp_path}/no-such-dir does not exist",
        f"ERROR: .*mungeSocketPath {tmp_path}/no-munge.socket: No such file",
        "ERROR: .*MongoDBURI: cannot reach MongoDB within",
    ]
    for pattern in wanted:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    assert re.search(r"6 error\(s\), 1 warning\(s\)", err), err
    # As root the expand dir is fine; everything else still fails.
    as_root = run_check(config, tmp_path / "bad.json", "--user", "root")
    assert "ExpandDirectory" not in as_root.stderr and "5 error(s)" in as_root.stderr


def test_check_refuses_a_path_that_is_not_a_socket(gw, tmp_path):
    config = json.loads(json.dumps(gw.config))
    fake = tmp_path / "socket"
    fake.write_text("")
    config["Platforms"][SYS]["mungeSocketPath"] = str(fake)
    out = run_check(config, tmp_path / "c.json")
    assert out.returncode == 1 and f"mungeSocketPath {fake} is not a socket" in out.stderr


# -- layer cache pruning ------------------------------------------------------------------------


def test_layer_cache_is_pruned_to_its_size_least_recently_used_first(
    tmp_path, munged, registry, test_users
):
    tag_a, layer_a = push(registry, tmp_path, "ops/prune-a", RandomData(4000, seed="a"))
    tag_b, layer_b = push(registry, tmp_path, "ops/prune-b", RandomData(4000, seed="b"))
    limit = max(layer_a.size, layer_b.size) * 3 // 2  # one layer fits, not two
    gateway = Gateway(
        tmp_path / "gw", munge_socket=munged.socket, registry=registry,
        extra={"LayerCacheMaxSize": limit},
    )  # fmt: skip
    cache = tmp_path / "gw" / "cache" / "sha256"

    def blobs() -> set[str]:
        return {p.name for p in cache.glob("*") if "." not in p.name}

    with gateway:
        assert gateway.wait_status(tag_a)["status"] == "READY"
        assert blobs() == {layer_a.digest[7:]}
        assert gateway.wait_status(tag_b)["status"] == "READY"
        # Pruned at the end of the pull (after its layers were released): A was used least
        # recently, so it goes, and B stays.
        assert wait_for(lambda: blobs() == {layer_b.digest[7:]})
        total = sum(os.stat(cache / b).st_size for b in blobs())
        assert total <= limit
        assert wait_for(lambda: log_lines(gateway, "layer cache pruned removed=1"))


def test_the_launch_path_imports_nothing_of_the_gateway():
    # shifter, shifterimg and the runtime's config code run on every node at every
    # launch: the gateway's config, metrics and web stack must stay out of them.
    code = (
        "import sys, pkgutil, shifter.launch, shifter.shifterimg, udiroot\n"
        "for m in pkgutil.iter_modules(udiroot.__path__): __import__('udiroot.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('imagegw', 'prometheus_client', 'flask', 'gunicorn', 'pymongo'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


# -- metrics rows at a stop -----------------------------------------------------------------


def test_a_stopping_gateway_writes_its_queued_metrics_rows(tmp_path, munged, registry, test_users):
    # Rows are queued and written once a second per worker (imagegw/metrics_batch.py); a
    # gateway stopped right after its lookups (SIGTERM, as systemctl stop sends) must
    # write them all before its workers exit.
    tag, _ = push(registry, tmp_path, "ops/rowsatstop")
    gateway = Gateway(tmp_path / "gw", munge_socket=munged.socket, registry=registry, workers=3)
    with gateway:
        assert gateway.wait_status(tag, user=ALICE)["status"] == "READY"
        path = f"/api/lookup/{SYS}/docker/{tag}/"
        for _ in range(12):
            assert gateway.request("GET", path, user=ALICE).status_code == 200
    from imagegw.store import open_store

    store = open_store({"StateDirectory": str(gateway.workdir / "state")})
    rows = [r for r in store.last_metrics(100) if r["tag"] == tag]
    store.close()
    assert len(rows) == 12 and {r["user"] for r in rows} == {ALICE}
