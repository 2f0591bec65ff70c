"""The runtime's pure rules: the runtime tables of docs/behaviour.md, 'Scenarios the tests
cover', and 'Conversion and the .meta file', 'Runtime: image selection' to 'Runtime: modules'."""

import random

import pytest

from udiroot.command import NO_ENTRYPOINT, NO_WORKDIR, CommandError, select_command, select_workdir
from udiroot.config import parse_text
from udiroot.descriptor import (
    NO_IMAGE,
    DescriptorError,
    ImageRequest,
    parse_descriptor,
    select_image,
)
from udiroot.environ import (
    EnvError,
    apply_site_env,
    build_environment,
    parse_env_file,
    parse_env_option,
)
from udiroot.groups import (
    dynamic_group,
    dynamic_passwd,
    filter_group,
    find_user,
    parse_group,
    parse_passwd,
)
from udiroot.hostsfile import HostsfileError, hostsfile_text
from udiroot.meta import MetaError, image_allows, parse_meta, read_meta
from udiroot.modules import ModuleError, requested_modules, select_modules
from udiroot.volumes import (
    VolumeError,
    cache_total_limit,
    check_cache_policy,
    check_cache_total,
    container_signature,
    parse_site_volumes,
    parse_size,
    parse_user_volumes,
    requested_volumes,
    volume_signature,
)

IMAGE_ID = "a" * 63 + "0"
BASE_CONF = """\
udiMount=/var/udiMount
loopMount=/var/udiLoopMount
imagePath=/images
udiRootPath=/opt/shifter/udiRoot
etcPath=/etc/shifter/shifter_etc_files
rootfsType=tmpfs
"""

# --- volumes (docs/behaviour.md, 'Runtime: volumes'; the volume table of 'Scenarios the tests
# cover') ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to, allowed",
    [
        ("/etc/passwd", False),
        ("/var/log", False),
        ("/opt", False),
        ("opt", False),
        ("etc", False),
        ("/var/tmp", True),
        ("/mnt", True),
        ("/opt/myStuff", True),
        ("/input", True),
        ("/etc", False),
        ("/etcx", True),  # Unlike Shifter: component-wise
        ("/variable", True),
        ("/opt/udiImage", False),
        ("/opt/udiImage/bin", False),
        ("/opt/udiImagex", True),
        ("/var/tmp/sub", False),  # exactly /var/tmp only
        ("//etc", False),  # normalised before the rules
        ("/./etc/", False),
        ("/opt/", False),
        ("/", False),
        ("/dev/shm", False),
        ("/proc", False),
    ],
)
def test_user_volume_destination_table(to, allowed):
    if allowed:
        (vol,) = parse_user_volumes(f"/test1Loc:{to}")
        assert vol.target == to.rstrip("/") or vol.target == to
    else:
        with pytest.raises(VolumeError, match="Invalid mount request, permission denied!"):
            parse_user_volumes(f"/test1Loc:{to}")


def test_denied_message_names_paths_and_reason():
    with pytest.raises(VolumeError) as info:
        parse_user_volumes("/scratch/me:/etc/passwd")
    assert str(info.value) == (
        "Invalid mount request, permission denied! Cannot mount from /scratch/me to "
        "/etc/passwd: /etc and everything under it is reserved for the system."
    )
    with pytest.raises(
        VolumeError, match="from relative to /mnt: the source must be an absolute path"
    ):
        parse_user_volumes("relative:/mnt")


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("/a/../b:/mnt", "'..'"),
        ("/a:/mnt/..", "'..'"),
        ("/a:/mnt:rec", "site volumes only"),
        ("/a:/mnt:slave", "site volumes only"),
        ("/a:/mnt:private", "site volumes only"),
        ("/a", "no destination"),
        ("/a:", "destination is empty"),
        ("/a:/mnt:bogus", "unknown flag 'bogus'"),
        ("/a:/mnt:ro:RO", "flag ro given twice"),
        ("/a:/mnt:ro=1", "takes no value"),
        ("/a:/mnt:", "empty flag"),
        ("/a:/mnt:perNodeCache", "needs size"),
        ("/a:/mnt:perNodeCache=size=0", "more than 0"),
        ("/a:/mnt:perNodeCache=size=10G,method=nbd", "method must be loop"),
        ("/a:/mnt:perNodeCache=size=10G,fs=ext4", "fs must be xfs"),
        ("/a:/mnt:perNodeCache=size=10G,color=red", "unknown perNodeCache option"),
        ("/a:/mnt:perNodeCache=size=1x", "invalid size"),
        ("/a\x01:/mnt", "control character"),
    ],
)
def test_user_volume_errors(spec, reason):
    with pytest.raises(VolumeError, match=reason):
        parse_user_volumes(spec)


