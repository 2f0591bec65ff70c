"""GPU support end to end (docs/behaviour.md, 'Runtime: GPU'), on a machine without a GPU.

A fake driver (``tests/world/gpuhost.py``: real shared libraries in a real ``ldconfig``
cache, device nodes made with mknod, a ``nvidia-smi``) stands where the NVIDIA driver
stands on a GPU node; the site points the helper at it with ``gpuLdCache``,
``gpuDeviceDir`` and ``gpuBinaryPath`` (on a real node these keep their defaults,
``/etc/ld.so.cache``, ``/dev`` and the system bin dirs, and the code path is the same).
Everything runs as an unprivileged user through the real front end and setuid helper.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess

import pytest
from world.gpuhost import PROBE_C, FakeGpuHost, program_tree, shared_library
from world.runtime import HELPER, RuntimeSite, busybox_tree, mksquashfs, module_site

ALICE = "shifter-alice"
GPU_DIR = "/opt/shifter/site-resources/gpu"


@pytest.fixture(scope="module")
def site(test_users, tmp_path_factory):
    with module_site(tmp_path_factory, "gpu") as site:
        yield site


@pytest.fixture(scope="module")
def host(site) -> FakeGpuHost:
    """Two GPUs; GPU 1 in MIG mode with two instances (gi1/ci0, gi2/ci0)."""
    return FakeGpuHost.create(site.base / "gpu-host", gpus=2, mig={1: [(1, 0), (2, 0)]})


@pytest.fixture(scope="module")
def image(site, tmp_path_factory) -> str:
    """busybox plus ``/usr/bin/gpuprobe`` (dynamically linked, with its glibc) and the
    image's own ``libcuda.so.1`` stub, which the host's driver must win over."""
    tree = busybox_tree(tmp_path_factory.mktemp("gputree") / "root")
    program_tree(tree, "gpuprobe", PROBE_C)
    stub_dir = tree / "usr" / "lib" / "x86_64-linux-gnu"
    stub_dir.mkdir(parents=True, exist_ok=True)
    shared_library(stub_dir / "libcuda.so.1", "libcuda.so.1",
                   'const char *shifter_gpu_marker(void) { return "image-stub"; }\n')
    sqfs = mksquashfs(tree, tmp_path_factory.mktemp("gpusqfs") / "gpu.squashfs")
    return site.add_image(sqfs, 'ENV: ["PATH=/usr/bin:/bin"]\n')


@pytest.fixture(autouse=True)
def gpu_conf(site, host):
    site.write_conf(**host.conf())
    yield
    site.write_conf()
    site.assert_nothing_left()


def shifter(site: RuntimeSite, image: str, *args: str, env: dict[str, str] | None = None):
    return site.shifter(ALICE, f"--image=id:{image}", *args, env=env)


def devices(site: RuntimeSite, image: str, *args: str, env: dict[str, str] | None = None
            ) -> set[str]:
    res = shifter(site, image, *args, "ls", "/dev", env=env)
    assert res.returncode == 0, res.stderr
    return {name for name in res.stdout.split() if name.startswith("nvidia")}


# -- the driver reaches the program -------------------------------------------------------


def test_program_in_the_image_loads_the_hosts_driver(site, image, host):
    res = shifter(site, image, "--gpu=0", "gpuprobe", "libcuda.so.1", "libnvidia-ml.so.1")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = dict((line.split()[0], line.split()[1:]) for line in res.stdout.splitlines())
    # The host's marker (not the image's stub), from the site-resources dir.
    assert lines["libcuda.so.1"] == [host.marker("libcuda"), f"{GPU_DIR}/lib64/libcuda.so.1"]
    assert lines["libnvidia-ml.so.1"] == [host.marker("libnvidia-ml"),
                                          f"{GPU_DIR}/lib64/libnvidia-ml.so.1"]


def test_a_cache_in_the_older_compat_format(site, image, host):
    """Nodes whose ld.so.cache was written by an older glibc (old table + new table)."""
    cache = host.make_cache(host.base / "compat-ld.so.cache", "compat")
    assert cache.read_bytes().startswith(b"ld.so-1.7.0")
    site.write_conf(**{**host.conf(), "gpuLdCache": str(cache)})
    res = shifter(site, image, "--gpu=0", "gpuprobe", "libcuda.so.1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[1:] == [host.marker("libcuda"), f"{GPU_DIR}/lib64/libcuda.so.1"]


def test_without_a_gpu_request_nothing_is_injected(site, image):
    for env in (None, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}):
        res = shifter(site, image, "gpuprobe", "libcuda.so.1", env=env)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split()[1] == "image-stub"  # the image's own library
        res = shifter(site, image, "sh", "-c", "ls /opt; echo LD=$LD_LIBRARY_PATH", env=env)
        assert "shifter" not in res.stdout and "LD=\n" in res.stdout


def test_driver_files_are_placed_by_elf_class_read_only(site, image, host):
    res = shifter(site, image, "--gpu", "sh", "-c",
                  f"ls {GPU_DIR}/lib64 {GPU_DIR}/lib {GPU_DIR}/bin; "
                  f"wc -c {GPU_DIR}/lib/libcuda.so.1 {GPU_DIR}/lib64/libcuda.so.1; "
                  f"grep site-resources /proc/mounts; nvidia-smi; "
                  f"echo x > {GPU_DIR}/lib64/libcuda.so.1 || echo write-refused")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    # Only the listed libraries: libcudart is in the cache but is not the driver.
    assert "libcudart" not in out
    sizes = {line.split()[1]: int(line.split()[0]) for line in out.splitlines()
             if line.strip().endswith("libcuda.so.1") and len(line.split()) == 2}
    assert sizes[f"{GPU_DIR}/lib/libcuda.so.1"] == os.path.getsize(
        host.lib32 / "libcuda.so.999.12")
    assert sizes[f"{GPU_DIR}/lib64/libcuda.so.1"] == os.path.getsize(
        host.lib64 / "libcuda.so.999.12")
    mounts = [line for line in out.splitlines()
              if len(line.split()) >= 4 and line.split()[1].startswith(GPU_DIR)]
    assert len(mounts) >= 4  # 2 x libcuda, libnvidia-ml, nvidia-smi
    for line in mounts:
        opts = line.split()[3].split(",")
        assert "ro" in opts and "nosuid" in opts and "nodev" in opts, line
    assert f"fake nvidia-smi {host.token}" in out  # gpu/bin is on PATH
    assert "write-refused" in out


# -- which GPUs -----------------------------------------------------------------------------


def test_only_the_selected_gpus_are_visible(site, image):
    assert devices(site, image, "--gpu=0") == {"nvidia0", "nvidiactl", "nvidia-modeset",
                                               "nvidia-uvm"}
    # GPU 1 is in MIG mode: with it come its instances' nvidia-caps nodes.
    assert devices(site, image, "--gpu=1") == {"nvidia1", "nvidiactl", "nvidia-modeset",
                                               "nvidia-uvm", "nvidia-caps"}
    assert devices(site, image, "--gpu=0,1") >= {"nvidia0", "nvidia1"}
    assert devices(site, image, "--gpu") >= {"nvidia0", "nvidia1"}  # bare: all of them
    res = shifter(site, image, "--gpu=1", "sh", "-c",
                  "stat -c '%t:%T %a' /dev/nvidia1; echo ok > /dev/null && echo null-ok; "
                  "ls -d /dev/shm /dev/pts; echo CVD=$CUDA_VISIBLE_DEVICES; echo x > /dev/new "
                  "|| echo dev-readonly; grep ' /dev ' /proc/mounts")
    assert res.returncode == 0, res.stderr
    assert "c3:1 666" in res.stdout  # char 195:1 (hex), the host's mode
    assert "null-ok" in res.stdout and "/dev/shm" in res.stdout and "/dev/pts" in res.stdout
    assert "CVD=0" in res.stdout  # renumbered: the one visible GPU is CUDA's device 0
    assert "dev-readonly" in res.stdout
    dev_opts = [line for line in res.stdout.splitlines() if " /dev " in line][0].split()[3]
    assert "nosuid" in dev_opts.split(",") and "noexec" in dev_opts.split(",")


def test_cuda_visible_devices_requests_gpus(site, image):
    env = {"CUDA_VISIBLE_DEVICES": "1"}
    assert devices(site, image, env=env) == {"nvidia1", "nvidiactl", "nvidia-modeset",
                                             "nvidia-uvm", "nvidia-caps"}
    res = shifter(site, image, "gpuprobe", "libcuda.so.1", env=env)
    assert res.returncode == 0 and res.stdout.split()[1].startswith("host-driver:")
    # --gpu wins over the variable.
    assert "nvidia0" in devices(site, image, "--gpu=0", env=env)
    # A Slurm step with constrained devices: CUDA counts from 0, Slurm names the node's GPU.
    env = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "1"}
    assert devices(site, image, env=env) == {"nvidia1", "nvidiactl", "nvidia-modeset",
                                             "nvidia-uvm", "nvidia-caps"}
    res = shifter(site, image, "sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES", env=env)
    assert res.stdout == "CVD=0\n"


def test_gpu_layer_of_the_environment(site, image, host):
    res = shifter(site, image, "--gpu=0,1", "--env=LD_LIBRARY_PATH=/mine", "sh", "-c",
                  "echo LD=$LD_LIBRARY_PATH; echo PATH=$PATH; echo CVD=$CUDA_VISIBLE_DEVICES")
    assert res.returncode == 0, res.stderr
    assert f"LD={GPU_DIR}/lib64:{GPU_DIR}/lib:/mine\n" in res.stdout
    assert f"PATH=/usr/bin:/bin:{GPU_DIR}/bin\n" in res.stdout
    assert "CVD=0,1\n" in res.stdout
    # The site has the last word (docs/behaviour.md, 'Runtime: environment': modules and
    # udiRoot.conf come after).
    site.write_conf(siteEnvPrepend="LD_LIBRARY_PATH=/site", **host.conf())
    res = shifter(site, image, "--gpu=0", "sh", "-c", "echo LD=$LD_LIBRARY_PATH")
    assert f"LD=/site:{GPU_DIR}/lib64:{GPU_DIR}/lib\n" in res.stdout


def test_site_resources_path_is_the_sites(site, image, host):
    site.write_conf(siteResources="/site/resources", **host.conf())
    res = shifter(site, image, "--gpu=0", "gpuprobe", "libcuda.so.1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[2] == "/site/resources/gpu/lib64/libcuda.so.1"
    # A path inside one of the image's directories would hide it: refused, not done.
    site.write_conf(siteResources="/usr/local/site-gpu", **host.conf())
    res = shifter(site, image, "--gpu=0", "gpuprobe", "libcuda.so.1")
    assert res.returncode == 1
    assert "siteResources /usr/local/site-gpu would hide the image's /usr" in res.stderr


# -- bad input ------------------------------------------------------------------------------


def test_a_gpu_the_node_does_not_have(site, image, host):
    res = shifter(site, image, "--gpu=7", "true")
    assert res.returncode == 1
    assert f"GPU 7 was requested but this node has no {host.dev}/nvidia7 (its GPUs: 0,1)" \
        in res.stderr


@pytest.mark.parametrize("value", ["garbage", "0,,1", "1,1", "64", "GPU-3f2a", "-1"])
def test_malformed_cuda_visible_devices(site, image, value):
    res = shifter(site, image, "true", env={"CUDA_VISIBLE_DEVICES": value})
    assert res.returncode == 1
    assert f"Invalid CUDA_VISIBLE_DEVICES '{value}'" in res.stderr
    assert "expected GPU indexes" in res.stderr or "given twice" in res.stderr


@pytest.mark.parametrize("value", ["", "x", "0,"])
def test_malformed_gpu_option(site, image, value):
    res = shifter(site, image, f"--gpu={value}", "true")
    assert res.returncode == 1 and "Invalid --gpu" in res.stderr


def test_a_node_without_a_driver(site, image, host):
    # The system's own cache: no libcuda on this machine.
    site.write_conf(gpuLdCache="/etc/ld.so.cache", gpuDeviceDir=str(host.dev))
    res = shifter(site, image, "--gpu=0", "true")
    assert res.returncode == 1
    assert "this node has no NVIDIA driver (no libcuda.so in /etc/ld.so.cache)" in res.stderr
    # No device nodes either (the machine's real /dev).
    site.write_conf(**{**host.conf(), "gpuDeviceDir": "/dev"})
    res = shifter(site, image, "--gpu", "true")
    assert res.returncode == 1 and "this node has no GPU devices (no /dev/nvidiaN)" in res.stderr


def test_prepared_container_is_not_entered_by_a_gpu_request(site, image):
    res = site.root_tool("setupRoot", "-U", str(_uid(ALICE)),
                         "-G", str(_gid(ALICE)), "-u", ALICE, "id", image)
    assert res.returncode == 0, res.stderr
    try:
        # Same image, user, volumes and modules: without --gpu the prepared root is used...
        res = shifter(site, image, "sh", "-c", "ls /dev | grep -c nvidia; echo done")
        assert res.returncode == 0 and res.stdout.split()[-1] == "done"
        # ...with --gpu a container of its own is built, holding the GPU.
        assert devices(site, image, "--gpu=0") >= {"nvidia0"}
    finally:
        assert site.root_tool("unsetupRoot").returncode == 0


# -- attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["../../etc/shadow", "/etc/shadow", "0,0", "0;1", "all,0",
                                   "100", ""])
def test_helper_takes_only_gpu_indexes(site, image, value):
    """The helper is called directly (bypassing the front end) with a hostile --gpu."""
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu", value, "--",
                           "/bin/true"])
    assert res.returncode == 1
    assert "Invalid GPU list" in res.stderr


def helper_gpu(site, image, *args: str):
    """The setuid helper called directly, bypassing the front end's discovery."""
    return site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu", "0", *args,
                            "--", "/bin/cat", f"{GPU_DIR}/lib64/libcuda.so.1"])


