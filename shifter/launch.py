"""``shifter``: run a command in a container image (docs/behaviour.md, 'Runtime: shifter options' to
'Runtime: modules').

    shifter [-h] [-v] [-i|--image=type:tag] [-V|--volume=from:to[:flags][;…]]…
            [--entrypoint[=cmd]] [-w path|--workdir[=path]] [-m|--module=a,b|none] [--gpu[=ids]]
            [--writable-tmpfs[=size]] [-e|--env=NAME=VALUE]… [--env-file=path]
            [-E|--clearenv] [--version]
            [--] [command [args…]]

The unprivileged half of the runtime. It parses the options, picks the image and its id,
reads the image's metadata, layers the environment, chooses the command, working
directory and modules, and then *becomes* the setuid helper with ``execv`` (no fork, so
signals, stdin, the terminal and the exit status are the command's)::

    shifter-helper run (--image-id ID | --local PATH) [--volume LIST]…
        --modules LIST|none [--gpu N,N [--gpu-cap N,N] [--gpu-file DIR/NAME=PATH]…]
        [--gpu-mount TARGET=PATH]… --workdir DIR [--pmix-dir DIR] [--writable-tmpfs BYTES]
        --request TYPE:TAG --env-fd N [--etc-fd N] [--verbose] -- CMD [ARG…]

The helper trusts none of it and re-checks what needs checking (helpers/PROTOCOL.md).
Every error found here is one clear message on stderr and exit status 1, before exec;
a mistake on the command line exits 2 (``USAGE_STATUS``), as argparse-based tools do.
"""

from __future__ import annotations

import posix
import sys