def test_user_volume_flags_case_insensitive_and_per_node_cache_defaults():
    (vol,) = parse_user_volumes("/scratch/x:/data:RO:PERNODECACHE=SIZE=4T,BS=4M")
    assert vol.ro and vol.cache is not None
    assert (vol.cache.size, vol.cache.bs, vol.cache.method, vol.cache.fstype) == (
        4 << 40,
        4 << 20,
        "loop",
        "xfs",
    )
    (vol,) = parse_user_volumes("/x:/cache:perNodeCache=size=100M")
    assert vol.cache.bs == 1 << 20


def test_volume_list_syntax_quotes_blanks_and_empty_entries():
    vols = parse_user_volumes('"/a:/b:ro"; /c:/d ;;/e:/f;')
    assert [v.text() for v in vols] == ["/a:/b:ro", "/c:/d", "/e:/f"]
    assert parse_user_volumes("") == []


def test_site_volumes_default_to_and_take_all_flags_but_not_both_propagations():
    vols = parse_site_volumes(
        "/global/cscratch1;/var/opt/cray/dws:/var/opt/cray/dws:rec:slave;"
        "/etc/opt/cray/wlm_detect:/etc/opt/cray/wlm_detect;/p:/p:private"
    )
    assert [v.text() for v in vols] == [
        "/global/cscratch1:/global/cscratch1",
        "/var/opt/cray/dws:/var/opt/cray/dws:rec:slave",
        "/etc/opt/cray/wlm_detect:/etc/opt/cray/wlm_detect",
        "/p:/p:private",
    ]
    with pytest.raises(VolumeError, match="slave and private"):
        parse_site_volumes("/a:/b:slave:private")


@pytest.mark.parametrize(
    "to", ["/opt", "/etc", "/var", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/"]
)
def test_site_volume_forbidden_destinations(to):
    with pytest.raises(VolumeError, match="cannot be replaced by a site mount"):
        parse_site_volumes(f"/x:{to}")


def test_site_fs_from_config_continuation_parses():
    cfg = parse_text(BASE_CONF + "siteFs=/home:/home;\\\n    /scratch:/scratch:rec\n")
    vols = [v for text in cfg.site_fs for v in parse_site_volumes(text)]
    assert [v.text() for v in vols] == ["/home:/home", "/scratch:/scratch:rec"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("5", 5),
        ("5k", 5 * 1024),
        ("500K", 500 * 1024),
        ("500KB", 512000),
        ("5b", 5),
        ("100M", 104857600),
        ("4T", 4 << 40),
        ("1.5g", 1610612736),
        ("1e", 1 << 60),
    ],
)
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "5x", "5kk", "5bb", " 5", "5 ", "-5", "1.", ".5", "8e"])
def test_bad_sizes(text):
    with pytest.raises(VolumeError):
        parse_size(text)


def test_signature_matches_shifter_byte_for_byte():
    vols = parse_site_volumes("/d:/c;/a:/b;/q:/r;/a:/c:rec:perNodeCache=size=100M:ro")
    assert volume_signature(vols) == (
        "/a:/b;/a:/c:ro:rec:perNodeCache=size=104857600,bs=1048576,method=loop,fstype=xfs;"
        "/d:/c;/q:/r"
    )


def test_signature_flag_order_and_round_trip():
    (vol,) = parse_site_volumes("/a:/b:private:perNodeCache=size=1g,fs=xfs:rec:ro")
    text = vol.text()
    assert text == (
        "/a:/b:ro:rec:perNodeCache=size=1073741824,bs=1048576,method=loop,fstype=xfs:private"
    )
    assert parse_site_volumes(text)[0].text() == text
    assert parse_site_volumes("/a//x/:/b/./c/:slave")[0].text() == "/a/x:/b/c:slave"


def test_container_signature_json():
    vols = parse_user_volumes("/scratch/me:/data:ro;/home/me:/mnt")
    sig = container_signature(IMAGE_ID, "alice", vols, ["mpich", "gpu"])
    assert sig == (
        '{"identifier":"' + IMAGE_ID + '","user":"alice",'
        '"volMap":"/home/me:/mnt;/scratch/me:/data:ro","modules":"mpich,gpu,"}'
    )
    assert container_signature(IMAGE_ID, "bob", [], []) == (
        '{"identifier":"' + IMAGE_ID + '","user":"bob","volMap":"","modules":""}'
    )
    vols = parse_user_volumes('/we"ird\\dir:/mnt')
    assert '"volMap":"/we\\"ird\\\\dir:/mnt"' in container_signature("x", "u", vols, [])