@pytest.mark.parametrize("spec", ["lib64/libcuda.so.1", "etc/passwd=/etc/passwd",
                                  "lib64/=/etc/passwd", "lib64/../x=/etc/passwd",
                                  "lib64/a/b=/etc/passwd", "lib64/x=relative",
                                  "lib64/x=/a/../etc/passwd"])
def test_helper_refuses_malformed_gpu_files(site, image, spec):
    res = helper_gpu(site, image, "--gpu-file", spec)
    assert res.returncode == 1 and "Invalid --gpu-file" in res.stderr
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu-file",
                           "lib/x=/etc/passwd", "--", "/bin/true"])
    assert res.returncode == 1 and "--gpu-mount need --gpu" in res.stderr


def test_helper_opens_gpu_files_with_the_callers_rights(site, image, host):
    """Attack: the driver's files are the caller's to name, so a caller bypassing the
    front end names root's files. Each is opened as the caller: a file in a directory
    only root can search, a /proc magic link or a device is refused; a file the caller
    can read is bound read-only."""
    secret_dir = site.base / "root-only"
    secret_dir.mkdir(exist_ok=True)
    os.chmod(secret_dir, 0o700)
    (secret_dir / "secret").write_text("root's\n")
    for path, why in ((secret_dir / "secret", "Permission denied"),
                      ("/proc/self/root/etc/passwd", "Too many levels of symbolic links"),
                      ("/dev/null", "not a regular file")):
        res = helper_gpu(site, image, "--gpu-file", f"lib64/libcuda.so.1={path}")
        assert res.returncode == 1 and "Cannot bind GPU driver file" in res.stderr, path
        assert why in res.stderr, (path, res.stderr)
    readable = site.base / "mine.so"
    readable.write_text("readable\n")
    os.chmod(readable, 0o644)
    res = helper_gpu(site, image, "--gpu-file", f"lib64/libcuda.so.1={readable}")
    assert (res.returncode, res.stdout) == (0, "readable\n"), res.stderr
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu", "0",
                           "--gpu-file", f"lib64/libcuda.so.1={readable}", "--", "/bin/sh",
                           "-c", f"echo x > {GPU_DIR}/lib64/libcuda.so.1"])
    assert res.returncode != 0 and "Read-only file system" in res.stderr


