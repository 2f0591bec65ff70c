"""The C helper's udiRoot.conf and volume rules (helpers/) agree with the Python ones.

Builds helpers/build/test_conf_volume-san (ASan + UBSan + LSan) once and runs it on the
same inputs as udiroot.config and udiroot.volumes: same accept/reject, same message, same
signature. A sanitizer report fails the test (the driver aborts and the exit status shows).
"""

from __future__ import annotations

import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_runtime_rules as rules

from udiroot.config import ConfigError, load
from udiroot.volumes import VolumeError, parse_size, parse_volume_map, volume_signature

ROOT = Path(__file__).resolve().parent.parent
HELPERS = ROOT / "helpers"
DRIVER = HELPERS / "build" / "test_conf_volume-san"
SAN_ENV = {
    **os.environ,
    "ASAN_OPTIONS": "abort_on_error=1:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:abort_on_error=1:print_stacktrace=1",
}


@pytest.fixture(scope="module")
def driver() -> Path:
    subprocess.run(["make", "-s", "-C", str(HELPERS), "test-bin"], check=True)
    return DRIVER


def run_c(driver: Path, *args: str) -> tuple[bool, str, str]:
    """(accepted, stdout or the error line, stderr) from the C driver."""
    proc = subprocess.run([str(driver), *args], capture_output=True, env=SAN_ENV, timeout=60)
    out = proc.stdout.decode("utf-8", "surrogateescape")
    err = proc.stderr.decode("utf-8", "surrogateescape")
    assert "Sanitizer" not in err and "runtime error" not in err, err
    assert proc.returncode in (0, 1), (args, proc.returncode, err)
    if proc.returncode == 0:
        return True, out, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return False, err[:-1], err


def _table(func) -> list:
    """The argument list of a test's @pytest.mark.parametrize, so every case is reused."""
    (mark,) = [m for m in func.pytestmark if m.name == "parametrize"]
    return list(mark.args[1])


# --- volumes ------------------------------------------------------------------------


def py_volume(spec: str, site: bool) -> tuple[bool, str]:
    try:
        return True, volume_signature(parse_volume_map(spec, site=site))
    except VolumeError as exc:
        return False, str(exc)


def c_volume(driver: Path, spec: str, site: bool) -> tuple[bool, str]:
    ok, out, _ = run_c(driver, "site-volume" if site else "volume", spec)
    if ok:
        assert out.endswith("\n") and out.count("\n") == 1, out
        return True, out[:-1]
    return False, out


def table_specs() -> list[str]:
    specs = [f"/test1Loc:{to}" for to, _ in _table(rules.test_user_volume_destination_table)]
    specs += [spec for spec, _ in _table(rules.test_user_volume_errors)]
    specs += [f"/x:{to}" for to in _table(rules.test_site_volume_forbidden_destinations)]
    specs += [
        "/scratch/me:/etc/passwd",
        "relative:/mnt",
        "/scratch/x:/data:RO:PERNODECACHE=SIZE=4T,BS=4M",
        "/x:/cache:perNodeCache=size=100M",
        '"/a:/b:ro"; /c:/d ;;/e:/f;',
        "",
        "/global/cscratch1;/var/opt/cray/dws:/var/opt/cray/dws:rec:slave;"
        "/etc/opt/cray/wlm_detect:/etc/opt/cray/wlm_detect;/p:/p:private",
        "/a:/b:slave:private",
        "/d:/c;/a:/b;/q:/r;/a:/c:rec:perNodeCache=size=100M:ro",
        "/a:/b:private:perNodeCache=size=1g,fs=xfs:rec:ro",
        "/a:/b:ro:rec:perNodeCache=size=1073741824,bs=1048576,method=loop,fstype=xfs:private",
        "/a//x/:/b/./c/:slave",
        "/scratch/me:/data:ro;/home/me:/mnt",
        '/we"ird\\dir:/mnt',
        "/home:/home; /scratch:/scratch:rec",
        # edges of the rules, not in the Python tables
        '""',
        '"',
        ' " /a:/b " ',
        "/:/mnt",
        "/a:/var/tmp/",
        "/a:/var/tmp:rec",
        "/a:/mnt:ro:rec:slave",
        "/a:/mnt:perNodeCache=",
        "/a:/mnt:perNodeCache=size=1G,,bs=1",
        "/a:/mnt:perNodeCache=size=1G,size=2G",
        "/a:/mnt:perNodeCache=size=1G,fs=xfs,FSTYPE=xfs",
        "/a:/mnt:perNodeCache=size=1G,bs",
        "/a:/mnt:perNodeCache=size=1G,=x",
        "/a:/mnt:perNodeCache=size=1G,method=LOOP,fs=XFS",
        "/a:/mnt:perNodeCache=size=1G,bs=0",
        "/a:/mnt:perNodeCache=size=8e",
        "/a:/mnt:perNodeCache=size=7.99999e",
        "/a:/mnt:perNodeCache=size=1g:perNodeCache=size=2g",
        "/a:/mnt:perNodeCache=size=1g:perNodeCache=size=x",
        "/a:/mnt:=ro",
        "/a:/mnt:Private=",
        "/a:/mnt\x7f",
        "/a:/mnt\t",
        "/é:/données:ro",
        "/a:/b;/a:/b",
        "/b:/x;/a:/y;/a/b:/z;/a-b:/w",
        ":",
        "::",
        "/a::ro",
        "/a:/../b",
        "/a:/b/.../c",
        "/a:/.hidden",
        "/a:/proc/1",
        "/a:/system",
        "/a:/opt/udiImage/",
        "/a:/dev",
    ]
    return specs


