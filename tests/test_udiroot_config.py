"""udiRoot.conf: Shifter's parse rules, as site files are written today."""

import os

import pytest

from udiroot.config import ConfigError, check_trusted, load, parse_text

BASE = """\
# site configuration
udiMount=/var/udiMount
loopMount = /var/udiLoopMount
imagePath=/images
udiRootPath=/opt/shifter/udiRoot
etcPath=/etc/shifter/shifter_etc_files
rootfsType=tmpfs
"""


def test_site_file_parses_with_continuations_and_accumulating_site_fs():
    text = BASE + (
        "siteFs=/home:/home;\\\n"
        "   /scratch:/scratch:rec\n"
        "siteFs=/opt/site:/opt/site\n"
        "imageGateway=http://gw1:5000 http://gw2:5000\n"
        "system=mycluster\n"
        "defaultModules=mpich, gpu\n"
        "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64\n"
        "module_my_mod_userhook=/bin/true\n"
        "this line has no equals sign and is ignored\n"
        "gatewayTimeout=30\n"
        "modprobePath=/sbin/modprobe\n"
        "autoLoadKernelModule=1\n"
    )
    cfg = parse_text(text)
    assert cfg.get("loopMount") == "/var/udiLoopMount"
    assert cfg.site_fs == ["/home:/home; /scratch:/scratch:rec", "/opt/site:/opt/site"]
    assert cfg.gateways == ["http://gw1:5000", "http://gw2:5000"]
    assert cfg.system == "mycluster" and cfg.gateway_timeout == 30
    assert cfg.default_modules == ["mpich", "gpu"]
    assert cfg.modules["mpich"].values["siteEnvPrepend"].startswith("LD_LIBRARY_PATH=")
    assert cfg.modules["my_mod"].values["userhook"] == "/bin/true"
    assert cfg.warnings == ["IGNORING parameter autoLoadKernelModule, deprecated."]


def test_value_keeps_later_equals_signs_and_comment_only_in_column_zero():
    cfg = parse_text(BASE + "siteEnv=A=1 B=2\n  #notacomment=1\n".replace("  #", "#"))
    assert cfg.get("siteEnv") == "A=1 B=2"


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigError, match="Couldn't understand key: bogusKey"):
        parse_text(BASE + "bogusKey=1\n")


def test_unknown_module_subkey_fails():
    with pytest.raises(ConfigError, match="module_mpich_nonsense"):
        parse_text(BASE + "module_mpich_nonsense=1\n")


@pytest.mark.parametrize("key", ["udiMount", "imagePath", "rootfsType"])
def test_missing_required_key_is_named(key):
    text = "\n".join(line for line in BASE.splitlines() if not line.startswith(key))
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key + " "))
    with pytest.raises(ConfigError, match=key):
        parse_text(text)


def test_file_must_be_root_owned_and_not_group_writable(tmp_path):
    path = tmp_path / "udiRoot.conf"
    path.write_text(BASE)
    os.chmod(path, 0o644)
    assert load(str(path)).get("imagePath") == "/images"
    os.chmod(path, 0o664)
    with pytest.raises(ConfigError, match="writable by group or others"):
        check_trusted(str(path))
    os.chmod(path, 0o644)
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="not owned by root"):
        load(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "nope.conf"))


def test_failed_parse_exits_1_with_shifters_message(tmp_path, capsys):
    from udiroot.config import load_or_exit

    path = tmp_path / "udiRoot.conf"
    path.write_text(BASE + "nonsense=1\n")
    with pytest.raises(SystemExit) as info:
        load_or_exit(str(path))
    assert info.value.code == 1
    err = capsys.readouterr().err.splitlines()
    line = len(BASE.splitlines()) + 1
    assert err == [f"Couldn't understand key: nonsense ({path} line {line})",
                   "FAILED to parse udiRoot configuration."]


def test_unknown_key_names_file_line_and_the_nearest_key(tmp_path, capsys):
    """A typo in a site file: the user reads where it is and what was probably meant
    (Shifter's own words first, as scripts match them)."""
    from udiroot.config import load_or_exit

    path = tmp_path / "udiRoot.conf"
    cases = [
        ("siteFS=/a:/a\n", "siteFS", "did you mean siteFs?"),
        ("# c\nsiteEnvApend=A=1\n", "siteEnvApend", "did you mean siteEnvAppend?"),
        ("module_mpi_siteenv=A=1\n", "module_mpi_siteenv", "did you mean module_mpi_siteEnv?"),
        ("zzzz=1\n", "zzzz", None),
    ]
    for text, key, hint in cases:
        path.write_text(BASE + text)
        line = len((BASE + text).splitlines())
        with pytest.raises(SystemExit):
            load_or_exit(str(path))
        first = capsys.readouterr().err.splitlines()[0]
        assert first.startswith(f"Couldn't understand key: {key} ({path} line {line}")
        assert first.endswith(f"; {hint})" if hint else f"line {line})"), first


def test_unknown_key_line_is_where_its_logical_line_starts():
    """The helper's message (no path: the tests compare both parsers' words) counts
    physical lines, and a continued line is reported where it begins."""
    start = len(BASE.splitlines()) + 3
    with pytest.raises(ConfigError) as info:
        parse_text(BASE + "# one\n\nsiteFS=/a:/a;\\\n/b:/b\nsystem=x\n")
    assert str(info.value) == f"Couldn't understand key: siteFS (udiRoot.conf line {start})"
    assert (info.value.key, info.value.line) == ("siteFS", start)


def test_nodecontextprefix_is_accepted_silently_as_shifter_does():
    """Shifter's own test files carry a blank nodeContextPrefix= (a defunct key)."""
    for value in ("", "/var/udiMount/node", " x "):
        cfg = parse_text(BASE + f"nodeContextPrefix={value}\n")
        assert cfg.warnings == [] and "nodeContextPrefix" not in cfg.values