def test_a_library_cache_users_can_write_is_refused(site, image, host, tmp_path):
    cache = site.base / "writable-ld.so.cache"
    cache.write_bytes(host.cache.read_bytes())
    os.chmod(cache, 0o666)
    site.write_conf(**{**host.conf(), "gpuLdCache": str(cache)})
    res = shifter(site, image, "--gpu=0", "true")
    assert res.returncode == 1 and "FAILED to set up GPU support" in res.stderr
    assert "writable" in res.stderr


def test_cache_entries_outside_the_driver_list_never_go_in(site, image, host):
    """A site list cannot be widened by the user: only gpuLibraries names are taken."""
    site.write_conf(gpuLibraries="libnvidia-ml", **host.conf())
    res = shifter(site, image, "--gpu=0", "sh", "-c", f"ls {GPU_DIR}/lib64")
    # libcuda is not listed: the node counts as having no driver.
    assert res.returncode == 1 and "no NVIDIA driver" in res.stderr
    site.write_conf(gpuLibraries="libcuda", **host.conf())
    res = shifter(site, image, "--gpu=0", "sh", "-c", f"ls {GPU_DIR}/lib64")
    assert res.returncode == 0 and res.stdout.split() == ["libcuda.so.1"]


def _uid(user: str) -> int:
    return int(subprocess.run(["id", "-u", user], capture_output=True, text=True).stdout)