def test_command_line_volumes_replace_the_environments():
    env = {"SHIFTER_VOLUME": "/a:/b", "SLURM_SPANK_SHIFTER_VOLUME": "/c:/d"}
    assert requested_volumes([], env) == "/a:/b"
    assert requested_volumes([], {"SLURM_SPANK_SHIFTER_VOLUME": "/c:/d"}) == "/c:/d"
    assert requested_volumes(["/e:/f", "/g:/h"], env) == "/e:/f;/g:/h"


def test_per_node_cache_site_limits():
    vols = parse_user_volumes("/x:/cache:perNodeCache=size=300G")
    check_cache_policy(vols, None, ["xfs"])
    with pytest.raises(VolumeError, match="over the site limit"):
        check_cache_policy(vols, parse_size("200G"), ["xfs"])
    with pytest.raises(VolumeError, match="fs xfs is not allowed"):
        check_cache_policy(vols, None, ["ext4"])


def test_per_node_cache_total_per_launch():
    vols = parse_user_volumes("/x:/a:perNodeCache=size=40M;/x:/b:perNodeCache=size=40M;"
                              "/x:/c:ro;/x:/d:perNodeCache=size=40M")
    check_cache_total(vols, None)
    check_cache_total(vols, parse_size("120M"))
    with pytest.raises(VolumeError, match=r"Cannot mount from /x to /d: the perNodeCaches of "
                       r"this launch add up to 125829120 bytes, over the site total of "
                       r"104857600 \(perNodeCacheTotalSizeLimit\)\.$"):
        check_cache_total(vols, parse_size("100M"))
    assert cache_total_limit("1G", "200G") == 1 << 30
    assert cache_total_limit(None, "200G") == cache_total_limit(" ", "200G") == 200 << 30
    assert cache_total_limit(None, None) is None
    with pytest.raises(VolumeError, match=r"FAILED to parse udiRoot configuration\. "
                       r"\(perNodeCacheTotalSizeLimit: invalid size"):
        cache_total_limit("lots", "200G")


# --- image selection (docs/behaviour.md, 'Runtime: image selection') ------------------------------


def test_descriptor_parsing():
    assert parse_descriptor("docker:ubuntu:14.04") == ImageRequest("docker", "ubuntu:14.04")
    assert parse_descriptor("ubuntu:14.04", "docker") == ImageRequest("docker", "ubuntu:14.04")
    assert parse_descriptor("library/ubuntu", "docker") == ImageRequest("docker", "library/ubuntu")
    assert str(parse_descriptor("custom:thing", "docker")) == "custom:thing"
    assert parse_descriptor("id:" + IMAGE_ID).tag == IMAGE_ID
    assert parse_descriptor("docker:repo@sha256:" + "f" * 64).tag == "repo@sha256:" + "f" * 64


def test_missing_or_bad_default_type_is_rejected():
    with pytest.raises(DescriptorError, match="FAILED to determine image type"):
        parse_descriptor("ubuntu:14.04", None)
    with pytest.raises(DescriptorError, match="defaultImageType 'podman'"):
        parse_descriptor("ubuntu:14.04", "podman")


@pytest.mark.parametrize(
    "text",
    [
        "docker:ubuntu;rm -rf /",
        "docker:ubuntu latest",
        "docker:ubuntu$(id)",
        "docker:ubüntu",
        "custom:a/b",  # '/' only for docker and local
        "docker:",
    ],
)
def test_character_filtering(text):
    with pytest.raises(DescriptorError):
        parse_descriptor(text, "docker")


@pytest.mark.parametrize(
    "tag", ["../../etc/passwd", "/abs/path", IMAGE_ID.upper(), IMAGE_ID[:-1], IMAGE_ID + "0"]
)
def test_id_must_be_64_lowercase_hex(tag):
    with pytest.raises(DescriptorError):
        parse_descriptor("id:" + tag)


