"""The .meta file the runtime reads: keys, JSON argv lists, ACLs, ENV lines."""

import json

from imagegw.meta import meta_from_config, render_meta


def _lines(text):
    return text.splitlines()


def test_meta_from_config_has_every_field_in_order():
    config = {
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"],
            "Entrypoint": ["/bin/sh", "-c", "echo 'quoted'"],
            "Cmd": ["run"],
            "WorkingDir": "/work",
        }
    }
    lines = _lines(meta_from_config(config, user_acl=[1000, 1001], group_acl=[50]))
    assert lines[0] == "FORMAT: squashfs"
    assert json.loads(lines[1].split(": ", 1)[1]) == ["/bin/sh", "-c", "echo 'quoted'"]
    assert lines[2] == 'CMD: ["run"]'
    assert lines[3] == "WORKDIR: /work"
    assert lines[4] == "USERACL: 1000,1001"
    assert lines[5] == "GROUPACL: 50"
    assert lines[6:] == ["ENV: PATH=/usr/bin:/bin", "ENV: LANG=C.UTF-8"]


def test_public_image_has_no_acl_lines_and_string_cmd_becomes_shell():
    text = render_meta(cmd="echo hi")
    assert "USERACL" not in text and "GROUPACL" not in text
    assert 'CMD: ["/bin/sh", "-c", "echo hi"]' in text


def test_env_that_the_line_format_cannot_hold_is_skipped_with_a_warning():
    warnings = []
    text = render_meta(env=["GOOD=1", "BAD=a\nb", "TRAIL=x\\", "NOEQUALS"], warn=warnings.append)
    assert _lines(text) == ["FORMAT: squashfs", "ENV: GOOD=1"]
    assert len(warnings) == 3 and "BAD" in warnings[0]


def test_import_meta_names_the_user():
    assert _lines(render_meta(user="alice"))[-1] == "USER: alice"