def _gid(user: str) -> int:
    return int(subprocess.run(["id", "-g", user], capture_output=True, text=True).stdout)


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value: version 2, then (tag, perm, id) entries."""
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_device_acl_is_not_widened_by_the_copy(site, image, host):
    """Attack: a device node whose POSIX ACL denies its owning group (group::---, a named
    user rw, so the mask and the mode's group bits are rw). The container's /dev copy got
    the mode alone (0660), which gave the owning group, alice's, the device."""
    node = host.dev / "nvidia-uvm-tools"
    gid = pwd.getpwnam(ALICE).pw_gid
    os.mknod(node, 0o660 | stat.S_IFCHR, os.makedev(1, 3))  # the null device's numbers
    try:
        os.chown(node, 0, gid)
        nobody = 0xFFFFFFFF
        os.setxattr(node, "system.posix_acl_access",
                    _acl((0x01, 6, nobody), (0x02, 6, 0), (0x04, 0, nobody),
                         (0x10, 6, nobody), (0x20, 0, nobody)))
        assert stat.S_IMODE(os.stat(node).st_mode) == 0o660
        outside = site.run(ALICE, ["sh", "-c", f"echo x > {node}"])
        assert outside.returncode != 0 and "ermission denied" in outside.stderr
        res = shifter(site, image, "--gpu=0", "sh", "-c",
                      "ls /dev/nvidia-uvm-tools && echo x > /dev/nvidia-uvm-tools && echo WROTE")
        assert "WROTE" not in res.stdout, "the container's copy gave alice the device"
        assert "nvidia-uvm-tools" in res.stdout, res.stderr
    finally:
        node.unlink()


# -- UUIDs and MIG devices, as Slurm hands them out -----------------------------------------


def test_gpu_uuids_select_their_device_nodes(site, image, host):
    env = {"CUDA_VISIBLE_DEVICES": host.uuids[1]}
    assert devices(site, image, env=env) == {"nvidia1", "nvidiactl", "nvidia-modeset",
                                             "nvidia-uvm", "nvidia-caps"}
    res = shifter(site, image, "sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES", env=env)
    assert res.stdout == f"CVD={host.uuids[1]}\n"  # a UUID stays valid in the container
    # Slurm's list names the step's GPU by UUID while CUDA counts from 0.
    env = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": host.uuids[1]}
    assert "nvidia1" in devices(site, image, env=env)
    assert "nvidia0" not in devices(site, image, env=env)
    env = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_GPUS": host.uuids[0]}  # batch step
    assert devices(site, image, env=env) == {"nvidia0", "nvidiactl", "nvidia-modeset",
                                             "nvidia-uvm"}
    env = {"CUDA_VISIBLE_DEVICES": f"{host.uuids[1]},{host.uuids[0]}"}
    assert devices(site, image, env=env) >= {"nvidia0", "nvidia1"}
    assert devices(site, image, f"--gpu={host.uuids[0]}") >= {"nvidia0"}


def _mig_devices(site, image, env):
    res = shifter(site, image, "sh", "-c", "ls /dev | grep '^nvidia[0-9]'; "
                  "stat -c '%n %t:%T %a' /dev/nvidia-caps/*; echo CVD=$CUDA_VISIBLE_DEVICES",
                  env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("style", ["uuid", "gpu/gi/ci"])
def test_mig_devices_bring_their_caps(site, image, host, style):
    """A MIG instance: its GPU's /dev/nvidia1 and the two nvidia-caps nodes of its GPU
    and compute instance (gpu1/gi2: minors 156 and 157), nothing of the other instance."""
    gi, ci, uuid = host.mig[1][1]
    sel = uuid if style == "uuid" else f"MIG-{host.uuids[1]}/{gi}/{ci}"
    out = _mig_devices(site, image, {"CUDA_VISIBLE_DEVICES": sel})
    assert out.splitlines() == [
        "nvidia1",
        "/dev/nvidia-caps/nvidia-cap156 1fc:9c 444",
        "/dev/nvidia-caps/nvidia-cap157 1fc:9d 444",
        f"CVD={sel}",
    ]


def test_a_whole_mig_gpu_brings_all_its_instances(site, image, host):
    res = shifter(site, image, "--gpu=1", "ls", "/dev/nvidia-caps")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [f"nvidia-cap{m}" for m in (147, 148, 156, 157)]


def test_unknown_uuids_are_refused_before_anything_is_built(site, image, host):
    missing = "GPU-00000000-1111-2222-3333-444444444444"
    res = shifter(site, image, "true", env={"CUDA_VISIBLE_DEVICES": missing})
    assert res.returncode == 1
    assert f"{missing}: this node has no GPU {missing}" in res.stderr
    res = shifter(site, image, "true", env={"CUDA_VISIBLE_DEVICES": f"MIG-{missing[4:]}"})
    assert res.returncode == 1 and "no such MIG device on this node" in res.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--gpu-cap", "../../etc/shadow"], "Invalid MIG device list"),
    (["--gpu-cap", "156,156"], "given twice"),
    (["--gpu-cap", "3"], "MIG device 3 was requested but this node has no"),  # not made
    (["--gpu-mount", "/etc/passwd=/tmp"], "Invalid mount request"),
    (["--gpu-mount", "/dev/sda=/tmp"], "Invalid mount request"),
    (["--gpu-mount", "relative=/tmp"], "Invalid --gpu-mount"),
    (["--gpu-mount", "/x=/a/../etc"], "Invalid --gpu-mount"),
])
def test_helper_takes_only_mig_numbers_and_volume_like_mounts(site, image, args, message):
    """The helper called directly: MIG devices by number from gpuDeviceDir/nvidia-caps
    only; CDI mounts where a user volume may go, nowhere else."""
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu", "1", *args,
                           "--", "/bin/true"])
    assert res.returncode == 1 and message in res.stderr, res.stderr
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, *args, "--", "/bin/true"])
    assert res.returncode == 1