PIECES = [
    "/",
    "/",
    "a",
    "etc",
    "var",
    "tmp",
    "opt",
    "udiImage",
    "dev",
    ".",
    "..",
    ":",
    ":",
    ":",
    ";",
    '"',
    " ",
    "\t",
    "ro",
    "RO",
    "rec",
    "slave",
    "private",
    "perNodeCache",
    "=",
    "size",
    "bs",
    "fs",
    "fstype",
    "method",
    "loop",
    "xfs",
    ",",
    "1",
    "0",
    "5",
    ".5",
    "k",
    "G",
    "B",
    "e",
    "\x01",
    "é",
]


PATH_PARTS = ["a", "b", "data", "scratch", "etc", "var", "tmp", "opt", "udiImage", "dev", ".", ""]
PATH_PARTS += ["a", "b", "..", "/"]


def random_specs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        if rng.random() < 0.5:
            specs.append("".join(rng.choice(PIECES) for _ in range(rng.randint(1, 30))))
            continue
        # Mostly well-formed entries, so the accept side gets exercised too.
        entries = []
        for _ in range(rng.randint(1, 4)):
            paths = [
                "/" + "/".join(rng.choice(PATH_PARTS) for _ in range(rng.randint(0, 3)))
                for _ in range(2)
            ]
            flags = [
                rng.choice(["ro", "RO", "Rec", "slave", "private", "bogus"]),
                f"perNodeCache=size={rng.choice(['1', '5k', '1.5g', '4T', '0', 'x'])}"
                + rng.choice(["", ",bs=4k", ",fs=xfs", ",method=loop", ",FSTYPE=XFS"]),
            ]
            entries.append(":".join(paths + rng.sample(flags, rng.randint(0, 2))))
        specs.append(";".join(entries))
    return specs


