"""Container runtimes for crunch-run: ``local``, ``docker``, ``singularity``.

Everything that decides an argv is a pure function of a :class:`ContainerSpec` and is unit-tested;
every value from the container record becomes exactly one argv element (``--flag=value`` form, so
a value starting with ``-`` can never be taken for an option) and nothing ever goes through a
shell. Values that no argv or environment can carry (NUL bytes, ``=`` in a variable name) and
images that would be parsed as options are refused with :class:`RuntimeSpecError`, which the
runner treats as a permanent failure of the container.

Images: crunchgate has no Keep, so ``container_image`` is used as an image *name*
(``debian:12``, ``ghcr.io/x/y@sha256:...``; for singularity also a ``.sif`` path or any
``scheme://`` URI, and a bare name becomes ``docker://<name>``). A portable data hash
(``<md5>+<size>``), which real Arvados resolves through Keep, is refused with a clear message.

Scratch: the runner gives each container a host scratch directory. ``local`` points ``TMPDIR``
at it; ``docker`` and ``singularity`` bind it at ``/tmp`` in the container and set
``TMPDIR=/tmp``.

Besides the argv that runs the container, a runtime tells the gateway how to run a command
*inside* it (:meth:`Runtime.exec_argv`) and where connections to container ports go
(:meth:`Runtime.target_ip`).
"""

from __future__ import annotations

import abc
import os
import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dispatcher.proc import CommandError, CommandRunner

PDH_RE = re.compile(r"^[0-9a-f]{32}\+\d+(\+\S+)*$")
ENV_NAME_RE = re.compile(r"^[^=\0]+$")
# Host variables a docker/singularity client needs to find its daemon/config; nothing else of
# crunch-run's environment (which holds the API token) reaches the runtime process.
RUNTIME_HOST_ENV = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH",
                    "DOCKER_TLS_VERIFY", "XDG_RUNTIME_DIR", "SINGULARITY_CACHEDIR",
                    "APPTAINER_CACHEDIR", "LANG")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class RuntimeSpecError(ValueError):
    """The container cannot be run by this runtime as specified (a permanent failure)."""


@dataclass(frozen=True)
class ContainerSpec:
    """What a runtime needs to know about one container (built by the runner from the record)."""

    uuid: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = ""
    image: str = ""
    vcpus: int = 0
    ram: int = 0
    scratch_dir: str = ""
    # Variables whose values must not appear in an argv (visible in ps), e.g. the container's
    # runtime token: docker gets "--env=NAME" plus the value in its own environment.
    secret_env: Mapping[str, str] = field(default_factory=dict)


def validate_spec(spec: ContainerSpec) -> None:
    """Refuse what no argv/environment can carry. Raises :class:`RuntimeSpecError`."""
    if not spec.command:
        raise RuntimeSpecError("container command is empty")
    for i, arg in enumerate(spec.command):
        if not isinstance(arg, str):
            raise RuntimeSpecError(f"command[{i}] is not a string")
        if "\0" in arg:
            raise RuntimeSpecError(f"command[{i}] contains a NUL byte")
    for k, v in {**spec.env, **spec.secret_env}.items():
        if not isinstance(k, str) or not ENV_NAME_RE.match(k):
            raise RuntimeSpecError(f"environment variable name {k!r} is not valid")
        if not isinstance(v, str) or "\0" in v:
            raise RuntimeSpecError(f"environment variable {k} has a non-string or NUL value")
    if "\0" in spec.cwd:
        raise RuntimeSpecError("cwd contains a NUL byte")


def image_reference(container_image: str, engine: str) -> str:
    """The image argument for ``engine`` (see module doc). Raises :class:`RuntimeSpecError`."""
    image = container_image.strip()
    if not image:
        raise RuntimeSpecError(f"container_image is empty; the {engine} runtime needs an image")
    if PDH_RE.match(image):
        raise RuntimeSpecError(
            f"container_image {image!r} is a Keep portable data hash; crunchgate has no Keep, "
            "so give an image name (e.g. debian:12) or use --runtime-engine=local"
        )
    if image.startswith("-") or "\0" in image or any(c.isspace() for c in image):
        raise RuntimeSpecError(f"container_image {image!r} is not a valid image name")
    if engine == "singularity" and "://" not in image and not image.startswith("/") \
            and not image.endswith(".sif"):
        return "docker://" + image
    return image


def _bindable(path: str) -> bool:
    # docker --mount and singularity --bind are comma/colon separated lists: such a path cannot
    # be expressed safely, so it is not bound (the runner's own mkdtemp paths never hit this).
    return bool(path) and not any(c in path for c in ",:=\0\n")