def test_helper_opens_cdi_mount_sources_with_the_callers_rights(site, image):
    """Attack: --gpu-mount naming root's files. Opened as the caller: refused."""
    secret_dir = site.base / "root-only-cdi"
    secret_dir.mkdir(exist_ok=True)
    os.chmod(secret_dir, 0o700)
    (secret_dir / "secret").write_text("root's\n")
    for source, why in ((secret_dir / "secret", "Permission denied"),
                        ("/proc/self/root/etc/shadow", "Too many levels of symbolic links"),
                        ("/dev/null", "not a file, directory or socket")):
        res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu", "0",
                               "--gpu-mount", f"/secret={source}", "--", "/bin/true"])
        assert res.returncode == 1 and "Cannot bind CDI mount source" in res.stderr, source
        assert why in res.stderr, (source, res.stderr)


def test_a_cdi_mount_point_is_never_made_on_the_hosts_directories(site, image):
    """Attack: --gpu-mount onto a path under the host's /tmp (bound into every
    container): its mount point would be a file root makes in the host's /tmp. Skipped,
    nothing made; a mount point on the container's own root is fine."""
    name = f"cdi-attack-{os.getpid()}"
    readable = site.base / "cdi-readable"
    readable.write_text("readable\n")
    os.chmod(readable, 0o644)
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", image, "--gpu", "0", "--verbose",
                           "--gpu-mount", f"/tmp/{name}={readable}",
                           "--gpu-mount", f"/{name}={readable}", "--", "/bin/cat", f"/{name}"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == "readable\n"
    assert f"CDI mount /tmp/{name} skipped" in res.stderr
    assert not os.path.lexists(f"/tmp/{name}")


