"""``/var/hostsfile``: an MPI-style host list, one line per task (docs/behaviour.md, 'Runtime:
setupRoot and unsetupRoot', 'Runtime: per-container sshd').

The node list is ``"host1/4 host2/2"`` (setupRoot ``-N``): each host is written as many
times as its count. Host names are ``[A-Za-z0-9._-]`` and counts 1..65536, so the file
can only ever hold host names, one per line.
"""

from __future__ import annotations

MAX_COUNT = 65536
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_DIGITS = "0123456789"


class HostsfileError(ValueError):
    pass


def parse_node_list(text: str) -> list[tuple[str, int]]:
    nodes: list[tuple[str, int]] = []
    for word in text.replace("\t", " ").split(" "):
        if word == "":
            continue
        host, slash, count = word.partition("/")
        if (
            not slash
            or host == ""
            or any(c not in _HOST_CHARS for c in host)
            or count == ""
            or len(count) > 6
            or any(c not in _DIGITS for c in count)
            or not 1 <= int(count) <= MAX_COUNT
        ):
            raise HostsfileError(
                f"Invalid node list entry '{word}': expected host/count, count 1..{MAX_COUNT}"
            )
        nodes.append((host, int(count)))
    return nodes


def hostsfile_text(node_list: str) -> str:
    return "".join(f"{host}\n" * count for host, count in parse_node_list(node_list))