def _compare_volumes(driver: Path, specs: list[str]) -> None:
    jobs = [(spec, site) for spec in specs for site in (False, True)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        c_results = list(pool.map(lambda job: c_volume(driver, *job), jobs))
    mismatches = [
        (spec, site, py, c)
        for (spec, site), c in zip(jobs, c_results, strict=True)
        if (py := py_volume(spec, site)) != c
    ]
    assert mismatches == []


def test_volume_tables_agree(driver):
    _compare_volumes(driver, table_specs())


def test_random_volume_specs_agree(driver):
    specs = random_specs(400, seed=20261123)
    # The generator must reach both sides of the rules, or the comparison proves little.
    for site in (False, True):
        accepted = sum(py_volume(s, site)[0] for s in specs)
        assert 15 < accepted < 385, (site, accepted)
    _compare_volumes(driver, specs)


SIZES = [text for text, _ in _table(rules.test_sizes)] + _table(rules.test_bad_sizes)
SIZES += [
    "0",
    "7e",
    "7.999999999999999999e",
    "7.9999999999999999999999999e",
    "8E",
    "9223372036854775807",
    "9223372036854775808",
    "000000000000000000000000000001k",
    "0000000000000000000000000000001",
    "1234567890123456789012345678901",
    "1.5",
    "1.5b",
    "1.5B",
    "1.000000000000000000000000001p",
    "0.0000000001k",
    "3.14159m",
    "5Bb",
    "5kB",
    "5KBB",
    "1.2.3",
    "5é",
]


def test_sizes_agree(driver):
    def py(text):
        try:
            return True, str(parse_size(text))
        except VolumeError as exc:
            return False, str(exc)

    def c(text):
        ok, out, _ = run_c(driver, "size", text)
        return ok, out.rstrip("\n") if ok else out

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        c_results = list(pool.map(c, SIZES))
    assert [(t, py(t)) for t in SIZES] == list(zip(SIZES, c_results, strict=True))


def test_non_ascii_case_folding_agrees(driver):
    assert py_volume("/a:/b:perNodeCache=size=5\u212a", False) == c_volume(
        driver, "/a:/b:perNodeCache=size=5\u212a", False
    )


# --- udiRoot.conf -------------------------------------------------------------------

BASE = rules.BASE_CONF


def py_conf(path: Path) -> tuple[bool, str, str]:
    try:
        cfg = load(str(path))
    except ConfigError as exc:
        return False, str(exc), ""
    values = dict(cfg.values)
    for name, module in cfg.modules.items():
        for sub, value in module.values.items():
            values[f"module_{name}_{sub}"] = value
    keys = sorted(values, key=lambda k: k.encode("utf-8", "surrogateescape"))
    lines = [f"{k}={values[k]}" for k in keys] + [f"siteFs={v}" for v in cfg.site_fs]
    return True, "".join(line + "\n" for line in lines), "".join(w + "\n" for w in cfg.warnings)


def c_conf(driver: Path, path: Path) -> tuple[bool, str, str]:
    ok, out, err = run_c(driver, "conf", str(path))
    return (ok, out, err) if ok else (False, out, "")


def write_conf(tmp_path: Path, name: str, text: str | bytes, mode: int = 0o644) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    os.chmod(path, mode)
    return path


CONF_TEXTS = {
    "site_example": (ROOT / "etc" / "udiRoot.conf.example").read_text(),
    "continuations": BASE
    + "siteFs=/home:/home;\\\n   /scratch:/scratch:rec\n"
    + "siteFs=/opt/site:/opt/site\n"
    + "imageGateway=http://gw1:5000 \\   \n\t http://gw2:5000\n"
    + "defaultModules=mpich, gpu\n"
    + "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64\n"
    + "module_my_mod_userhook=/bin/true\n"
    + "module_a_b_siteEnvAppend=X=1\n"
    + "this line has no equals sign and is ignored\n"
    + "  gatewayTimeout  =  30  \n"
    + "modprobePath=/sbin/modprobe\n"
    + "autoLoadKernelModule=1\n"
    + "kmodBasePath=/x\n"
    + "system=first\nsystem=second\n",
    "comment_continues": BASE + "# a comment \\\nsystem=swallowed\nsystem=kept\n",
    " indented_comment": BASE + "  # not a comment in column 0=really\n",
    "unknown_key": BASE + "bogusKey=1\n",
    "empty_key": BASE + "=value\n",
    "bad_module_key": BASE + "module__enabled=1\n",
    "module_no_subkey": BASE + "module_mpich=1\n",
    "crlf": BASE.replace("\n", "\r\n") + "system=crlf\r\n",
    "other_breaks": BASE + "system=a\vbatchType=b\fcpPath=c\x1cmvPath=d\rddPath=e\x1e",
    "odd_blanks": BASE + "system=\x1fx\x1f \n",
    "ends_continued": BASE + "siteFs=/a:/a;\\\n",
    "lone_backslash": BASE + "siteFs=/a:/a\\\n\\\n/b:/b\n",
    "no_final_newline": BASE + "system=x",
    "utf8_value": BASE + "system=clusté\n",
    "style_private": BASE + "mountPropagationStyle=private\n",
    "style_bad": BASE + "mountPropagationStyle=shared\n",
    "style_empty": BASE + "mountPropagationStyle=\n",
    "empty_file": "",
}
for _key in rules.BASE_CONF.split("\n"):
    if _key:
        name = _key.split("=")[0]
        CONF_TEXTS[f"missing_{name}"] = BASE.replace(_key + "\n", "")
        CONF_TEXTS[f"empty_{name}"] = BASE.replace(_key, name + "=  ")


@pytest.mark.parametrize("name", sorted(CONF_TEXTS))
def test_conf_texts_agree(driver, tmp_path, name):
    path = write_conf(tmp_path, "udiRoot.conf", CONF_TEXTS[name])
    assert c_conf(driver, path) == py_conf(path)


CONF_PIECES = [
    "system",
    "siteFs",
    "udiMount",
    "module_m_enabled",
    "autoLoadKernelModule",
    "bogus",
    "=",
    "=",
    " ",
    "\t",
    "#",
    "\\",
    "\n",
    "\n",
    "\r\n",
    "\v",
    "x",
    "/a:/b",
]


def test_random_conf_texts_agree(driver, tmp_path):
    rng = random.Random(7)
    for i in range(150):
        body = "".join(rng.choice(CONF_PIECES) for _ in range(rng.randint(0, 25)))
        text = BASE + body if i % 3 else body + "\n" + BASE
        path = write_conf(tmp_path, f"udiRoot{i}.conf", text)
        assert c_conf(driver, path) == py_conf(path), repr(text)


@pytest.mark.parametrize(
    "mode, owner", [(0o644, 0), (0o600, 0), (0o444, 0), (0o664, 0), (0o646, 0), (0o644, 65534)]
)
def test_trust_checks_agree(driver, tmp_path, mode, owner):
    path = write_conf(tmp_path, "udiRoot.conf", BASE, mode)
    os.chown(path, owner, -1)
    assert c_conf(driver, path) == py_conf(path)


def test_trust_refusals_of_odd_files_agree(driver, tmp_path):
    missing = tmp_path / "missing.conf"
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo, 0o644)
    for path in (missing, tmp_path, fifo):
        result = c_conf(driver, path)
        assert result == py_conf(path)
        assert not result[0]