# -- CDI specs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cdi_image(site, tmp_path_factory) -> str:
    """busybox with a placeholder /usr/bin/nvidia-smi: a mount point for the spec's mount
    (no overlay here: a CDI mount needs a mount point in the image)."""
    tree = busybox_tree(tmp_path_factory.mktemp("cditree") / "root")
    (tree / "usr" / "bin").mkdir(parents=True, exist_ok=True)
    (tree / "usr" / "bin" / "nvidia-smi").write_text("")
    (tree / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (tree / "usr" / "lib" / "etc-link").symlink_to("/etc")  # a trap for mount targets
    sqfs = mksquashfs(tree, tmp_path_factory.mktemp("cdisqfs") / "cdi.squashfs")
    return site.add_image(sqfs, 'ENV: ["PATH=/usr/bin:/bin"]\n')


@pytest.fixture
def cdi_dir(site, host):
    d = site.base / "cdi"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cdi_conf(site, host, cdi_dir, **more: str) -> None:
    site.write_conf(**host.conf(), cdiSpecDirs=f"{cdi_dir} /nonexistent/cdi", **more)


def test_cdi_mount_points_on_the_overlay_never_replace_the_sites_files(site, cdi_image):
    """Attack (the helper called directly): CDI mounts whose targets lead through an
    image link into /etc, or name the helper's /etc files, are never mounted there; a
    target missing inside an image directory gets an empty mount point on the overlay."""
    readable = site.base / "cdi-readable"
    readable.write_text("readable\n")
    os.chmod(readable, 0o644)
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", cdi_image, "--gpu", "0",
                           "--verbose", "--gpu-mount", f"/usr/lib/etc-link/passwd={readable}",
                           "--gpu-mount", f"/usr/lib/etc-link/shifter={readable}",
                           "--gpu-mount", f"/usr/share/cdi-new/file={readable}", "--",
                           "/bin/sh", "-c", "cat /usr/share/cdi-new/file; grep -c alice "
                           "/etc/passwd; ls /etc/shifter 2>&1 | head -1"])
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "readable" and out[1] == "1", res.stdout  # /etc/passwd is the site's
    assert "No such file" in out[2]
    assert "CDI mount /usr/lib/etc-link/passwd skipped: it resolves into a directory " \
        "reserved for the system" in res.stderr
    assert "CDI mount /usr/lib/etc-link/shifter skipped" in res.stderr
    res = site.run(ALICE, [str(HELPER), "run", "--image-id", cdi_image, "--gpu", "0",
                           "--gpu-mount", f"/etc/passwd={readable}", "--", "/bin/true"])
    assert res.returncode == 1 and "Invalid mount request" in res.stderr


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_cdi_spec_is_applied(site, cdi_image, host, cdi_dir, fmt):
    host.cdi_spec(cdi_dir, fmt=fmt)
    cdi_conf(site, host, cdi_dir)
    lib = "/usr/lib/x86_64-linux-gnu/libcuda.so.999.12"
    res = shifter(site, cdi_image, "--gpu=0", "sh", "-c",
                  "nvidia-smi; echo NVD=$NVIDIA_VISIBLE_DEVICES; "
                  f"grep -e ' /usr/bin/nvidia-smi ' -e ' {lib} ' /proc/mounts; wc -c {lib}")
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == f"fake nvidia-smi {host.token}"  # the spec's mount, the image's path
    assert out[1] == "NVD=void"  # the spec's env
    for line in out[2:4]:
        opts = line.split()[3].split(",")
        assert "ro" in opts and "nosuid" in opts and "nodev" in opts, line
    # The image has no such file (nor its directory): the overlay over the image holds
    # the mount point, as for a volume inside an image directory.
    assert out[4] == f"{(host.lib64 / 'libcuda.so.999.12').stat().st_size} {lib}"


