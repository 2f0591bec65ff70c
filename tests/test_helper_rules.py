"""The C helper's rules (helpers/) agree with the Python ones: udiRoot.conf and its key
tables, volumes, image ids, .meta files.

Builds helpers/build/test_conf_volume-san (ASan + UBSan + LSan) once and runs it on the
same inputs as udiroot.config, udiroot.volumes, udiroot.descriptor and udiroot.meta: same
accept/reject, same message, same result. A sanitizer report fails the test (the driver
aborts and the exit status shows).
"""

from __future__ import annotations

import os
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_runtime_rules as rules

from udiroot import config
from udiroot.config import ConfigError, load
from udiroot.descriptor import valid_image_id
from udiroot.meta import HELPER_KEYS, MetaError, read_meta
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
    "unknown_key_continued": BASE + "# one\n\nsiteFS=/a:/a;\\\n/b:/b\n",
    "defunct_key": BASE + "nodeContextPrefix=\nnodeContextPrefix = /x\n",
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
    # Only ASCII blanks and breaks count (Python's str.strip()/splitlines() also take
    # NBSP, U+3000, U+0085, U+2028...; the helper reads bytes).
    "unicode_blanks": BASE + "system=\u00a0x\u3000\n",
    "unicode_blank_key": BASE + "\u00a0system=x\n",
    "unicode_breaks": BASE + "system=x\u2028batchType=y\x85z\u2029w\n",
    "unicode_blank_continued": BASE + "siteFs=/a:/a;\\\u00a0\n/b:/b\n",
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


# --- one set of key tables ------------------------------------------------------------


def test_key_tables_are_the_same_in_c_and_python(driver):
    """conf.c's tables (required, tool paths, optional, deprecated, module subkeys) are
    config.py's, key for key and in order: a key added on one side only fails here."""
    ok, out, _ = run_c(driver, "tables", "-")
    assert ok
    tables: dict[str, list[str]] = {}
    for line in out.splitlines():
        name, key = line.split(" ")
        tables.setdefault(name, []).append(key)
    assert tables == {
        "required": list(config.REQUIRED),
        "tool": list(config.TOOL_PATHS),
        "optional": list(config.OPTIONAL),
        "deprecated": list(config.DEPRECATED),
        "defunct": list(config.DEFUNCT),
        "module": list(config.MODULE_KEYS),
    }


def test_tool_paths_are_accepted_and_never_required(driver, tmp_path):
    """Shifter's files set the six tool paths and ours must read them; a file without
    them (as etc/udiRoot.conf.example) is complete, because nothing runs those tools."""
    tools = "".join(f"{key}=/nonexistent/{key}\n" for key in config.TOOL_PATHS)
    for name, text in (("with", BASE + tools), ("without", BASE)):
        path = write_conf(tmp_path, f"{name}.conf", text)
        result = c_conf(driver, path)
        assert result == py_conf(path)
        assert result[0], result


# --- image ids ------------------------------------------------------------------------

IMAGE_IDS = [
    "a..b",
    "a...b",
    "ab..",
    "..",
    ".",
    ".a",
    "a.",
    "a.b",
    "_a",
    "-a",
    "+a",
    "a-b+c_d.e",
    "0",
    "a" * 128,
    "a" * 129,
    "",
    "a/b",
    "/a",
    "a b",
    "a\tb",
    "a:b",
    "a\\b",
    "a\x7f",
    "é",
    "a\u0661",
    "0123456789abcdef" * 4,
    "sha256:" + "0" * 64,
]


def test_image_ids_one_rule(driver):
    """The front end takes an id from the tag index or the gateway and the helper opens
    <imagePath>/<id>.meta: both apply one rule (the front end used to pass a..b)."""
    from shifter.frontend import valid_id

    def c(image_id: str) -> bool:
        ok, out, _ = run_c(driver, "image-id", image_id)
        assert ok and out in ("valid\n", "invalid\n"), out
        return out == "valid\n"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        c_results = list(pool.map(c, IMAGE_IDS))
    table = [(i, valid_image_id(i), valid_id(i)) for i in IMAGE_IDS]
    assert table == [(i, ok, ok) for i, ok in zip(IMAGE_IDS, c_results, strict=True)]
    assert not valid_image_id("a..b")
    assert valid_image_id("0123456789abcdef" * 4)