def container_env(spec: ContainerSpec, tmpdir: str) -> dict[str, str]:
    """The container's environment: the record's ``environment`` over ``TMPDIR``."""
    env = {"TMPDIR": tmpdir}
    env.update(spec.env)
    env.update(spec.secret_env)
    return env


def host_runtime_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment for a docker/singularity client process (no tokens, no secrets)."""
    env = {k: environ[k] for k in RUNTIME_HOST_ENV if k in environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def docker_run_argv(spec: ContainerSpec, *, docker: str = "docker", tmpdir: str = "/tmp"
                    ) -> list[str]:
    """``docker run --rm --name=<uuid> -i --env=K=V ... <image> <command...>``."""
    argv = [docker, "run", "--rm", f"--name={spec.uuid}", "-i"]
    for k, v in container_env(spec, tmpdir).items():
        argv.append(f"--env={k}" if k in spec.secret_env else f"--env={k}={v}")
    if spec.cwd:
        argv.append(f"--workdir={spec.cwd}")
    if spec.vcpus > 0:
        argv.append(f"--cpus={spec.vcpus}")
    if spec.ram > 0:
        argv.append(f"--memory={spec.ram}")
    if _bindable(spec.scratch_dir):
        argv.append(f"--mount=type=bind,source={spec.scratch_dir},target={tmpdir}")
    argv.append(image_reference(spec.image, "docker"))
    argv.extend(spec.command)
    return argv


def docker_exec_argv(name: str, command: Sequence[str], tty: bool, *, docker: str = "docker"
                     ) -> list[str]:
    """``docker exec -i [-t] <name> <command...>`` (reference tunnel.md 4.3)."""
    argv = [docker, "exec", "-i"]
    if tty:
        argv.append("-t")
    argv.append(name)
    argv.extend(command)
    return argv


def docker_kill_argv(name: str, sig: int, *, docker: str = "docker") -> list[str]:
    """``docker kill --signal=<SIG> <name>``: signals the container, not just the client."""
    return [docker, "kill", f"--signal={signal.Signals(sig).name}", name]


def singularity_exec_argv(spec: ContainerSpec, *, singularity: str = "singularity",
                          tmpdir: str = "/tmp") -> list[str]:
    """``singularity exec --containall --cleanenv --pwd=<cwd> [--bind=..] <image> <command...>``.

    The container environment is passed as ``SINGULARITYENV_*`` variables on the singularity
    process (:func:`singularity_env`), which carry any value, unlike ``--env``'s comma list.
    """
    argv = [singularity, "exec", "--containall", "--cleanenv"]
    if spec.cwd:
        argv.append(f"--pwd={spec.cwd}")
    if _bindable(spec.scratch_dir):
        argv.append(f"--bind={spec.scratch_dir}:{tmpdir}")
    argv.append(image_reference(spec.image, "singularity"))
    argv.extend(spec.command)
    return argv


def singularity_env(spec: ContainerSpec, tmpdir: str = "/tmp") -> dict[str, str]:
    """``SINGULARITYENV_<K>=<V>`` for each container variable (apptainer honours these too)."""
    return {f"SINGULARITYENV_{k}": v for k, v in container_env(spec, tmpdir).items()}


def nsenter_argv(pid: int, command: Sequence[str]) -> list[str]:
    """``nsenter --target=<pid> --all <command...>``: run a command in a process's namespaces."""
    return ["nsenter", f"--target={pid}", "--all", *command]


def find_namespaced_descendant(pid: int, proc: str = "/proc") -> int | None:
    """``pid`` or its first descendant living in another mount namespace than we do, or None.

    That is the process singularity runs inside the container; nsenter targets it.
    """
    try:
        own_ns = os.readlink(f"{proc}/self/ns/mnt")
    except OSError:
        return None
    queue = [pid]
    seen: set[int] = set()
    while queue:
        p = queue.pop(0)
        if p in seen:
            continue
        seen.add(p)
        try:
            if os.readlink(f"{proc}/{p}/ns/mnt") != own_ns:
                return p
        except OSError:
            continue
        queue.extend(_children(p, proc))
    return None


def _children(pid: int, proc: str) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"{proc}/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out.extend(int(x) for x in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return out