def test_a_cdi_mig_device_brings_its_caps(site, cdi_image, host, cdi_dir):
    host.cdi_spec(cdi_dir)
    cdi_conf(site, host, cdi_dir)
    uuid = host.mig[1][0][2]
    out = _mig_devices(site, cdi_image, {"CUDA_VISIBLE_DEVICES": uuid})
    assert "/dev/nvidia-caps/nvidia-cap147 1fc:93 444" in out  # gpu1/gi1: 3+135+9


def test_allowed_cdi_hooks_run_as_the_user_in_the_container(site, cdi_image, host, cdi_dir):
    hook = host.bin / "fake-cdi-hook"
    hook.write_text("#!/bin/sh\necho \"hook $HOOK_ENV $* uid=$(id -u) root=$(ls /)\" >&2\n"
                    "[ \"$1\" != fail ]\n")
    os.chmod(hook, 0o755)
    hooks = ("        - hookName: createContainer\n"
             f"          path: {hook}\n"
             "          args: [fake-cdi-hook, update-ldcache, --folder, '/usr/lib']\n"
             "          env: [HOOK_ENV=from-spec]\n")
    host.cdi_spec(cdi_dir, hooks=hooks)
    cdi_conf(site, host, cdi_dir)
    res = shifter(site, cdi_image, "--gpu=0", "true")
    assert res.returncode == 1 and "hook from-spec" not in res.stderr  # never ran
    assert f"its createContainer hook {hook} is not allowed on this node (allowCdiHooks)" \
        in res.stderr
    cdi_conf(site, host, cdi_dir, allowCdiHooks=f"/usr/bin/nvidia-cdi-hook {hook}")
    res = shifter(site, cdi_image, "--gpu=0", "echo", "command ran")
    assert res.returncode == 0, res.stderr
    uid = pwd.getpwnam(ALICE).pw_uid
    assert f"hook from-spec update-ldcache --folder /usr/lib uid={uid} root=" in res.stderr
    assert "opt" in res.stderr.split("root=")[1]  # the container's /, not the host's
    assert res.stdout == "command ran\n"
    host.cdi_spec(cdi_dir, hooks=hooks.replace("update-ldcache", "fail"))
    res = shifter(site, cdi_image, "--gpu=0", "echo", "command ran")
    assert res.returncode == 1 and "CDI hook fake-cdi-hook failed" in res.stderr
    assert "command ran" not in res.stdout