from shifter import __version__
from shifter.frontend import (
    EXPECTED_ERRORS,
    NO_ARG,
    OPTIONAL,
    REQUIRED,
    Failure,
    UsageError,
    caller_environ,
    env_fd,
    error_status,
    exec_helper,
    getopt_long,
    helper_path,
    resolve_id,
    usable_image,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from udiroot.config import Module, UdiRootConfig

# Shifter's getopt string is "hvV:i:e:w:m:" (+E): -w takes an argument; only the long
# --workdir has the bare form, as only --entrypoint exists for the entrypoint.
SHORT = {
    "h": NO_ARG,
    "v": NO_ARG,
    "E": NO_ARG,
    "V": REQUIRED,
    "i": REQUIRED,
    "e": REQUIRED,
    "w": REQUIRED,
    "m": REQUIRED,
}
LONG = {
    "help": NO_ARG,
    "verbose": NO_ARG,
    "clearenv": NO_ARG,
    "version": NO_ARG,
    "volume": REQUIRED,
    "image": REQUIRED,
    "env": REQUIRED,
    "env-file": REQUIRED,
    "module": REQUIRED,
    "entrypoint": OPTIONAL,
    "workdir": OPTIONAL,
    "gpu": OPTIONAL,
    "writable-tmpfs": OPTIONAL,
}

USAGE = """\
Usage: shifter [options] [--] [command [args...]]

Run a command in a container image as yourself.

Options:
  -i, --image=TYPE:TAG      image to use, e.g. docker:ubuntu:22.04 (TYPE: docker,
                            custom, id, local); else $SHIFTER_IMAGETYPE and
                            $SHIFTER_IMAGE, else $SHIFTER
  -V, --volume=FROM:TO[:ro|:perNodeCache=size=N][;...]
                            bind a host directory into the container; repeatable;
                            replaces $SHIFTER_VOLUME
      --entrypoint[=CMD]    run CMD, or bare: the image's entrypoint (+ its CMD
                            when no command is given)
  -w DIR, --workdir[=DIR]   working directory (default: the current one); bare
                            --workdir: the image's WORKDIR
  -m, --module=A,B|none     site modules to load instead of the default ones
      --gpu[=N,N]           inject the node's GPU driver and only these GPUs
                            (/dev/nvidiaN indexes, or GPU-/MIG- UUIDs; bare: all
                            of them); also requested by $CUDA_VISIBLE_DEVICES
      --writable-tmpfs[=SIZE]
                            make the image writable: changes go to a layer in
                            memory of at most SIZE (bare: the site's limit),
                            gone when the command ends
  -e, --env=NAME=VALUE      set a variable in the container; repeatable
      --env-file=FILE       set variables from FILE (NAME=VALUE lines, # comments)
  -E, --clearenv            start from an empty environment
  -v, --verbose             say what is being done
  -h, --help                show this help
      --version             show the version

Without a command: $SHELL, else /bin/sh. Options end at the first non-option.
Exit status: the command's; 1 when shifter fails before the command starts;
2 for a mistake on the command line.
"""


USAGE_STATUS = 2
# Where a volume or module request can come from besides the options: the names
# udiroot.volumes.requested_volumes and udiroot.modules.requested_modules read
# (tests/test_launch_frontend.py launches with each of them).
VOLUME_VARS = ("SHIFTER_VOLUME", "SLURM_SPANK_SHIFTER_VOLUME")
MODULE_VARS = ("SHIFTER_MODULE", "SLURM_SPANK_SHIFTER_MODULE")


class Options:
    """What the command line asked for (``None``: not given)."""

    __slots__ = (
        "image",
        "volumes",
        "entrypoint",
        "use_entrypoint",
        "workdir",
        "use_workdir",
        "module",
        "use_gpu",
        "gpu",
        "writable",
        "env",
        "env_file",
        "clearenv",
        "verbose",
        "help",
        "version",
        "command",
    )

    def __init__(self) -> None:
        self.image: str | None = None
        self.volumes: list[str] = []
        self.entrypoint: str | None = None
        self.use_entrypoint = False
        self.workdir: str | None = None
        self.use_workdir = False
        self.module: str | None = None
        self.use_gpu = False
        self.gpu: str | None = None
        self.writable: str | None = None  # "" bare, else the SIZE given
        self.env: list[str] = []
        self.env_file: str | None = None
        self.clearenv = False
        self.verbose = False
        self.help = False
        self.version = False
        self.command: list[str] = []

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Options({fields})"


def parse_args(argv: Sequence[str]) -> Options:
    """docs/behaviour.md, 'Runtime: shifter options'. Raises :class:`UsageError`; ``-e``
    values are checked here (Shifter's "Improperly formatted environment variable"), raising
    ``EnvError``."""
    opts = Options()
    pairs, opts.command = getopt_long(argv, SHORT, LONG)
    for name, value in pairs:
        if name in ("h", "help"):
            opts.help = True
        elif name in ("v", "verbose"):
            opts.verbose = True
        elif name == "version":
            opts.version = True
        elif name in ("E", "clearenv"):
            opts.clearenv = True
        elif name in ("i", "image"):
            opts.image = value
        elif name in ("V", "volume"):
            opts.volumes.append(value or "")
        elif name in ("e", "env"):
            from udiroot.environ import parse_env_option

            parse_env_option(value or "")
            opts.env.append(value or "")
        elif name == "env-file":
            opts.env_file = value
        elif name in ("m", "module"):
            opts.module = value
        elif name == "gpu":
            opts.use_gpu = True
            opts.gpu = value
        elif name == "writable-tmpfs":
            opts.writable = value or ""
        elif name == "entrypoint":
            opts.use_entrypoint = True
            opts.entrypoint = value or None
        elif name in ("w", "workdir"):
            opts.use_workdir = True
            opts.workdir = value or None
    return opts


def read_env_file(path: str) -> list[tuple[str, str]]:
    from udiroot.environ import parse_env_file

    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as exc:
        raise Failure(f"Failed to read env file {path}: {exc.strerror}") from None
    return parse_env_file(text)


def plan(opts: Options, environ: Mapping[str, str]) -> list[str]:
    """Everything up to exec: the helper's argv (the env fd already made). Raises
    :class:`Failure` or one of the rule modules' ``ValueError`` subclasses, whose
    messages are the ones to print."""
    from udiroot.command import select_command, select_workdir
    from udiroot.config import load_or_exit
    from udiroot.descriptor import select_image
    from udiroot.environ import build_environment
    from udiroot.meta import ImageMeta

    cfg = load_or_exit()
    allow_local = cfg.flag("allowLocalChroot")
    request = select_image(opts.image, environ, cfg.get("defaultImageType"), allow_local)

    # Cheap checks first: a typo must not cost a gateway round trip.
    # The volume and module rules are imported only when there is something for them to
    # read (most launches ask for neither): ~0.3 ms of every launch otherwise.
    volume_args: list[str] = []
    if opts.volumes or any(environ.get(name) for name in VOLUME_VARS):
        from udiroot.volumes import (
            cache_total_limit,
            check_cache_total,
            parse_user_volumes,
            requested_volumes,
        )

        if opts.volumes:
            volume_args = [v for v in opts.volumes if v.strip()]
        else:
            env_volumes = requested_volumes([], environ)
            if env_volumes.strip():
                volume_args = [env_volumes]
        volumes = [vol for text in volume_args for vol in parse_user_volumes(text)]
        if any(vol.cache is not None for vol in volumes):
            limit = cache_total_limit(cfg.get("perNodeCacheTotalSizeLimit"),
                                      cfg.get("perNodeCacheSizeLimit"))
            check_cache_total(volumes, limit)
    modules: list[Module] = []
    if (opts.module is not None or cfg.get("defaultModules")
            or any(environ.get(name) for name in MODULE_VARS)):
        from udiroot.modules import requested_modules, select_modules

        modules = select_modules(cfg, requested_modules(opts.module, environ))
    writable = None
    if opts.writable is not None:
        from udiroot.writable import writable_size

        writable = writable_size(opts.writable or None, allowed=cfg.flag("allowWritableTmpfs"),
                                 limit=cfg.get("writableTmpfsSizeLimit"),
                                 local=request.type == "local")
    env_file = read_env_file(opts.env_file) if opts.env_file is not None else []
    gpus = None
    gpu_files: list[str] = []
    gpu_devices = gpu_caps = ""
    if opts.use_gpu or environ.get("CUDA_VISIBLE_DEVICES"):
        from udiroot.gpu import (
            driver_files,
            helper_argument,
            node_gpus,
            nvml_library,
            requested_gpus,
        )

        gpus = requested_gpus(opts.use_gpu, opts.gpu, environ)

    if request.type == "local":
        image_id, target = request.tag, ["--local", request.tag]
        meta = ImageMeta()
    else:
        image_id = resolve_id(cfg, request, opts.verbose)
        target = ["--image-id", image_id]
        meta = usable_image(cfg, image_id, posix.getuid(), posix.getgid(), posix.getgroups())

    cdi = None
    if gpus is not None:
        gpu_files = driver_files(cfg.values)
        resolved = node_gpus(gpus, cfg.values, nvml_library(gpu_files))
        if (cfg.get("cdiSpecDirs") or "").strip():
            from udiroot.gpu import cdi_plan

            cdi = cdi_plan(cfg.values, gpus, resolved, gpu_files)
        gpu_devices = helper_argument(resolved.gpus)
        gpu_caps = helper_argument(resolved.caps)

    command = select_command(
        opts.command,
        use_entrypoint=opts.use_entrypoint,
        entrypoint=opts.entrypoint,
        image_entry=meta.entry,
        image_cmd=meta.cmd,
        shell=environ.get("SHELL"),
    )
    workdir = select_workdir(
        "" if opts.use_workdir else _cwd(),
        use_workdir=opts.use_workdir,
        workdir=opts.workdir,
        image_workdir=meta.workdir,
    )
    if cdi is not None and cdi.hooks:
        from udiroot.cdi import hook_command
        from udiroot.gpu import DEFAULT_SITE_RESOURCES

        hook_files, command = hook_command(
            cdi, cfg.get("siteResources") or DEFAULT_SITE_RESOURCES, command)
        gpu_files += [f for f in hook_files if f not in gpu_files]
    if not workdir.startswith("/"):
        # Shifter chdir()s after chroot("/") + chdir("/"): a relative path is from /.
        workdir = "/" + workdir

    env = build_environment(
        environ,
        image_request=_request_text(opts.image, environ),
        image_id=image_id,
        clearenv=opts.clearenv,
        image_env=meta.env,
        env_file=env_file,
        env_options=opts.env,
        modules=modules,
        site=cfg.values,
        gpus=gpus,
        gpu_env=cdi.env if cdi is not None else (),
    )
    pmix_dir = None
    if "PMIX_SERVER_TMPDIR" in env:
        from udiroot.pmix import add_mca_names, pmix_step_dir

        pmix_dir = pmix_step_dir(env)
        if pmix_dir is not None:
            add_mca_names(env)
    fd = env_fd(env)
    argv = [helper_path(environ), "run", *target]
    files = _etc_files(cfg)
    if files:
        argv += ["--etc-fd", str(env_fd(files, "shifter-etc"))]
    for text in volume_args:
        argv += ["--volume", text]
    argv += ["--modules", ",".join(m.name for m in modules) or "none"]
    if gpus is not None:
        argv += ["--gpu", gpu_devices]
        if gpu_caps:
            argv += ["--gpu-cap", gpu_caps]
        for spec in gpu_files:
            argv += ["--gpu-file", spec]
        for target, source in cdi.mounts if cdi is not None else ():
            argv += ["--gpu-mount", f"{target}={source}"]
    if pmix_dir is not None:
        argv += ["--pmix-dir", pmix_dir]
    if writable is not None:
        argv += ["--writable-tmpfs", str(writable)]
    argv += ["--workdir", workdir, "--request", str(request), "--env-fd", str(fd)]
    if opts.verbose:
        argv.append("--verbose")
    argv += ["--", *command]
    return argv


def _etc_files(cfg: UdiRootConfig) -> dict[str, str]:
    """The container's passwd/group for the caller (``udiroot.groups``). A caller the
    site's passwd does not know gets none: the helper refuses them with its message."""
    from udiroot.groups import container_files, find_user

    uid = posix.getuid()
    if cfg.flag("allowLibcPwdCalls"):
        import pwd

        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return {}
    else:
        try:
            with open(f"{cfg.get('etcPath')}/passwd", encoding="utf-8",
                      errors="surrogateescape") as f:
                entry = find_user(f.read(), uid)
        except OSError:
            return {}
        if entry is None:
            return {}
        user = entry.name
    if uid == 0 or user == "" or any(c in user for c in ":,\n"):
        return {}
    gid = posix.getgid()
    return container_files(cfg, user, gid, [g or gid for g in posix.getgroups()])


def _request_text(option: str | None, environ: Mapping[str, str]) -> str | None:
    """``SHIFTER_IMAGEREQUEST`` as Shifter sets it: the ``--image`` value exactly as
    given (``id:<id>``, ``docker:ubuntu:22.04``, ``ubuntu:22.04``); without ``--image``,
    the caller's ``SHIFTER_IMAGEREQUEST`` (else ``SLURM_SPANK_SHIFTER_IMAGEREQUEST``),
    which the Slurm plugin set to the job's original request when it pinned the id;
    else, when the image came from ``$SHIFTER``, that value. An image chosen by the
    ``SHIFTER_IMAGETYPE``/``SHIFTER_IMAGE`` pair alone sets none (``None``), as in
    Shifter."""
    if option is not None:
        return option
    for name in ("SHIFTER_IMAGEREQUEST", "SLURM_SPANK_SHIFTER_IMAGEREQUEST"):
        if name in environ:
            return environ[name]
    pair = (environ.get("SHIFTER_IMAGETYPE") or environ.get("SLURM_SPANK_SHIFTER_IMAGETYPE"),
            environ.get("SHIFTER_IMAGE") or environ.get("SLURM_SPANK_SHIFTER_IMAGE"))
    if pair[0] and pair[1]:
        return None
    return environ.get("SHIFTER") or environ.get("SLURM_SPANK_SHIFTER") or None


def _cwd() -> str:
    try:
        return posix.getcwd()
    except OSError as exc:
        raise Failure(f"Failed to determine current working directory: {exc.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns 1 on any error; on success it does not return (exec)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            opts = parse_args(args)
        except UsageError as exc:
            print(f"shifter: error: {exc}\nTry 'shifter --help' for more information.",
                  file=sys.stderr)
            return USAGE_STATUS
        if opts.help:
            sys.stdout.write(USAGE)
            return 0
        if opts.version:
            print(f"shifter {__version__}")
            return 0
        helper_argv = plan(opts, caller_environ())
    except EXPECTED_ERRORS as exc:
        return error_status(exc)
    return exec_helper(helper_argv, opts.verbose)


if __name__ == "__main__":
    sys.exit(main())