def test_local_only_when_allowed_and_absolute():
    with pytest.raises(DescriptorError, match="allowLocalChroot"):
        parse_descriptor("local:/srv/root")
    assert parse_descriptor("local:/srv/root", allow_local=True) == ImageRequest(
        "local", "/srv/root"
    )
    for bad in ("local:srv/root", "local:/srv/../etc"):
        with pytest.raises(DescriptorError):
            parse_descriptor(bad, allow_local=True)


def test_image_selection_precedence():
    pair = {"SHIFTER_IMAGETYPE": "id", "SHIFTER_IMAGE": IMAGE_ID}
    spank = {"SLURM_SPANK_SHIFTER_IMAGETYPE": "docker", "SLURM_SPANK_SHIFTER_IMAGE": "b:2"}
    shifter = {"SHIFTER": "docker:c:3"}
    assert select_image("docker:a:1", {**pair, **shifter}, "docker") == ImageRequest(
        "docker", "a:1"
    )
    assert select_image(None, {**pair, **spank, **shifter}) == ImageRequest("id", IMAGE_ID)
    assert select_image(None, {**spank, **shifter}) == ImageRequest("docker", "b:2")
    # mixed pair: type from SHIFTER_, tag from the SLURM twin
    mixed = {"SHIFTER_IMAGETYPE": "docker", "SLURM_SPANK_SHIFTER_IMAGE": "m:1"}
    assert select_image(None, mixed) == ImageRequest("docker", "m:1")
    # half a pair is ignored; SHIFTER is honoured (unlike Shifter)
    assert select_image(None, {"SHIFTER_IMAGE": "x", **shifter}) == ImageRequest("docker", "c:3")
    assert select_image(None, {"SHIFTER": "ubuntu"}, "docker") == ImageRequest("docker", "ubuntu")


@pytest.mark.parametrize(
    "option, env",
    [
        (None, {}),
        ("", {"SHIFTER": "docker:x"}),
        (None, {"SHIFTER_IMAGE": "ubuntu"}),
        (None, {"SHIFTER_IMAGETYPE": "docker", "SHIFTER_IMAGE": ""}),
    ],
)
def test_no_image_message(option, env):
    with pytest.raises(DescriptorError) as info:
        select_image(option, env, "docker")
    assert str(info.value) == NO_IMAGE == "No image specified, or specified incorrectly!"


# --- .meta and image ACL (docs/behaviour.md, 'Conversion and the .meta file', 'Runtime: identity')


def test_meta_written_by_our_gateway_reads_back():
    from imagegw.meta import render_meta

    text = render_meta(
        entry=["/bin/sh", "-c", "echo 'quoted' \"dq\" \\ é 😀"],
        cmd=["run"],
        workdir="/work",
        env=["PATH=/usr/bin:/bin", "EMPTY="],
        user_acl=[1000, 1001],
        group_acl=[50],
        user="alice",
    )
    meta = parse_meta(text)
    assert meta.format == "squashfs"
    assert meta.entry == ["/bin/sh", "-c", "echo 'quoted' \"dq\" \\ é 😀"]
    assert meta.cmd == ["run"]
    assert meta.workdir == "/work"
    assert meta.env == ["PATH=/usr/bin:/bin", "EMPTY="]
    assert (meta.user_acl, meta.group_acl, meta.user) == ([1000, 1001], [50], "alice")


def test_meta_old_python_list_form_including_a_quote_inside():
    text = (
        "FORMAT: squashfs\n"
        "ENTRY: ['/bin/sh', '-c', \"echo 'hi there'\"]\n"
        "CMD: [u'/usr/bin/run', u'it\\'s', 'a\\\\b', '\\x41\\n']\n"
    )
    meta = parse_meta(text)
    assert meta.entry == ["/bin/sh", "-c", "echo 'hi there'"]
    assert meta.cmd == ["/usr/bin/run", "it's", "a\\b", "A\n"]
    assert parse_meta("ENTRY: []\n").entry is None
    assert parse_meta("ENTRY: /bin/app --flag\n").entry == ["/bin/sh", "-c", "/bin/app --flag"]


@pytest.mark.parametrize(
    "value",
    ["['a'", "['a',]", "['a' 'b']", "['a'] x", "[a]", "['\\q']", '["\\u12"]', '["a', '["\\ud800"]'],
)
def test_meta_bad_argv_lists_are_errors(value):
    with pytest.raises(MetaError, match="Invalid ENTRY"):
        parse_meta(f"ENTRY: {value}\n")