@pytest.mark.parametrize("bad", ["mount-source", "not-a-device", "foreign-device",
                                 "user-writable-file", "user-owned-dir", "symlinked-spec"])
def test_bad_cdi_specs_are_refused(site, cdi_image, host, cdi_dir, bad):
    """A spec that would put what is not the driver's into containers, or one a user could
    have written, stops the launch with the file named, before anything is built."""
    extra, spec = "", None
    if bad == "mount-source":
        extra = ("        - hostPath: /etc/shadow\n          containerPath: /secret\n")
    elif bad in ("not-a-device", "foreign-device"):
        fake = host.dev / "nvidia-fake"
        if bad == "not-a-device":
            fake.write_text("")
        extra = ("    - path: /dev/nvidia-fake\n"
                 f"      hostPath: {fake if bad == 'not-a-device' else '/dev/null'}\n")
    if bad in ("not-a-device", "foreign-device"):
        spec = host.cdi_spec(cdi_dir)
        text = spec.read_text().replace("\n    deviceNodes:\n", "\n    deviceNodes:\n" + extra
                                        .replace("    - ", "        - ")
                                        .replace("      host", "          host"), 1)
        spec.write_text(text)
    else:
        spec = host.cdi_spec(cdi_dir, extra_common=extra)
    alice = pwd.getpwnam(ALICE)
    if bad == "user-writable-file":
        os.chown(spec, alice.pw_uid, alice.pw_gid)
    elif bad == "user-owned-dir":
        os.chown(cdi_dir, alice.pw_uid, alice.pw_gid)
    elif bad == "symlinked-spec":
        target = site.base / "elsewhere.yaml"
        spec.rename(target)
        spec.symlink_to(target)
    cdi_conf(site, host, cdi_dir)
    try:
        res = shifter(site, cdi_image, "--gpu=0", "true")
    finally:
        (host.dev / "nvidia-fake").unlink(missing_ok=True)
        (site.base / "elsewhere.yaml").unlink(missing_ok=True)
    assert res.returncode == 1
    expected = {
        "mount-source": f"CDI spec {spec}: mount source /etc/shadow is outside the driver's",
        "not-a-device": f"device {host.dev}/nvidia-fake is not a character device",
        "foreign-device": "device /dev/null is not " + f"{host.dev}/nvidia-fake",
        "user-writable-file": f"spec {spec} is not owned by root (uid {alice.pw_uid})",
        "user-owned-dir": f"spec dir {cdi_dir} is not owned by root",
        "symlinked-spec": f"cannot open the CDI spec {spec}: Too many levels",
    }[bad]
    assert expected in res.stderr, res.stderr
