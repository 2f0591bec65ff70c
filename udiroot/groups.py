"""The container's ``/etc/passwd`` and ``/etc/group`` (docs/behaviour.md, 'Runtime: identity',
'Runtime: building the container' steps 7 and 8).

Group filter (step 8): every group keeps its name and gid; a group "contains the user"
when the user is in its member list or the group has the user's name (a personal group);
such groups list only the user as member, up to ``maxGroupCount`` of them; all other
groups list no members; gid 0 groups are dropped. Unlike Shifter, ``maxGroupCount`` 0 or unset
means no limit, and empty fields (``grp::100:``) are read as empty, not skipped.

``populateEtcDynamically=1`` (step 7): ``passwd`` holds the user plus ``usersToImport``,
``group`` the groups the caller collected, with the user listed in the ones whose gid
is among the user's gids. Password fields are always ``x``.

Lines are ``:``-split with no other processing; a line that does not have the right
number of fields or a decimal id is skipped, as libc's parser skips it.

:func:`container_files` applies these rules for a launch: the front ends (``shifter`` as
the user, ``setupRoot`` as root) hand the files to the helper (``--etc-fd``), which writes
them into the container's ``/etc`` after the site's root hooks ran. They grant nothing:
the container's processes have the ids and groups the kernel gave them.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from udiroot.config import UdiRootConfig

NSSWITCH = (
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
    "protocols: files\nservices: files\nethers: files\nrpc: files\nnetgroup: files\n"
)
MAX_USERS = 64  # the caller and usersToImport

MAX_ID = 0xFFFFFFFE


class PasswdEntry:
    __slots__ = ("name", "uid", "gid", "gecos", "home", "shell")

    def __init__(self, name: str, uid: int, gid: int, gecos: str, home: str, shell: str) -> None:
        self.name = name
        self.uid = uid
        self.gid = gid
        self.gecos = gecos
        self.home = home
        self.shell = shell

    def line(self) -> str:
        return f"{self.name}:x:{self.uid}:{self.gid}:{self.gecos}:{self.home}:{self.shell}\n"

    def __repr__(self) -> str:
        return f"PasswdEntry({self.line().rstrip()!r})"


class GroupEntry:
    __slots__ = ("name", "gid", "members")

    def __init__(self, name: str, gid: int, members: list[str]) -> None:
        self.name = name
        self.gid = gid
        self.members = members

    def __repr__(self) -> str:
        return f"GroupEntry({self.name!r}, {self.gid}, {self.members!r})"


def _id(text: str) -> int | None:
    # isascii() and isdigit() together are [0-9]+ (isdigit alone takes other scripts' digits).
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _lines(text: str) -> list[str]:
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def parse_passwd(text: str) -> list[PasswdEntry]:
    entries = []
    for line in _lines(text):
        fields = line.split(":")
        if len(fields) != 7 or fields[0] == "":
            continue
        uid, gid = _id(fields[2]), _id(fields[3])
        if uid is None or gid is None:
            continue
        entries.append(PasswdEntry(fields[0], uid, gid, fields[4], fields[5], fields[6]))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    entries = []
    for line in _lines(text):
        fields = line.split(":")
        # Three fields (no member list at all) is common enough in hand-made files.
        if len(fields) not in (3, 4) or fields[0] == "":
            continue
        gid = _id(fields[2])
        if gid is None:
            continue
        members = [m for m in fields[3].split(",") if m] if len(fields) == 4 else []
        entries.append(GroupEntry(fields[0], gid, members))
    return entries


# Both functions below run on every launch over the site's whole files (tens of
# thousands of lines at a large site), so they avoid per-line work where the rules allow.


def find_user(text: str, uid: int) -> PasswdEntry | None:
    """The first passwd entry with ``uid`` (docs/behaviour.md, 'Runtime: identity': the name comes
    from etcPath/passwd). Only lines holding ``<uid>:`` are parsed: a line whose uid field
    reads as ``uid`` (leading zeros or not) has that text where the field ends."""
    needle = f"{uid}:"
    pos = text.find(needle)
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        if end < 0:
            end = len(text)
        for entry in parse_passwd(text[start:end]):
            if entry.uid == uid:
                return entry
        pos = text.find(needle, end)
    return None


def filter_group(text: str, user: str, max_groups: int = 0) -> str:
    """Step 8 on the text of a group file; returns the new text. The same reading of a
    line as :func:`parse_group` (three or four ``:`` fields, a name, a decimal gid), done
    with ``find`` on the colons: no object per group, and the member list (most of a
    large file's bytes) is split only on a line that holds the user's name at all."""
    _check_user(user)
    out = []
    listed = 0
    for line in text.split("\n"):
        if line.endswith("\r"):
            line = line[:-1]
        a = line.find(":")
        if a <= 0:  # no field separator, or an empty name
            continue
        b = line.find(":", a + 1)
        if b < 0:
            continue
        c = line.find(":", b + 1)
        if c >= 0 and line.find(":", c + 1) >= 0:
            continue  # five fields or more
        gid = _id(line[b + 1:] if c < 0 else line[b + 1:c])
        if not gid:  # None (not an id) or 0 (dropped)
            continue
        member = ""
        if user in line:
            name = line[:a]
            if name == user or (c >= 0 and user in line[c + 1:].split(",")):
                if max_groups <= 0 or listed < max_groups:
                    member = user
                    listed += 1
        out.append(f"{line[:a]}:x:{gid}:{member}\n")
    return "".join(out)


def dynamic_passwd(entries: Iterable[PasswdEntry]) -> str:
    """``passwd`` for populateEtcDynamically: the given users, first of each name kept."""
    out = []
    seen: list[str] = []
    for entry in entries:
        if entry.name in seen or not _clean_fields(
            entry.name, entry.gecos, entry.home, entry.shell
        ):
            continue
        seen.append(entry.name)
        out.append(entry.line())
    return "".join(out)


def dynamic_group(
    groups: Iterable[tuple[str, int]], user: str, user_gids: Iterable[int], max_groups: int = 0
) -> str:
    """``group`` for populateEtcDynamically from ``(name, gid)`` pairs (first of each gid
    kept); the user is listed in groups whose gid is one of ``user_gids``, up to
    ``max_groups`` (0 = no limit); gid 0 dropped."""
    _check_user(user)
    mine = list(user_gids)
    out = []
    seen: list[int] = []
    listed = 0
    for name, gid in groups:
        if gid == 0 or gid in seen or name == "" or not _clean_fields(name):
            continue
        seen.append(gid)
        member = ""
        if gid in mine and (max_groups <= 0 or listed < max_groups):
            member = user
            listed += 1
        out.append(f"{name}:x:{gid}:{member}\n")
    return "".join(out)


def _check_user(user: str) -> None:
    if user == "" or any(c in user for c in ":,\n"):
        raise ValueError(f"invalid user name for a group file: {user!r}")


def _clean_fields(*fields: str) -> bool:
    # A ':' or newline inside a field would shift or split the line for every reader.
    return not any(":" in f or "\n" in f for f in fields)


def _etc_text(etc_path: str, name: str, required: bool) -> str | None:
    try:
        with open(f"{etc_path}/{name}", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        if required:
            raise ValueError(f"Cannot read {etc_path}/{name}: it does not exist") from None
        return None
    except OSError as exc:
        raise ValueError(f"Cannot read {etc_path}/{name}: {exc.strerror}") from None


def container_files(cfg: UdiRootConfig, user: str, gid: int, groups: Sequence[int]
                    ) -> dict[str, str]:
    """The container's ``passwd``, ``group`` and ``nsswitch.conf`` as the site's rules
    make them for ``user`` (primary ``gid``, supplementary ``groups``): the filtered
    ``etcPath/group`` (the helper copies the rest of ``etcPath``), or with
    ``populateEtcDynamically`` the user and ``usersToImport`` from ``etcPath`` (or libc
    with ``allowLibcPwdCalls``)."""
    from udiroot.config import ConfigError

    etc = cfg.get("etcPath") or ""
    try:
        max_groups = cfg.number("maxGroupCount")
    except ConfigError:
        max_groups = -1
    if max_groups < 0:
        raise ValueError("FAILED to parse udiRoot configuration. (maxGroupCount must be a "
                         "whole number)")
    if not cfg.flag("populateEtcDynamically"):
        group = _etc_text(etc, "group", False)
        return {} if group is None else {"group": filter_group(group, user, max_groups)}
    libc = cfg.flag("allowLibcPwdCalls")
    names = [user]
    for name in cfg.words("usersToImport"):
        if name not in names and len(names) < MAX_USERS:
            names.append(name)
    if libc:
        import pwd

        entries = []
        for name in names:
            try:
                pw = pwd.getpwnam(name)
            except KeyError:
                continue
            entries.append(PasswdEntry(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_gecos,
                                       pw.pw_dir, pw.pw_shell))
    else:
        known = parse_passwd(_etc_text(etc, "passwd", True) or "")
        entries = [next(e for e in known if e.name == n) for n in names
                   if any(e.name == n for e in known)]
    pairs = []
    table = None if libc else parse_group(_etc_text(etc, "group", False) or "")
    for wanted in [gid, *groups, *(e.gid for e in entries)]:
        name = None
        if table is None:
            import grp

            try:
                name = grp.getgrgid(wanted).gr_name
            except KeyError:
                pass
        else:
            name = next((g.name for g in table if g.gid == wanted), None)
        if name is not None and "," not in name:
            pairs.append((name, wanted))
    return {
        "passwd": dynamic_passwd(entries),
        "group": dynamic_group(pairs, user, [gid, *groups], max_groups),
        "nsswitch.conf": NSSWITCH,
    }