def test_meta_parser_rules_comments_continuations_unknown_keys():
    text = (
        "# written by hand\n"
        "FORMAT:squashfs\r\n"
        "  WORKDIR :  /srv/app  \n"
        "ENV: LONG=one \\\n"
        "#comment inside a continuation is skipped\n"
        "   two \\\n"
        "three\n"
        "VOLUME: /data\n"
        "LABELS: whatever: with colons\n"
        "no colon on this line\n"
        "ENV: B=x:y\n"
    )
    meta = parse_meta(text)
    assert meta.format == "squashfs"
    assert meta.workdir == "/srv/app"
    assert meta.env == ["LONG=one two three", "B=x:y"]


def test_meta_acl_limits_and_bad_ids():
    ok = ",".join(str(i) for i in range(1, 1001))
    assert len(parse_meta(f"USERACL: {ok}\n").user_acl) == 1000
    with pytest.raises(MetaError, match="more than 1000"):
        parse_meta(f"USERACL: {ok},1001\n")
    assert parse_meta("GROUPACL: 5, ,6,\n").group_acl == [5, 6]
    for bad in ("USERACL: 12a", "USERACL: -1", "GROUPACL: 4294967295", "USERACL:", "USERACL: ,"):
        with pytest.raises(MetaError):
            parse_meta(bad + "\n")
    with pytest.raises(MetaError, match="Invalid ENV"):
        parse_meta("ENV: =oops\n")


def test_read_meta_missing_file(tmp_path):
    with pytest.raises(MetaError) as info:
        read_meta(str(tmp_path / "nope.meta"))
    assert str(info.value) == "FAILED to find requested image."
    path = tmp_path / "x.meta"
    path.write_bytes(b"FORMAT: squashfs\r\nWORKDIR: /w\r\n")
    assert read_meta(str(path)).workdir == "/w"


def test_acl_check_including_supplementary_groups():
    public = parse_meta("FORMAT: squashfs\n")
    assert image_allows(public, 1000, 100)
    private = parse_meta("USERACL: 1000,1001\nGROUPACL: 500\n")
    assert image_allows(private, 1001, 100)
    assert image_allows(private, 2000, 500)
    assert image_allows(private, 2000, 100, [7, 500])
    assert not image_allows(private, 2000, 100, [7, 8])
    only_groups = parse_meta("GROUPACL: 42\n")
    assert not image_allows(only_groups, 1000, 100)
    assert image_allows(only_groups, 1000, 100, (42,))


# --- modules (docs/behaviour.md, 'Runtime: modules') ----------------------------------------------

MODULES_CONF = BASE_CONF + (
    "defaultModules=mpich\n"
    "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64\n"
    "module_mpich_conflict=openmpi\n"
    "module_openmpi_siteEnv=OMPI=1\n"
    "module_gpu_siteEnv=GPU=1\n"
    "module_off_siteEnv=X=1\n"
    "module_off_enabled=0\n"
    "module_shut_siteEnv=X=1\n"
    "module_shut_enabled=False\n"
    "module_cuda_conflict=gpu other\n"
)


def _names(mods):
    return [m.name for m in mods]


def test_default_modules_and_user_replacement():
    cfg = parse_text(MODULES_CONF)
    assert _names(select_modules(cfg)) == ["mpich"]
    assert _names(select_modules(cfg, "gpu, openmpi,gpu")) == ["gpu", "openmpi"]
    assert select_modules(cfg, "none") == []
    assert select_modules(cfg, "NONE") == []
    assert select_modules(cfg, "") == []


def test_module_request_comes_from_option_then_environment():
    env = {"SHIFTER_MODULE": "gpu", "SLURM_SPANK_SHIFTER_MODULE": "openmpi"}
    assert requested_modules("none", env) == "none"
    assert requested_modules(None, env) == "gpu"
    assert requested_modules(None, {"SLURM_SPANK_SHIFTER_MODULE": "openmpi"}) == "openmpi"
    assert requested_modules(None, {}) is None


@pytest.mark.parametrize("request_", ["nosuch", "off", "gpu,off", "none,gpu", "shut"])
def test_unknown_or_disabled_module(request_):
    cfg = parse_text(MODULES_CONF)
    with pytest.raises(ModuleError, match="^Unknown shifter module: "):
        select_modules(cfg, request_)


def test_module_conflicts_either_direction():
    cfg = parse_text(MODULES_CONF)
    with pytest.raises(ModuleError) as info:
        select_modules(cfg, "mpich,openmpi")
    assert str(info.value) == "ERROR: cannot load conflicting modules openmpi and mpich"
    with pytest.raises(ModuleError) as info:
        select_modules(cfg, "openmpi,mpich")
    assert str(info.value) == "ERROR: cannot load conflicting modules mpich and openmpi"
    with pytest.raises(ModuleError, match="cuda and gpu"):
        select_modules(cfg, "gpu,cuda")