class Runtime(abc.ABC):
    """How one container is started, stopped, exec'd into and reached."""

    name: str = ""
    executable: str | None = None  # must be on PATH for this runtime to work

    def __init__(self, spec: ContainerSpec, environ: Mapping[str, str] | None = None) -> None:
        validate_spec(spec)
        self.spec = spec
        self.environ = dict(os.environ if environ is None else environ)
        self.pid: int | None = None
        self.check()

    def check(self) -> None:
        """Raise :class:`RuntimeSpecError` if the spec cannot run on this runtime."""
        return None

    @property
    def container_tmpdir(self) -> str:
        return "/tmp"

    @property
    def container_env(self) -> dict[str, str]:
        """The environment the container's processes see."""
        return container_env(self.spec, self.container_tmpdir)

    @property
    def container_cwd(self) -> str:
        return self.spec.cwd or "/"

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The argv of the process that runs the container."""

    def process_env(self) -> dict[str, str]:
        """The environment of that process."""
        return host_runtime_env(self.environ)

    def process_cwd(self) -> str | None:
        return None

    def started(self, pid: int) -> None:
        """Called with the PID of the process started from :meth:`argv`."""
        self.pid = pid

    @abc.abstractmethod
    def exec_argv(self, command: list[str], tty: bool) -> list[str]:
        """argv that runs ``command`` inside the running container."""

    def stop_argv(self, sig: int) -> list[str] | None:
        """An extra command that delivers ``sig`` to the container (None: signals suffice)."""
        return None

    async def target_ip(self, runner: CommandRunner) -> str:
        """The address where connections to container ports go."""
        return "127.0.0.1"

    def _which(self, name: str) -> str:
        return shutil.which(name, path=self.environ.get("PATH", DEFAULT_PATH)) or name


class LocalRuntime(Runtime):
    """Runs the command as a plain host process; ``container_image`` is ignored."""

    name = "local"

    @property
    def container_tmpdir(self) -> str:
        return os.path.join(self.spec.scratch_dir, "tmp") if self.spec.scratch_dir else "/tmp"

    @property
    def container_env(self) -> dict[str, str]:
        env = {"PATH": self.environ.get("PATH", DEFAULT_PATH),
               "HOME": self.spec.scratch_dir or "/tmp"}
        env.update(container_env(self.spec, self.container_tmpdir))
        return env

    def argv(self) -> list[str]:
        return list(self.spec.command)

    def process_env(self) -> dict[str, str]:
        return self.container_env

    def process_cwd(self) -> str | None:
        return self.container_cwd

    def exec_argv(self, command: list[str], tty: bool) -> list[str]:
        # The gateway runs it with container_env/container_cwd: the same "container".
        return list(command)


class DockerRuntime(Runtime):
    """``docker run`` in the foreground (``--rm``, named after the container UUID)."""

    name = "docker"
    executable = "docker"

    def check(self) -> None:
        image_reference(self.spec.image, "docker")

    def argv(self) -> list[str]:
        return docker_run_argv(self.spec, tmpdir=self.container_tmpdir)

    def exec_argv(self, command: list[str], tty: bool) -> list[str]:
        # Absolute path: the gateway may run this with the container's environment (no PATH).
        return docker_exec_argv(self.spec.uuid, command, tty, docker=self._which("docker"))

    def process_env(self) -> dict[str, str]:
        env = host_runtime_env(self.environ)
        env.update(self.spec.secret_env)  # read by docker for the bare "--env=NAME" flags
        return env

    def stop_argv(self, sig: int) -> list[str] | None:
        return docker_kill_argv(self.spec.uuid, sig)

    async def target_ip(self, runner: CommandRunner) -> str:
        try:
            res = await runner.run(["docker", "inspect",
                                    "--format={{.NetworkSettings.IPAddress}}", self.spec.uuid],
                                   timeout_s=30)
        except CommandError:
            return ""
        return res.stdout.strip()


class SingularityRuntime(Runtime):
    """``singularity exec --containall --cleanenv`` (host network: target is 127.0.0.1)."""

    name = "singularity"
    executable = "singularity"

    def check(self) -> None:
        image_reference(self.spec.image, "singularity")

    def argv(self) -> list[str]:
        return singularity_exec_argv(self.spec, tmpdir=self.container_tmpdir)

    def process_env(self) -> dict[str, str]:
        env = host_runtime_env(self.environ)
        env.update(singularity_env(self.spec, self.container_tmpdir))
        return env

    def exec_argv(self, command: list[str], tty: bool) -> list[str]:
        target = find_namespaced_descendant(self.pid) if self.pid else None
        if target is None:
            raise RuntimeError("cannot find the singularity container's process to nsenter")
        argv = nsenter_argv(target, command)
        argv[0] = self._which("nsenter")
        return argv


RUNTIMES: dict[str, type[Runtime]] = {
    "local": LocalRuntime,
    "docker": DockerRuntime,
    "singularity": SingularityRuntime,
}


def make_runtime(name: str, spec: ContainerSpec,
                 environ: Mapping[str, str] | None = None) -> Runtime:
    """The runtime called ``name`` for ``spec``. Raises :class:`RuntimeSpecError`."""
    cls = RUNTIMES.get(name)
    if cls is None:
        raise RuntimeSpecError(
            f"unknown runtime engine {name!r}; choose one of {', '.join(RUNTIMES)}")
    return cls(spec, environ)
