"""Job scripts: the small ``/bin/sh`` program a scheduler runs to start crunch-run.

The templates live in ``jobscripts/<name>.sh`` (package data). A template is copied verbatim
except for two placeholders:

* ``{{env}}`` — one ``KEY='value' `` per environment entry (each followed by one space);
* ``{{argv}}`` — for each argument, a space and the single-quoted argument.

The shipped templates are ``#!/bin/sh\\n{{env}}exec{{argv}}\\n``, which renders exactly the
reference format (``dispatch.md`` 3.5)::

    #!/bin/sh
    GatewayAuthSecret='<hex>' exec 'crunch-run' '--runtime-engine=docker' '<uuid>'

Quoting is the reference's single-quote rule: the value is wrapped in ``'...'`` and every ``'``
inside becomes ``'\\''``. Any byte string except NUL survives that rule, so a NUL anywhere is
refused with :class:`JobScriptError` (the loop cancels such a container with that message).
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.resources
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache

from dispatcher.config import ClusterConfig
from dispatcher.core.errors import CoreError
from dispatcher.logs import register_secret

_TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PLACEHOLDER_RE = re.compile(r"\{\{(env|argv)\}\}")


class JobScriptError(CoreError):
    """The job script cannot be built (bad template, or a value the shell cannot carry)."""


def shell_quote(s: str) -> str:
    """Single-quote ``s`` for /bin/sh: ``'`` becomes ``'\\''``; nothing else is special."""
    return "'" + s.replace("'", "'\\''") + "'"


def gateway_auth_secret(root_token: str, container_uuid: str) -> str:
    """The container gateway's auth secret: hex HMAC-SHA256(key=SystemRootToken, msg=UUID)."""
    secret = hmac.new(root_token.encode(), container_uuid.encode(), hashlib.sha256).hexdigest()
    register_secret(secret)
    return secret


@lru_cache(maxsize=16)
def load_template(name: str) -> str:
    """The text of ``jobscripts/<name>.sh``."""
    if not _TEMPLATE_NAME_RE.match(name):
        raise JobScriptError(f"invalid job script template name {name!r}")
    try:
        return importlib.resources.files("jobscripts").joinpath(f"{name}.sh").read_text()
    except FileNotFoundError:
        raise JobScriptError(
            f"job script template {name}.sh not found in the jobscripts package; "
            "reinstall crunchgate"
        ) from None


def _check(what: str, value: str) -> str:
    if "\x00" in value:
        # Never echo the value itself: it may be an environment secret.
        raise JobScriptError(
            f"{what} contains a NUL byte, which a shell script cannot carry; "
            "fix the container request (command, environment or cwd)"
        )
    return value


def render_script(name: str, env: Mapping[str, str], argv: Sequence[str]) -> str:
    """Render template ``name`` with the environment prefix and the exec argument list."""
    template = load_template(name)
    env_part = []
    for key, value in env.items():
        if not _ENV_KEY_RE.match(key):
            raise JobScriptError(f"environment variable name {key!r} is not a valid shell name")
        env_part.append(f"{key}={shell_quote(_check(f'environment variable {key}', value))} ")
    argv_part = [" " + shell_quote(_check(f"argument {i}", a)) for i, a in enumerate(argv)]
    parts = {"env": "".join(env_part), "argv": "".join(argv_part)}
    # One pass over the template: a value that happens to contain "{{argv}}" stays literal.
    return _PLACEHOLDER_RE.sub(lambda m: parts[m.group(1)], template)


def crunch_run_argv(
    cfg: ClusterConfig, container_uuid: str, *, runtime_engine_first: bool = False
) -> list[str]:
    """crunch-run's argv for a job: Slurm order by default, LSF order with
    ``runtime_engine_first`` (reference 3.5 / 4.3)."""
    c = cfg.containers
    engine = f"--runtime-engine={c.runtime_engine}"
    extra = list(c.crunch_run_arguments_list)
    if runtime_engine_first:
        return [c.crunch_run_command, engine, *extra, container_uuid]
    return [c.crunch_run_command, *extra, engine, container_uuid]


def container_job_script(
    cfg: ClusterConfig,
    container_uuid: str,
    *,
    template: str = "slurm",
    runtime_engine_first: bool = False,
) -> str:
    """The complete job script for one container (gateway secret in its environment prefix)."""
    env = {"GatewayAuthSecret": gateway_auth_secret(cfg.system_root_token, container_uuid)}
    argv = crunch_run_argv(cfg, container_uuid, runtime_engine_first=runtime_engine_first)
    return render_script(template, env, argv)