def test_unknown_default_module_fails_too():
    cfg = parse_text(BASE_CONF + "defaultModules=ghost\n")
    with pytest.raises(ModuleError, match="Unknown shifter module: ghost"):
        select_modules(cfg)


# --- command, entrypoint, workdir (docs/behaviour.md, 'Runtime: command, entrypoint, workdir') ----

ENTRY = ["/entry.sh", "-x"]
CMD = ["default-arg"]


@pytest.mark.parametrize(
    "args, use_entry, entry_opt, image_entry, shell, expected",
    [
        (["ls", "-l"], False, None, ENTRY, "/bin/bash", ["ls", "-l"]),
        ([], False, None, ENTRY, "/bin/bash", ["/bin/bash"]),
        ([], False, None, ENTRY, None, ["/bin/sh"]),
        ([], False, None, ENTRY, "", ["/bin/sh"]),
        (["a"], True, "/bin/other", ENTRY, None, ["/bin/other", "a"]),
        ([], True, "/bin/other", ENTRY, None, ["/bin/other"]),
        (["a", "b"], True, None, ENTRY, None, ["/entry.sh", "-x", "a", "b"]),
        ([], True, None, ENTRY, None, ["/entry.sh", "-x", "default-arg"]),
        ([], True, "", ENTRY, None, ["/entry.sh", "-x", "default-arg"]),
    ],
)
def test_entrypoint_args_table(args, use_entry, entry_opt, image_entry, shell, expected):
    argv = select_command(
        args,
        use_entrypoint=use_entry,
        entrypoint=entry_opt,
        image_entry=image_entry,
        image_cmd=CMD,
        shell=shell,
    )
    assert argv == expected


def test_bare_entrypoint_without_image_entry():
    assert select_command([], use_entrypoint=True, image_entry=ENTRY) == ENTRY
    for image_entry in (None, []):
        with pytest.raises(CommandError) as info:
            select_command(["x"], use_entrypoint=True, image_entry=image_entry, image_cmd=CMD)
        assert str(info.value) == NO_ENTRYPOINT == "Image does not have a defined entrypoint."


def test_workdir_rules():
    assert select_workdir("/home/me", image_workdir="/w") == "/home/me"
    assert select_workdir("/home/me", use_workdir=True, workdir="/x", image_workdir="/w") == "/x"
    assert select_workdir("/home/me", use_workdir=True, image_workdir="/w") == "/w"
    with pytest.raises(CommandError) as info:
        select_workdir("/home/me", use_workdir=True)
    assert str(info.value) == NO_WORKDIR
    assert NO_WORKDIR == "No workdir specified on command line or in image definition."


# --- environment (docs/behaviour.md, 'Runtime: environment') --------------------------------------


def test_path_example_append_then_prepend():
    env = {"PATH": "/usr/bin"}
    apply_site_env(
        env, {"siteEnvAppend": "PATH=/opt/udiImage/bin", "siteEnvPrepend": "PATH=/sbin"}, "t"
    )
    assert env["PATH"] == "/sbin:/usr/bin:/opt/udiImage/bin"


def test_append_prepend_on_absent_or_empty_and_exact_names():
    env = {"EMPTY": "", "PATH_2": "/keep", "PATH": "/usr/bin"}
    apply_site_env(
        env,
        {
            "siteEnvAppend": "EMPTY=/a NEW=/n PATH=",
            "siteEnvPrepend": "ABSENT=/p",
            "siteEnvUnset": "PATH",
        },
        "t",
    )
    assert env == {"EMPTY": "/a", "PATH_2": "/keep", "NEW": "/n", "ABSENT": "/p"}


