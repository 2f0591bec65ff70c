"""The front end's GPU rules (``udiroot/gpu.py``): which request, which environment."""

from __future__ import annotations

import pytest

from udiroot.environ import build_environment
from udiroot.gpu import GpuError, apply_gpu_env, helper_argument, requested_gpus

G = "/opt/shifter/site-resources/gpu"


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
])
def test_requested_gpus(given, option, environ, expected):
    assert requested_gpus(given, option, environ) == expected


@pytest.mark.parametrize(("option", "environ", "message"), [
    ("", {}, "Invalid --gpu ''"),
    ("a", {}, "Invalid --gpu 'a'"),
    ("1,1", {}, "GPU 1 is given twice"),
    ("64", {}, "from 0 to 63"),
    (None, {"CUDA_VISIBLE_DEVICES": "GPU-12ab"}, "GPU UUIDs are not supported"),
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