# --- .meta ----------------------------------------------------------------------------


def _gateway_meta() -> str:
    from imagegw.meta import render_meta

    return render_meta(
        entry=["/bin/sh", "-c", "echo 'quoted' \"dq\" \\ é"],
        cmd=["run"],
        workdir="/work",
        env=["PATH=/usr/bin:/bin", "EMPTY="],
        user_acl=[1000, 1001],
        group_acl=[50],
        user="alice",
    )


_ACL_1000 = ",".join(str(i) for i in range(1, 1001))
META_TEXTS: dict[str, str | bytes] = {
    "gateway": _gateway_meta(),
    "public": "FORMAT: squashfs\n",
    "xfs": "FORMAT: xfs\n",
    "format_empty": "FORMAT:\n",
    "format_absent": "USERACL: 5\n",
    "format_ext4": "FORMAT: ext4\n",
    "format_case": "FORMAT: SquashFS\n",
    "format_long": "FORMAT: " + "x" * 40 + "\n",
    "format_long_cut_in_a_character": "FORMAT: a" + "é" * 20 + "\n",
    "format_31_bytes": "FORMAT: " + "y" * 31 + "\n",
    "format_dup": "FORMAT: xfs\nFORMAT: squashfs\n",
    "format_dup_bad_first": "FORMAT: ext4\nFORMAT: squashfs\n",
    "format_continued": "FORMAT: squash\\\nfs\n",
    "acl": "USERACL: 1000,1001\nGROUPACL: 50\n",
    "acl_blanks": "USERACL:  5 , ,6,\t\n",
    "acl_empty": "USERACL:\n",
    "acl_only_commas": "GROUPACL: ,,\n",
    "acl_negative": "USERACL: -1\n",
    "acl_plus": "USERACL: +5\n",
    "acl_hex": "USERACL: 0x10\n",
    "acl_max": "USERACL: 4294967294\n",
    "acl_over": "USERACL: 4294967295\n",
    "acl_huge": "GROUPACL: 99999999999999999999\n",
    "acl_11_digits": "USERACL: 00000000001\n",
    "acl_10_digits": "USERACL: 0000000001\n",
    "acl_fullwidth_digit": "USERACL: \uff15\n",
    "acl_blank_inside": "USERACL: 1 2\n",
    "acl_1000": f"USERACL: {_ACL_1000}\n",
    "acl_1001": f"USERACL: {_ACL_1000},1001\n",
    "acl_dup": "USERACL: 1\nUSERACL: 2,3\n",
    "acl_dup_bad_second": "USERACL: 1\nUSERACL: x\n",
    "acl_continued": "USERACL: 1,\\\n 2,\\\n#comment\n3\n",
    "acl_continued_to_eof": "GROUPACL: 7 \\",
    "acl_backslash_last_line": "USERACL: 5\\\n",
    "crlf": "FORMAT: squashfs\r\nUSERACL: 5\r\nGROUPACL: 6\r\n",
    "cr_only": "FORMAT: squashfs\rUSERACL: 5\r",
    "odd_blanks": "\tFORMAT\v:\f squashfs \t\nGROUPACL :\x0b9\x0c\n",
    "unicode_blank": "USERACL:\u00a05\n",
    "comment": "#USERACL: 5\nFORMAT: squashfs\n",
    "indented_comment": " #USERACL: 5\n",
    "no_colon": "FORMAT squashfs\nUSERACL 5\n",
    "empty_key": ": 5\n",
    "lowercase_key": "useracl: 5\n",
    "key_with_blank": "USER ACL: 5\n",
    "colon_in_value": "GROUPACL: 5:6\n",
    "long_line": "FORMAT: squashfs\nLABEL: " + "x" * 200_000 + "\nUSERACL: 3\n",
    "long_key": "K" * 300 + ": v\nUSERACL: 3\n",
    "front_end_keys": "ENV: A=1\nENV: [\"B=2\", \"C=3\"]\nENTRY: [\"/bin/app\"]\n"
    "CMD: ['x']\nWORKDIR: /w\nUSER: bob\nUSERACL: 9\n",
    "bad_env": "ENV: =oops\nUSERACL: 5\n",
    "bad_env_list": "ENV: [\"=x\"]\n",
    "bad_entry": "ENTRY: ['a'\nGROUPACL: 4\n",
    "bad_cmd": "CMD: [a]\n",
    "nul": b"FORMAT: squashfs\nUSERACL: 5\0\n",
    "not_utf8": b"FORMAT: squashfs\nLABEL: \xff\xfe\nUSERACL: 5\n",
    "not_utf8_acl": b"USERACL: 5\xff\n",
    "empty": "",
    "only_newlines": "\n\n\n",
    "too_large": "FORMAT: squashfs\n#" + "x" * (1 << 20) + "\n",
    "largest": ("FORMAT: squashfs\n#" + "x" * (1 << 20))[: 1 << 20],
}
# ENTRY, CMD, ENV... are the front end's: the helper does not read them (it would only
# grow the setuid code), so a bad one is refused by the front end alone, before any
# helper runs. Every other text gets the same answer from both.
FRONT_END_ONLY = {"bad_env", "bad_env_list", "bad_entry", "bad_cmd"}