def test_full_layer_order():
    cfg = parse_text(
        BASE_CONF
        + "siteEnv=SITE=site LAYER=site\n"
        + "siteEnvAppend=PATH=/opt/udiImage/bin\n"
        + "siteEnvUnset=DROPME\n"
        + "module_mpich_siteEnvPrepend=LD_LIBRARY_PATH=/opt/udiImage/modules/mpich/lib64\n"
        + "module_mpich_siteEnv=LAYER=module MOD=1\n"
        + "module_gpu_siteEnvAppend=PATH=/gpu/bin\n"
        + "module_gpu_siteEnv=MOD=2\n"
    )
    caller = {
        "HOME": "/home/me",
        "LD_PRELOAD": "/evil.so",
        "LD_LIBRARY_PATH": "/host/lib",
        "LAYER": "caller",
        "DROPME": "1",
        "SHIFTER_IMAGE": "old",
    }
    env = build_environment(
        caller,
        image_request="docker:ubuntu:22.04",
        image_id=IMAGE_ID,
        image_env=["PATH=/usr/bin", "LAYER=image", "IMG=1"],
        env_file=parse_env_file("# comment\n\nLAYER=file\nFILE=a=b\n"),
        env_options=["LAYER=option", "OPT=1"],
        modules=select_modules(cfg, "mpich,gpu"),
        site=cfg.values,
    )
    assert "LD_PRELOAD" not in env
    assert env["LD_LIBRARY_PATH"] == "/opt/udiImage/modules/mpich/lib64"
    assert env["HOME"] == "/home/me"
    assert env["SHIFTER_IMAGE"] == IMAGE_ID
    assert env["SHIFTER_IMAGEREQUEST"] == "docker:ubuntu:22.04"
    assert env["IMG"] == "1" and env["FILE"] == "a=b" and env["OPT"] == "1"
    assert env["LAYER"] == "site"  # global siteEnv is last
    assert env["MOD"] == "2"  # modules in order
    assert env["SITE"] == "site"
    assert env["PATH"] == "/usr/bin:/gpu/bin:/opt/udiImage/bin"
    assert "DROPME" not in env


def test_clearenv_starts_empty():
    env = build_environment({"HOME": "/h"}, clearenv=True, image_request="id:x", image_id=IMAGE_ID)
    assert env == {"SHIFTER_IMAGEREQUEST": "id:x", "SHIFTER_IMAGE": IMAGE_ID}


@pytest.mark.parametrize("text", ["NOEQUALS", "=value", "NAME=", "="])
def test_env_option_format(text):
    with pytest.raises(EnvError, match="^Improperly formatted environment variable"):
        parse_env_option(text)


def test_env_option_value_may_hold_equals():
    assert parse_env_option("A=b=c") == ("A", "b=c")


def test_env_file_rules():
    text = "  # indented comment\n\t\nA=1\r\n  B= spaced value \nC=\n"
    assert parse_env_file(text) == [("A", "1"), ("B", " spaced value "), ("C", "")]
    for bad in ("JUSTANAME\n", "=x\n", "MY VAR=1\n"):
        with pytest.raises(EnvError, match="Improperly formatted environment variable on line 1"):
            parse_env_file(bad)


def test_bad_site_env_word_names_its_source():
    with pytest.raises(EnvError, match="siteEnv entry in module mpich: NOVALUE"):
        apply_site_env({}, {"siteEnv": "NOVALUE"}, "module mpich")


# --- hostsfile (docs/behaviour.md, 'Runtime: setupRoot and unsetupRoot') --------------------------


def test_hostsfile():
    assert hostsfile_text("host1/4") == "host1\n" * 4
    assert hostsfile_text("nid00001/2 nid00002/1") == "nid00001\nnid00001\nnid00002\n"
    assert hostsfile_text("") == ""


@pytest.mark.parametrize("text", ["host1 host2", "host1/0", "host1/", "/4", "h;x/1", "h/1x"])
def test_hostsfile_bad_node_lists(text):
    with pytest.raises(HostsfileError):
        hostsfile_text(text)


# --- passwd and group (docs/behaviour.md, 'Runtime: identity'; 'Runtime: building the
# container', steps 7-8) ---------------------------------------------------------------------------

GROUP_FILE = """\
root:x:0:alice
wheel:x:10:root,alice
alice:x:1000:
staff::50:bob,alice
empty::60:
nogroupmembers:x:70
users:x:100:bob
broken line
bad:x:notanumber:alice
"""


def test_group_filter_lists_only_the_user():
    assert filter_group(GROUP_FILE, "alice") == (
        "wheel:x:10:alice\n"
        "alice:x:1000:alice\n"
        "staff:x:50:alice\n"  # empty password field parsed correctly (unlike Shifter)
        "empty:x:60:\n"
        "nogroupmembers:x:70:\n"
        "users:x:100:\n"
    )


