"""The image gateway as nodes and users see it: a real gunicorn gateway, real munge credentials made
as real users, a real registry. Scenarios of docs/behaviour.md, 'Scenarios the tests cover'."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from world import catalog
from world.gateway import Gateway, munge_cred
from world.imagebuild import File, build_layer, push_image
from world.reftree import mksquashfs

from imagegw.fasthash import fasthash

SYS = "testsys"
RECORD_FIELDS = {
    "id",
    "system",
    "itype",
    "tag",
    "status",
    "userACL",
    "groupACL",
    "ENV",
    "ENTRY",
    "WORKDIR",
    "LABELS",
    "last_pull",
    "status_message",
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, munged, registry, test_users):
    work = tmp_path_factory.mktemp("gateway")
    gw = Gateway(
        work, munge_socket=munged.socket, registry=registry, extra={"ImportUsers": "shifter-alice"}
    )
    with gw:
        yield gw


@pytest.fixture(scope="module")
def basic(registry, tmp_path_factory):
    return catalog.basic(registry, tmp_path_factory.mktemp("basic"), repo="gw/basic")


def _push(registry, tmp_path, repo, tag="v1", content="x\n"):
    layer = build_layer([File("hello", content)], "gzip", tmp_path)
    return push_image(registry, repo, tag, [layer], {"Cmd": ["/hello"], "Env": ["A=1"]})


# -- authentication ------------------------------------------------------------------------


def test_requests_without_a_credential_are_refused(gateway, basic):
    for method, path in [
        ("GET", f"/api/list/{SYS}/"),
        ("GET", f"/api/lookup/{SYS}/docker/{basic.ref()}/"),
        ("POST", f"/api/pull/{SYS}/docker/{basic.ref()}/"),
    ]:
        resp = gateway.request(method, path, auth=False)
        assert resp.status_code == 401, path
        assert resp.json()["status"] == 401 and "credential" in resp.json()["message"]
    assert gateway.request("GET", "/", auth=False).status_code == 200
    assert gateway.request("GET", "/healthz", auth=False).status_code == 200


def test_garbage_replayed_and_expired_credentials(gateway, munged):
    resp = gateway.request("GET", f"/api/list/{SYS}/", header="MUNGE:garbage:")
    assert resp.status_code == 401
    # Said once, in words a user can act on, munge's own reason kept for the admin.
    for header in ("MUNGE:garbage:", "garbage"):
        message = gateway.request("GET", f"/api/list/{SYS}/", header=header).json()["message"]
        assert message.startswith("authentication failed: the request did not carry a munge "
                                  "credential (munge: "), message
        assert message.count("authentication failed") == 1, message
    cred = munge_cred(munged.socket)
    assert gateway.request("GET", f"/api/list/{SYS}/", header=cred).status_code == 200
    again = gateway.request("GET", f"/api/list/{SYS}/", header=cred)
    assert again.status_code == 401 and "Replayed Credential" in again.json()["message"]
    expiring = subprocess.run(
        ["munge", "-S", munged.socket, "-t", "1", "-n"], capture_output=True, text=True, check=True
    ).stdout.strip()
    time.sleep(2.2)
    late = gateway.request("GET", f"/api/list/{SYS}/", header=expiring)
    assert late.status_code == 401 and "Expired Credential" in late.json()["message"]


def test_image_paths_what_matches_and_what_is_no_api_path(gateway, basic):
    # The image routes take <system>/<type>/<tag> in one piece (imagegw/api.py,
    # ImageConverter): the tag may hold slashes, the trailing slash is optional, and a
    # path missing a part is "no such API path", as when werkzeug matched part by part.
    gateway.wait_status(basic.ref())
    for path in (f"/api/lookup/{SYS}/docker/{basic.ref()}/",
                 f"/api/lookup/{SYS}/docker/{basic.ref()}"):
        resp = gateway.request("GET", path)
        assert resp.status_code == 200 and resp.json()["tag"] == [basic.ref()], path
    for path in (f"/api/lookup/{SYS}/docker/", f"/api/lookup/{SYS}/", f"/api/lookup/{SYS}",
                 "/api/lookup/", f"/api/expire/{SYS}/docker/"):
        resp = gateway.request("GET", path)
        assert resp.status_code == 404, path
        assert resp.json()["message"] == f"no such API path: {path}", path
    unknown = gateway.request("GET", f"/api/lookup/{SYS}/nosuchtype/{basic.ref()}/")
    assert unknown.status_code == 400 and "unknown image type" in unknown.json()["message"]
    assert gateway.request("GET", f"/api/lookup/nosuchsystem/docker/{basic.ref()}/"
                           ).status_code == 404


def test_unknown_system_is_404(gateway):
    resp = gateway.request("GET", "/api/list/nosuchsystem/")
    assert resp.status_code == 404 and "nosuchsystem" in resp.json()["message"]


# -- pull, lookup, list ----------------------------------------------------------------


def test_pull_then_lookup_and_list(gateway, basic):
    rec = gateway.wait_status(basic.ref())
    assert rec["status"] == "READY", rec
    assert set(rec) >= RECORD_FIELDS
    image_id = basic.config_digest.split(":")[1]
    assert rec["id"] == image_id and rec["tag"] == [basic.ref()]
    assert rec["ENTRY"] == basic.config.get("Entrypoint", "MISSING") or rec["ENTRY"]
    looked = gateway.request("GET", f"/api/lookup/{SYS}/docker/{basic.ref()}/")
    assert looked.status_code == 200 and looked.json()["id"] == image_id
    assert (gateway.image_dir / f"{image_id}.squashfs").exists()
    assert (gateway.image_dir / f"{image_id}.meta").exists()
    listed = gateway.request("GET", f"/api/list/{SYS}/").json()["list"]
    assert image_id in [r["id"] for r in listed]
    bogus = gateway.request("GET", f"/api/lookup/{SYS}/docker/{basic.host}/gw/none:v9/")
    assert bogus.status_code == 404 and bogus.json()["message"] == "image not found"
    # Beyond Shifter: the tag index the runtime reads without asking the gateway.
    from urllib.parse import quote

    index = gateway.image_dir / "tags" / "docker" / quote(basic.ref(), safe="")
    assert index.read_text().strip() == image_id


def test_tag_without_version_gets_latest(gateway, registry, tmp_path):
    _push(registry, tmp_path, "gw/latest", tag="latest")
    rec = gateway.wait_status(f"{registry.host}/gw/latest")
    assert rec["status"] == "READY" and rec["tag"] == [f"{registry.host}/gw/latest:latest"]


def test_private_pull_acl_and_meta(gateway, registry, tmp_path, test_users):
    _push(registry, tmp_path, "gw/private", content="secret\n")
    tag = f"{registry.host}/gw/private:v1"
    alice_uid, alice_gid = test_users["shifter-alice"]
    bob_uid, _ = test_users["shifter-bob"]
    rec = gateway.wait_status(tag, user="shifter-alice", body={"allowed_uids": str(bob_uid)})
    assert rec["status"] == "READY"
    assert sorted(rec["userACL"]) == sorted([bob_uid, alice_uid])  # requester appended
    meta = (gateway.image_dir / f"{rec['id']}.meta").read_text()
    assert f"USERACL: {','.join(str(u) for u in sorted([alice_uid, bob_uid]))}" in meta
    path = f"/api/lookup/{SYS}/docker/{tag}/"
    assert gateway.request("GET", path, user="shifter-bob").status_code == 200
    assert gateway.request("GET", path, user="shifter-alice").status_code == 200
    assert gateway.request("GET", path, user="nobody").status_code == 404
    listed = gateway.request("GET", f"/api/list/{SYS}/", user="nobody").json()["list"]
    assert rec["id"] not in [r["id"] for r in listed]
    # A public pull of the same tag clears the ACLs and rewrites the meta file.
    time.sleep(10.5)  # past the "recent" window in which a READY record is returned as is
    pub = gateway.wait_status(tag, user="shifter-alice")
    assert pub["userACL"] == [] or pub["userACL"] == "MISSING"
    assert "USERACL" not in (gateway.image_dir / f"{rec['id']}.meta").read_text()
    assert gateway.request("GET", path, user="nobody").status_code == 200


def test_lookup_answers_follow_a_change_made_by_another_process(
    gateway, registry, tmp_path, test_users
):
    # Every worker keeps the record a lookup found and the JSON it answered with
    # (imagegw/manager.py, imagegw/api.py) while the store's change count stands still.
    # A change committed by any other process (another worker, another gateway process
    # on the host; here this test itself) must show in the very next lookup of every
    # worker: the answer's fields, the ACL checked against the caller, the status.
    from imagegw.store.sqlite import SQLiteStore

    _push(registry, tmp_path, "gw/cached", content="c\n")
    tag = f"{registry.host}/gw/cached:v1"
    rid = gateway.wait_status(tag)
    path = f"/api/lookup/{SYS}/docker/{tag}/"

    def answers(user: str = "shifter-bob") -> list[tuple[int, object]]:
        # 8 requests: each of the 2 workers answers some of them
        out = []
        for _ in range(8):
            resp = gateway.request("GET", path, user=user)
            out.append((resp.status_code, resp.json().get("LABELS")))
        return out

    assert {code for code, _ in answers()} == {200}  # now cached in every worker
    store = SQLiteStore(gateway.workdir / "state" / "shifter-imagegw.sqlite")
    try:
        rec = store.find_tagged(SYS, tag)
        assert rec is not None and rec["id"] == rid["id"]
        store.update(rec["_id"], {"LABELS": {"changed": "yes"}})
        assert answers() == [(200, {"changed": "yes"})] * 8
        alice_uid, _ = test_users["shifter-alice"]
        store.update(rec["_id"], {"private": True, "userACL": [alice_uid]})
        assert [code for code, _ in answers("shifter-bob")] == [404] * 8
        assert [code for code, _ in answers("shifter-alice")] == [200] * 8
        store.update(rec["_id"], {"status": "EXPIRED"})
        assert [code for code, _ in answers("shifter-alice")] == [404] * 8
    finally:
        store.close()


def test_group_acl_with_supplementary_group(gateway, registry, tmp_path, test_users):
    _push(registry, tmp_path, "gw/groupacl", content="g\n")
    tag = f"{registry.host}/gw/groupacl:v1"
    subprocess.run(["groupadd", "-f", "shifter-team"], check=True)
    subprocess.run(["usermod", "-a", "-G", "shifter-team", "shifter-bob"], check=True)
    import grp

    team = grp.getgrnam("shifter-team").gr_gid
    rec = gateway.wait_status(tag, user="shifter-alice", body={"allowed_gids": str(team)})
    assert team in rec["groupACL"]
    path = f"/api/lookup/{SYS}/docker/{tag}/"
    assert gateway.request("GET", path, user="shifter-bob").status_code == 200  # via team
    assert gateway.request("GET", path, user="nobody").status_code == 404


def test_user_removed_from_a_group_loses_its_images_within_a_second(
    gateway, registry, tmp_path, test_users
):
    # The gateway keeps each caller's groups in memory (imagegw/auth.py): taking a user
    # out of a group in /etc/group must still end their access to the group's images at
    # once (within the second after which the files are looked at again), in every worker.
    _push(registry, tmp_path, "gw/leaver", content="l\n")
    tag = f"{registry.host}/gw/leaver:v1"
    subprocess.run(["groupadd", "-f", "shifter-leavers"], check=True)
    try:
        subprocess.run(["usermod", "-a", "-G", "shifter-leavers", "shifter-bob"], check=True)
        import grp

        gid = grp.getgrnam("shifter-leavers").gr_gid
        rec = gateway.wait_status(tag, user="shifter-alice", body={"allowed_gids": str(gid)})
        assert gid in rec["groupACL"]
        path = f"/api/lookup/{SYS}/docker/{tag}/"
        time.sleep(1.1)  # the group file as it is now is the one every worker has seen
        for _ in range(6):  # every worker answers, and keeps bob's groups
            assert gateway.request("GET", path, user="shifter-bob").status_code == 200
        subprocess.run(["gpasswd", "-d", "shifter-bob", "shifter-leavers"], check=True,
                       capture_output=True)
        time.sleep(1.1)
        answers = [gateway.request("GET", path, user="shifter-bob").status_code
                   for _ in range(6)]
        assert answers == [404] * 6
    finally:
        subprocess.run(["groupdel", "shifter-leavers"], check=False)


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (f"/api/pull/{SYS}/docker/UPPER/case:1/", None, "malformed image tag"),
        (f"/api/pull/{SYS}/docker/ok/tag:1/", b"{not json", "JSON object"),
        (f"/api/pull/{SYS}/docker/ok/tag:1/", {"allowed_uids": "12,abc"}, "not a numeric id"),
        (f"/api/pull/{SYS}/docker/ok/tag:1/", {"allowed_gids": {"x": 1}}, "numeric ids"),
        (f"/api/pull/{SYS}/weird/ok:1/", None, "unknown image type"),
    ],
)
def test_bad_requests_are_400_and_write_nothing(gateway, path, body, words):
    before = set(os.listdir(gateway.image_dir)) if gateway.image_dir.exists() else set()
    resp = gateway.request("POST", path, body=body)
    assert resp.status_code == 400, resp.text
    assert words in resp.json()["message"]
    after = set(os.listdir(gateway.image_dir)) if gateway.image_dir.exists() else set()
    assert after == before
    queue = gateway.request("GET", f"/api/queue/{SYS}/").json()["list"]
    assert all("ok/tag" not in q["image"] for q in queue)


def test_failed_pull_says_why(gateway, registry):
    rec = gateway.wait_status(f"{registry.host}/gw/does-not-exist:v1")
    assert rec["status"] == "FAILURE" and "not found" in rec["status_message"]
    listed = gateway.request("GET", f"/api/list/{SYS}/").json()["list"]
    assert all(r["status"] == "READY" for r in listed)  # list excludes FAILURE


# -- many pulls at once ----------------------------------------------------------------


def test_fifty_simultaneous_pulls_over_two_workers_pull_once(gateway, registry, tmp_path):
    pushed = _push(registry, tmp_path, "gw/stampede", content=os.urandom(1 << 20).hex())
    tag = f"{registry.host}/gw/stampede:v1"
    registry.reset_log_mark()
    statuses, pids = [], set()
    creds = [munge_cred(gateway.munge_socket) for _ in range(50)]
    barrier = threading.Barrier(50)

    def one(cred: str) -> None:
        barrier.wait()
        resp = gateway.request("POST", f"/api/pull/{SYS}/docker/{tag}/", header=cred)
        statuses.append(resp.status_code)

    threads = [threading.Thread(target=one, args=(c,)) for c in creds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 50
    rec = gateway.wait_status(tag)
    assert rec["status"] == "READY"
    for layer in pushed.layers:
        assert registry.blob_gets(layer.digest) == 1
    for _ in range(10):
        pids.add(gateway.request("GET", "/healthz", auth=False).json()["pid"])
    assert len(pids) >= 1


# -- admin ---------------------------------------------------------------------------


def test_expire_is_admin_only_and_removes_files(gateway, registry, tmp_path):
    _push(registry, tmp_path, "gw/expire", content="e\n")
    tag = f"{registry.host}/gw/expire:v1"
    rec = gateway.wait_status(tag)
    path = f"/api/expire/{SYS}/docker/{tag}/"
    denied = gateway.request("GET", path, user="shifter-alice")
    assert denied.status_code == 403 and "not an admin" in denied.json()["message"]
    assert gateway.request("GET", path).json() == {"status": True}
    assert not (gateway.image_dir / f"{rec['id']}.squashfs").exists()
    assert not (gateway.image_dir / f"{rec['id']}.meta").exists()
    assert gateway.request("GET", f"/api/lookup/{SYS}/docker/{tag}/").status_code == 404
    assert gateway.request("GET", path).status_code == 404


def test_metrics_limit_and_order(gateway, basic):
    gateway.wait_status(basic.ref())
    for _ in range(3):
        gateway.request("GET", f"/api/lookup/{SYS}/docker/{basic.ref()}/", user="shifter-bob")
    # Each worker writes its lookups' rows once a second (imagegw/metrics_batch.py): the
    # worker answering /api/metrics writes its own first, the others' follow within 1 s.
    deadline = time.monotonic() + 3
    while True:
        rows = gateway.request("GET", f"/api/metrics/{SYS}/?limit=100").json()
        bobs = [r for r in rows if r["user"] == "shifter-bob" and r["tag"] == basic.ref()]
        if len(bobs) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(bobs) == 3, rows
    rows = gateway.request("GET", f"/api/metrics/{SYS}/?limit=2").json()
    assert len(rows) == 2 and rows[0]["time"] <= rows[1]["time"]
    assert rows[-1]["user"] == "shifter-bob" and rows[-1]["tag"] == basic.ref()
    assert len(gateway.request("GET", f"/api/metrics/{SYS}/?limit=101").json()) <= 100
    assert gateway.request("GET", f"/api/metrics/{SYS}/?limit=x").status_code == 400
    assert gateway.request("GET", f"/api/metrics/{SYS}/", user="shifter-alice").status_code == 403


def test_queue_lists_in_flight_pulls(gateway, registry, tmp_path, fault_proxy):
    _push(registry, tmp_path, "gw/slow", content="slow\n")
    proxy = fault_proxy(registry)
    proxy.delay(r"/blobs/", 3.0)
    tag = f"{proxy.host}/gw/slow:v1"
    first = gateway.request("POST", f"/api/pull/{SYS}/docker/{tag}/").json()
    assert first["status"] in ("PENDING", "PULLING")
    queue = gateway.request("GET", f"/api/queue/{SYS}/").json()["list"]
    assert tag in [q["image"] for q in queue]
    assert gateway.wait_status(tag)["status"] == "READY"
    queue = gateway.request("GET", f"/api/queue/{SYS}/").json()["list"]
    assert tag not in [q["image"] for q in queue]


# -- import ------------------------------------------------------------------------------


def _squashfs(tmp_path: Path, content: str) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text(content)
    out = tmp_path / "img.squashfs"
    mksquashfs(tree, out)
    os.chmod(out, 0o644)
    os.chmod(tmp_path, 0o755)
    return out


def _wait_import(gateway, tag, user):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        resp = gateway.request("GET", f"/api/lookup/{SYS}/custom/{tag}/", user=user)
        if resp.status_code == 200:
            return resp.json()
        time.sleep(0.2)
    raise AssertionError(gateway.log())


def test_import_by_allowed_user(gateway, tmp_path):
    image = _squashfs(tmp_path, "imported\n")
    body = {"filepath": str(image), "format": "squashfs"}
    resp = gateway.request(
        "POST", f"/api/doimport/{SYS}/custom/mine:v1/", user="shifter-alice", body=body
    )
    assert resp.status_code == 200, resp.text
    rec = _wait_import(gateway, "mine:v1", "shifter-alice")
    assert rec["id"] == fasthash(image) == hashlib.sha256(image.read_bytes()).hexdigest()
    meta = (gateway.image_dir / f"{rec['id']}.meta").read_text()
    assert "USER: shifter-alice" in meta and "FORMAT: squashfs" in meta


@pytest.mark.parametrize(
    ("user", "body", "status", "words"),
    [
        ("shifter-bob", {"filepath": "/etc/hostname"}, 403, "ImportUsers"),
        ("shifter-alice", {"filepath": "/no/such/file.squashfs"}, 400, "cannot read"),
        ("shifter-alice", {"filepath": "/etc/hostname"}, 400, "not a squashfs"),
        ("shifter-alice", {"filepath": "relative.squashfs"}, 400, "absolute path"),
        ("shifter-alice", {"filepath": "/etc/hostname", "format": "ext4"}, 400, "squashfs only"),
    ],
)
def test_bad_imports(gateway, user, body, status, words):
    resp = gateway.request("POST", f"/api/doimport/{SYS}/custom/bad:v1/", user=user, body=body)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["message"]


@pytest.mark.parametrize(
    ("remove", "words"),
    [
        (("CacheDirectory",), "required key CacheDirectory is missing"),
        (("Platforms", "testsys", "local"), "Platforms.testsys: required key local.imageDir"),
        (
            ("Platforms", "testsys", "mungeSocketPath"),
            "Platforms.testsys: required key mungeSocketPath",
        ),
    ],
)
def test_gateway_refuses_to_start_on_a_config_missing_a_key(tmp_path, munged, remove, words):
    gw = Gateway(tmp_path, munge_socket=munged.socket)
    section = gw.config
    for key in remove[:-1]:
        section = section[key]
    del section[remove[-1]]
    gw.write_config()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagegw.service",
            "-c",
            str(gw.config_path),
            "--bind",
            "127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    # The file is named by its path, so an admin with several knows which one.
    assert out.stderr.strip().startswith(f"ERROR: {gw.config_path}: {words}")
    assert not (tmp_path / "state").exists()  # nothing created before the config is sound