def py_meta(path: Path, keys=HELPER_KEYS) -> tuple[bool, str]:
    try:
        meta = read_meta(str(path), keys)
    except MetaError as exc:
        return False, str(exc)
    return True, (
        f"FORMAT={meta.format or ''}\n"
        f"USERACL={','.join(map(str, meta.user_acl))}\n"
        f"GROUPACL={','.join(map(str, meta.group_acl))}\n"
    )


def c_meta(driver: Path, path: Path) -> tuple[bool, str]:
    ok, out, _ = run_c(driver, "meta", str(path))
    return ok, out


@pytest.mark.parametrize("name", sorted(META_TEXTS))
def test_meta_texts_agree(driver, tmp_path, name):
    """Both .meta readers: same accept/reject, same message, same FORMAT and ACLs."""
    text = META_TEXTS[name]
    path = tmp_path / "image.meta"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    c = c_meta(driver, path)
    assert c == py_meta(path)
    full = py_meta(path, None)
    if name in FRONT_END_ONLY:
        assert c[0] and not full[0], (c, full)
    else:
        assert full == c


def test_meta_files_that_are_not_plain_files_agree(driver, tmp_path):
    """Missing, a directory, a FIFO (must not hang either reader), a symlink (never
    followed: imagePath is root's, but a link could point anywhere)."""
    real = tmp_path / "real.meta"
    real.write_text("FORMAT: squashfs\n")
    link = tmp_path / "link.meta"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.meta"
    os.mkfifo(fifo)
    directory = tmp_path / "dir.meta"
    directory.mkdir()
    expected = {
        tmp_path / "missing.meta": "FAILED to find requested image.",
        directory: f"FAILED to find requested image. ({directory} is not a regular file)",
        fifo: f"FAILED to find requested image. ({fifo} is not a regular file)",
        link: f"FAILED to find requested image. ({link}: Too many levels of symbolic links)",
    }
    for path, message in expected.items():
        assert c_meta(driver, path) == py_meta(path) == (False, message)


META_KEYS = ["FORMAT", "USERACL", "GROUPACL", "ENV", "#USERACL", "", "X"]
META_VALUES = [" ", "\t", "\r", ",", ",", "5", "12", "4294967295", "squashfs", "xfs", "-",
               "x", "\\", "\\\n", ":"]


def test_random_meta_texts_agree(driver, tmp_path):
    rng = random.Random(10)
    accepted = 0
    for i in range(200):
        lines = []
        for _ in range(rng.randint(0, 5)):
            value = "".join(rng.choice(META_VALUES) for _ in range(rng.randint(0, 6)))
            lines.append(rng.choice(META_KEYS) + rng.choice([":", ": ", " :", ""]) + value)
        text = "\n".join(lines) + rng.choice(["", "\n", "\r\n"])
        path = tmp_path / f"r{i}.meta"
        path.write_text(text)
        c = c_meta(driver, path)
        assert c == py_meta(path), repr(text)
        accepted += c[0]
    # The generator must reach both sides of the rules, or the comparison proves little.
    assert 30 < accepted < 170, accepted


# --- module lists and flags -----------------------------------------------------------