def test_group_filter_max_group_count():
    limited = filter_group(GROUP_FILE, "alice", 2)
    assert "wheel:x:10:alice\n" in limited and "alice:x:1000:alice\n" in limited
    assert "staff:x:50:\n" in limited
    assert filter_group(GROUP_FILE, "alice", 0) == filter_group(GROUP_FILE, "alice")


def test_passwd_lookup_reads_the_uid_field_only():
    """find_user parses only lines holding "<uid>:"; the uid must still be read from the
    uid field, first valid entry wins, leading zeros and a CR ending as before."""
    passwd = (
        "gidonly:x:7:1000:g:/g:/bin/sh\n"  # 1000 is its gid
        "short:x:1000:1000\n"  # too few fields: skipped, not a match
        "digits:x:\uff11\uff10\uff10\uff10:1:d:/d:/bin/sh\n"  # fullwidth digits: not an id
        "zeros:x:0001000:5:z:/z:/bin/sh\r\n"
        "later:x:1000:5:l:/l:/bin/sh\n"
    )
    entry = find_user(passwd, 1000)
    assert (entry.name, entry.uid, entry.shell) == ("zeros", 1000, "/bin/sh")
    assert find_user(passwd, 7).name == "gidonly"
    assert find_user(passwd, 0) is None and find_user(passwd, 5) is None
    assert find_user("root:x:0:0:r:/root:/bin/sh", 0).name == "root"  # no final newline


def test_group_filter_names_are_whole_fields():
    text = (
        "malice:x:200:alicex,xalice\n"  # the name only as part of other names
        "alice:x:201\n"  # the user's own group, no member field
        "team:x:202:bob,alice\r\n"
        "wide:x:\uff12\uff10\uff13:alice\n"  # fullwidth digits: not an id
        "zero:x:000:alice\n"
        "big:x:4294967295:alice\n"  # above the largest id
    )
    assert filter_group(text, "alice") == (
        "malice:x:200:\nalice:x:201:alice\nteam:x:202:alice\n"
    )


def test_fast_group_filter_and_user_lookup_read_lines_as_the_parsers_do():
    """filter_group and find_user take shortcuts (only lines holding the user's name or
    "<uid>:" are looked at closely); on odd texts they must still agree with the plain
    reading: parse_group / parse_passwd line by line."""

    def filter_by_parser(text: str, user: str, max_groups: int) -> str:
        out, listed = [], 0
        for group in parse_group(text):
            if group.gid == 0:
                continue
            member = ""
            if (user in group.members or group.name == user) and (
                    max_groups <= 0 or listed < max_groups):
                member, listed = user, listed + 1
            out.append(f"{group.name}:x:{group.gid}:{member}\n")
        return "".join(out)

    def find_by_parser(text: str, uid: int):
        return next((e for e in parse_passwd(text) if e.uid == uid), None)

    rng = random.Random(13)
    pieces = ["a", "b", "ab", ":", ",", "0", "1", "9", "00", "\r", "\n", " ", "\uff11",
              "4294967295", "4294967296", "1:", ":1:", "x:1:1:g:/h:/s\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(40)))
        for user in ("a", "ab"):
            for max_groups in (0, 1):
                assert filter_group(text, user, max_groups) == \
                    filter_by_parser(text, user, max_groups), (text, user, max_groups)
        for uid in (0, 1, 9, 4294967295):
            assert repr(find_user(text, uid)) == repr(find_by_parser(text, uid)), (text, uid)


def test_passwd_lookup_and_dynamic_files():
    passwd = (
        "root:x:0:0:root:/root:/bin/bash\n"
        "alice:x:1000:1000:Alice A.:/home/alice:/bin/bash\n"
        "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
        "broken:x:12\n"
    )
    assert find_user(passwd, 1000).name == "alice"
    assert find_user(passwd, 4242) is None
    entries = parse_passwd(passwd)
    assert [e.name for e in entries] == ["root", "alice", "nobody"]
    assert dynamic_passwd([entries[1], entries[2], entries[1]]) == (
        "alice:x:1000:1000:Alice A.:/home/alice:/bin/bash\n"
        "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
    )
    groups = [("alice", 1000), ("proj", 2000), ("root", 0), ("nogroup", 65534), ("alice", 1000)]
    assert dynamic_group(groups, "alice", [1000, 2000]) == (
        "alice:x:1000:alice\nproj:x:2000:alice\nnogroup:x:65534:\n"
    )
    assert dynamic_group(groups, "alice", [1000, 2000], max_groups=1) == (
        "alice:x:1000:alice\nproj:x:2000:\nnogroup:x:65534:\n"
    )
