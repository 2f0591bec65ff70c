"""The front end's GPU rules (``udiroot/gpu.py``): which request, which environment."""

from __future__ import annotations

import pytest

from udiroot.environ import build_environment
from udiroot.gpu import GpuError, apply_gpu_env, helper_argument, requested_gpus

G = "/opt/shifter/site-resources/gpu"
U0 = "GPU-5d5ba0d6-d33d-2b2c-524d-9e3d8d2b8a77"
U1 = "GPU-1c6ad2f7-0f7e-4a9b-8c3d-2e4f6a8b0c1d"
M0 = "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f"


@pytest.mark.parametrize(("given", "option", "environ", "expected"), [
    (False, None, {}, None),
    (False, None, {"CUDA_VISIBLE_DEVICES": ""}, None),
    (False, None, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
    (False, None, {"CUDA_VISIBLE_DEVICES": "2,0"}, [2, 0]),
    (False, None, {"CUDA_VISIBLE_DEVICES": " 1 , 3 "}, [1, 3]),
    (True, None, {}, "all"),
    (True, None, {"CUDA_VISIBLE_DEVICES": "1"}, "all"),  # --gpu wins
    (True, "3", {"CUDA_VISIBLE_DEVICES": "1"}, [3]),
    # Slurm with ConstrainDevices: CUDA counts from 0, SLURM_STEP_GPUS names the nodes.
    (False, None, {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_GPUS": "2,3"}, [2, 3]),
    (False, None, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": "5"}, [5]),
    (False, None, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "1",
                   "SLURM_JOB_GPUS": "1,2"}, [1]),
    (False, None, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "1,2"}, [0]),  # mismatch
    (False, None, {"SLURM_STEP_GPUS": "1"}, None),  # no CUDA_VISIBLE_DEVICES: no request
    (True, "0", {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "1"}, [0]),  # --gpu wins
    # UUIDs name devices outright: Slurm's list does not renumber them.
    (False, None, {"CUDA_VISIBLE_DEVICES": f"{U1},{U0}"}, [U1, U0]),
    (False, None, {"CUDA_VISIBLE_DEVICES": M0, "SLURM_STEP_GPUS": "3"}, [M0]),
    (False, None, {"CUDA_VISIBLE_DEVICES": f"MIG-{U0}/1/0"}, [f"MIG-{U0}/1/0"]),
    (False, None, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": U1}, [U1]),
    (True, U0, {}, [U0]),
])
def test_requested_gpus(given, option, environ, expected):
    assert requested_gpus(given, option, environ) == expected


@pytest.mark.parametrize(("option", "environ", "message"), [
    ("", {}, "Invalid --gpu ''"),
    ("a", {}, "Invalid --gpu 'a'"),
    ("1,1", {}, "GPU 1 is given twice"),
    ("64", {}, "from 0 to 63"),
    (None, {"CUDA_VISIBLE_DEVICES": "GPU-12ab"}, "or GPU UUIDs"),  # not a whole UUID
    (None, {"CUDA_VISIBLE_DEVICES": f"0,{U0}"}, "either indexes or UUIDs, not both"),
    (None, {"CUDA_VISIBLE_DEVICES": f"{U0},{U0}"}, "is given twice"),
    (None, {"CUDA_VISIBLE_DEVICES": f"MIG-{U0[4:]}/1/0"}, "Invalid CUDA_VISIBLE_DEVICES"),
    (None, {"CUDA_VISIBLE_DEVICES": f"MIG-{U0}/1"}, "Invalid CUDA_VISIBLE_DEVICES"),
    (None, {"CUDA_VISIBLE_DEVICES": "0,"}, "Invalid CUDA_VISIBLE_DEVICES '0,'"),
    (None, {"CUDA_VISIBLE_DEVICES": "١"}, "Invalid CUDA_VISIBLE_DEVICES"),  # not ASCII
    (None, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "x"}, "Invalid SLURM_STEP_GPUS"),
])
def test_malformed_requests(option, environ, message):
    with pytest.raises(GpuError, match=message):
        requested_gpus(option is not None, option, environ)


def test_helper_argument():
    assert helper_argument("all") == "all"
    assert helper_argument([3, 1]) == "3,1"


def test_environment_layer():
    env = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/img"}
    apply_gpu_env(env, [3, 1], None)
    assert env == {"PATH": f"/usr/bin:{G}/bin", "LD_LIBRARY_PATH": f"{G}/lib64:{G}/lib:/img",
                   "CUDA_VISIBLE_DEVICES": "0,1"}
    env = {"CUDA_VISIBLE_DEVICES": "5"}
    apply_gpu_env(env, "all", "/site/res/")
    assert env == {"PATH": "/site/res/gpu/bin", "CUDA_VISIBLE_DEVICES": "5",
                   "LD_LIBRARY_PATH": "/site/res/gpu/lib64:/site/res/gpu/lib"}


def test_gpu_layer_sits_between_env_options_and_the_site():
    env = build_environment(
        {"PATH": "/usr/bin"}, image_request="x", image_id="y",
        env_options=["LD_LIBRARY_PATH=/opt"], gpus=[0],
        site={"siteEnvPrepend": "LD_LIBRARY_PATH=/site", "siteResources": "/sr"},
    )
    assert env["LD_LIBRARY_PATH"] == "/site:/sr/gpu/lib64:/sr/gpu/lib:/opt"


def test_ld_cache_reader_agrees_with_ldconfig():
    """The front end reads the ld.so cache itself (no ``ldconfig -p`` process per launch):
    every entry of this machine's cache, in ldconfig's order."""
    import subprocess

    from udiroot.gpu import ld_cache_entries

    with open("/etc/ld.so.cache", "rb") as f:
        ours = ld_cache_entries(f.read(), "/etc/ld.so.cache")
    lines = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    lines = [line for line in lines if " => " in line]
    theirs = [(line.split(" (", 1)[0].strip(), line.rsplit(" => ", 1)[1]) for line in lines]
    assert ours == theirs and len(ours) > 10


@pytest.mark.parametrize("data", [b"", b"ld.so-1.7.0\0\xff\xff\xff\xff", b"garbage" * 10,
                                  b"glibc-ld.so.cache1.1" + b"\0" * 28])
def test_ld_cache_reader_refuses_what_it_cannot_read(data):
    from udiroot.gpu import ld_cache_entries

    if data.endswith(b"\0" * 28):  # a header claiming entries it does not have
        data = data[:20] + b"\x05\0\0\0" + data[24:]
    with pytest.raises(GpuError, match="FAILED to set up GPU support"):
        ld_cache_entries(data, "/x")


def test_ld_cache_reader_survives_damaged_caches():
    """The C fuzz target of the helper's cache reader went with the reader: the front end
    reads the cache now. Damaged copies of this machine's cache (bytes flipped, cut short,
    counts and offsets made huge) give entries or a GpuError, never another exception."""
    import random
    import struct

    from udiroot.gpu import ld_cache_entries

    with open("/etc/ld.so.cache", "rb") as f:
        good = f.read()
    rng = random.Random(10)
    for _ in range(400):
        data = bytearray(good)
        kind = rng.randrange(4)
        if kind == 0:
            data = data[: rng.randrange(len(data))]
        elif kind == 1:
            for _ in range(rng.randrange(1, 16)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            at = rng.randrange(0, min(len(data), 4096) - 4)
            struct.pack_into("<I", data, at, rng.choice([0xFFFFFFFF, 0x7FFFFFFF, len(data)]))
        try:
            entries = ld_cache_entries(bytes(data), "/x")
        except GpuError:
            continue
        assert all(isinstance(n, str) and isinstance(p, str) for n, p in entries)


def test_uuids_keep_cuda_visible_devices():
    env: dict[str, str] = {}
    apply_gpu_env(env, [U1, M0], None)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{U1},{M0}"


# -- the driver's tables (the fake driver of tests/world/gpuhost.py) ------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    from world.gpuhost import FakeGpuHost

    return FakeGpuHost.create(tmp_path_factory.mktemp("gpuids") / "host", gpus=3,
                              mig={1: [(1, 0), (2, 0)], 2: [(7, 3)]})


def _nvml(fake):
    from udiroot.gpu import driver_files, nvml_library

    return nvml_library(driver_files(fake.conf()))


def test_uuids_and_mig_devices_resolve_to_their_device_nodes(fake):
    from world.gpuhost import mig_minor

    from udiroot.gpu import node_gpus

    cfg = fake.conf()
    r = node_gpus([fake.uuids[2], "GPU-" + fake.uuids[0][4:].upper()], cfg)  # any case
    # A whole GPU in MIG mode brings all its instances' caps (GPU 2: gi7/ci3).
    assert (r.gpus, r.caps) == ([2, 0], [mig_minor(2, 7), mig_minor(2, 7, 3)])
    assert node_gpus([0], cfg).caps == []
    # A MIG UUID: NVML gives its parent and instances; /proc gives the cap minors.
    mig = fake.mig[1][1][2]
    r = node_gpus([mig], cfg, _nvml(fake))
    assert (r.gpus, r.caps) == ([1], [mig_minor(1, 2), mig_minor(1, 2, 0)])
    assert r.caps == [21 + 135, 22 + 135]  # gpu1/gi2/access, gpu1/gi2/ci0/access
    # The older MIG-GPU-<uuid>/<gi>/<ci> needs no NVML.
    r = node_gpus([f"MIG-{fake.uuids[2]}/7/3"], cfg)
    assert (r.gpus, r.caps) == ([2], [mig_minor(2, 7), mig_minor(2, 7, 3)])
    # Two instances of one GPU: the GPU once.
    r = node_gpus([fake.mig[1][0][2], mig], cfg, _nvml(fake))
    assert r.gpus == [1] and len(r.caps) == 4
    # What the driver lists, in its own words.
    assert all(f"(UUID: {u})" in fake.smi_list() for u in fake.uuids)
    minors = (fake.proc / "nvidia-caps" / "mig-minors").read_text().splitlines()
    assert "gpu0/gi2/access 21" in minors and "gpu0/gi2/ci0/access 22" in minors


@pytest.mark.parametrize(("sel", "message"), [
    ("GPU-00000000-0000-0000-0000-000000000000", "this node has no GPU GPU-00000000"),
    ("MIG-00000000-0000-0000-0000-000000000000", "no such MIG device on this node"),
    ("MIG-GPU-00000000-0000-0000-0000-000000000000/1/0", "this node has no GPU"),
    ("old/1/5", "has no MIG instance gi1/ci5"),
])
def test_unknown_uuids_are_named(fake, sel, message):
    from udiroot.gpu import node_gpus

    if sel.startswith("old"):
        sel = f"MIG-{fake.uuids[1]}/1/5"
    with pytest.raises(GpuError, match=message):
        node_gpus([sel], fake.conf(), _nvml(fake))


def test_mig_uuid_without_nvml(fake):
    from udiroot.gpu import node_gpus

    with pytest.raises(GpuError, match="a MIG UUID needs NVML"):
        node_gpus([fake.mig[1][0][2]], fake.conf(), None)


# -- CDI specs -------------------------------------------------------------------------------


def test_yaml_reader_agrees_with_pyyaml(fake, tmp_path):
    """The spec reader (no PyYAML under python3 -I -S) against PyYAML: the spec the fake
    driver writes as nvidia-ctk does, and the constructs hand-written specs use."""
    import yaml

    from udiroot.cdiyaml import loads

    spec = fake.cdi_spec(tmp_path / "cdi", hooks="        - hookName: createContainer\n"
                         "          path: /usr/bin/nvidia-cdi-hook\n"
                         "          args: [nvidia-cdi-hook, update-ldcache, '--folder', "
                         "\"/usr/lib\"]  # comment\n          env:\n"
                         "            - NVIDIA_CTK_DEBUG=false\n")
    text = spec.read_text()
    assert loads(text) == yaml.safe_load(text)
    assert loads(text)["devices"][0]["name"] == "0"  # quoted: a string, not a number
    for text in ("a:\n- 1\n- -2\n- x y\nb: {}\nc: []\nd: ~\ne: 'it''s'\nf: \"q\\\"\"\n",
                 "- a: 1\n  b:\n    - c\n-\n  - d\n", "k: 0\nj: true\n"):
        assert loads(text) == yaml.safe_load(text), text


@pytest.mark.parametrize("text", ["a: &x 1\nb: *x\n", "a: |\n  text\n", "a: !!str 1\n",
                                  "a: 1\n---\nb: 2\n", "a: {b: 1}\n", "a:\n  - 1\n   - 2\n",
                                  "a: 'open\n", "a: 1\na: 2\n", "mode: 0755\n"])
def test_yaml_reader_refuses_the_rest(text):
    from udiroot.cdiyaml import SpecSyntaxError, loads

    with pytest.raises(SpecSyntaxError):
        loads(text)


def test_cdi_spec_dirs_through_root_links_and_bad_entries(fake, tmp_path):
    """A spec dir reached through a root-owned link (``/var/run`` → ``/run``) is read; a
    missing one is skipped; an env entry that is not NAME=VALUE is refused."""
    from udiroot.cdi import CdiError, plan

    real = tmp_path / "run"
    real.mkdir()
    spec = fake.cdi_spec(real / "cdi")
    (tmp_path / "var-run").symlink_to(real)
    cfg = {**fake.conf(), "cdiSpecDirs": f"{tmp_path}/var-run/cdi {tmp_path}/missing"}
    p = plan(cfg, ["0"], [str(fake.lib64), str(fake.bin)])
    assert p.gpus == [0] and ("NVIDIA_VISIBLE_DEVICES", "void") in p.env
    assert ("/usr/bin/nvidia-smi", f"{fake.bin}/nvidia-smi") in p.mounts
    assert plan(cfg, ["7"], []).specs == []  # no device of the spec asked for: nothing
    spec.write_text(spec.read_text().replace("- NVIDIA_VISIBLE_DEVICES=void", "- =void"))
    with pytest.raises(CdiError, match="env entry '=void' is not NAME=VALUE"):
        plan(cfg, ["0"], [str(fake.lib64), str(fake.bin)])