def test_both_refuse_a_symlinked_config(driver, tmp_path):
    """Whoever can plant a symlink must not choose the trusted file: both open O_NOFOLLOW."""
    target = write_conf(tmp_path, "real.conf", BASE)
    link = tmp_path / "udiRoot.conf"
    link.symlink_to(target)
    assert py_conf(link) == c_conf(driver, link) == (
        False,
        f"cannot read {link}: Too many levels of symbolic links",
        "",
    )


def test_c_limits(driver, tmp_path):
    """Limits only the C side has: refused with a message, never truncated or overrun."""
    long_line = write_conf(tmp_path, "long.conf", BASE + "system=" + "x" * 9000 + "\n")
    assert c_conf(driver, long_line) == (
        False,
        "udiRoot.conf line 7: longer than 8192 bytes",
        "",
    )
    many = "".join(f"module_m{i}_enabled=1\n" for i in range(300))
    assert c_conf(driver, write_conf(tmp_path, "many.conf", BASE + many)) == (
        False,
        "udiRoot.conf has more than 256 keys",
        "",
    )
    nul = write_conf(tmp_path, "nul.conf", BASE.encode() + b"system=a\0b\n")
    assert c_conf(driver, nul) == (False, "udiRoot.conf contains a NUL byte", "")
    ok, msg = c_volume(driver, "/a:/" + "b" * 9000, False)
    assert (ok, msg) == (False, "volume list is longer than 8192 bytes")
    ok, msg = c_volume(driver, ";".join(f"/a:/m{i}" for i in range(65)), False)
    assert (ok, msg) == (False, "more than 64 volumes")