MODULE_CONF = BASE + "".join(
    [
        "module_demo_siteEnv=DEMO=1\n",
        "module_other_siteEnv=OTHER=1\n",
        "module_other_conflict=demo\n",
        "module_tabbed_conflict=x\tdemo\n",
        "module_vt_conflict=x\vdemo\n",
        "module_off_enabled=0\n",
        "module_offF_enabled=FALSE\n",
        "module_offNo_enabled=No\n",
        "module_offSpaced_enabled=no \\\n\n",
        "module_on_enabled=yes\n",
        "module_empty_enabled=\n",
        "module_nbsp_enabled=0\u00a0\n",
        "module_my@mod_siteEnv=1\n",
        "module_none_siteEnv=1\n",
        f"module_{'a' * 64}_siteEnv=1\n",
        f"module_{'b' * 65}_siteEnv=1\n",
        "module_\u00e9t\u00e9_siteEnv=1\n",
    ]
    + [f"module_m{i}_siteEnv=1\n" for i in range(33)]
)
MODULE_LISTS = [
    "",
    "none",
    "NONE",
    " none \t",
    "none\n",
    "none,demo",
    "none ,",
    "demo",
    "demo,other",
    "other,demo",
    "demo,demo",
    " demo ,\tother",
    "demo,tabbed",
    "demo,vt",
    "demo\n",
    "demo\u00a0",
    ",,,",
    " , ,",
    "off",
    "offF",
    "offNo",
    "offSpaced",
    "on",
    "empty",
    "nbsp",
    "my@mod",
    "a" * 64,
    "b" * 65,
    "\u00e9t\u00e9",
    "nosuch",
    "Demo",
    ",".join(f"m{i}" for i in range(32)),
    ",".join(f"m{i}" for i in range(33)),
    ",".join(f"m{i}" for i in range(32)) + ",m0,demo",
    " " * 3000 + "demo",
]


def test_module_lists_agree(driver, tmp_path):
    """The modules a --module list selects (the front end's select_modules, and the
    helper's, which re-checks the list it is handed): same names or same message."""
    from udiroot.modules import ModuleError, select_modules

    path = write_conf(tmp_path, "udiRoot.conf", MODULE_CONF)
    cfg = load(str(path))

    def py(text: str) -> tuple[bool, str]:
        try:
            return True, "".join(m.name + "\n" for m in select_modules(cfg, text))
        except ModuleError as exc:
            return False, str(exc)

    def c(text: str) -> tuple[bool, str]:
        # Not run_c: a name with a newline is echoed in the message, on both sides.
        proc = subprocess.run([str(driver), "modules", str(path), text], capture_output=True,
                              env=SAN_ENV, timeout=60)
        out = proc.stdout.decode("utf-8", "surrogateescape")
        err = proc.stderr.decode("utf-8", "surrogateescape")
        assert "Sanitizer" not in err and "runtime error" not in err, err
        assert proc.returncode in (0, 1), (text, proc.returncode, err)
        return (True, out) if proc.returncode == 0 else (False, err[:-1])

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        c_results = list(pool.map(c, MODULE_LISTS))
    assert [(t, py(t)) for t in MODULE_LISTS] == list(zip(MODULE_LISTS, c_results, strict=True))


FLAG_VALUES = ["", " ", "1", "0", "true", "TRUE", "True", "yes", "YES", "on", "On", "off",
               "no", "false", "2", "1 x", "1 # enabled", "yes\t", " on", "truexxxx", "yes!",
               "1\u00a0", "\u00a0yes", "y", "t", "enabled"]


def test_config_flags_agree(driver):
    """allowLocalChroot, allowLibcPwdCalls, mountUdiRootWritable... mean the same to both
    (default 0 and default 1)."""
    from udiroot.config import UdiRootConfig

    def py(value: str) -> str:
        cfg = UdiRootConfig({"k": value}, [], {})
        return f"{int(cfg.flag('k', False))}{int(cfg.flag('k', True))}\n"

    def c(value: str) -> str:
        ok, out, _ = run_c(driver, "flag", value)
        assert ok
        return out

    assert [(v, py(v)) for v in FLAG_VALUES] == [(v, c(v)) for v in FLAG_VALUES]
