"""Job scripts: the reference's exact format and escaping (dispatch.md 3.5, 7.2), and a
property test that any text reaches the process literally through /bin/sh."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatcher.config import ClusterConfig
from dispatcher.core.jobscript import (
    JobScriptError,
    container_job_script,
    gateway_auth_secret,
    render_script,
    shell_quote,
)

UUID = "zzzzz-dz642-queuedcontainer"


@pytest.mark.parametrize(
    ("env", "argv", "expected"),
    [
        ({}, [], "#!/bin/sh\nexec\n"),
        ({}, ["foo"], "#!/bin/sh\nexec 'foo'\n"),
        ({}, ["foo", "bar baz"], "#!/bin/sh\nexec 'foo' 'bar baz'\n"),
        ({}, ['foo"', "'waz 'qux\n"], "#!/bin/sh\nexec 'foo\"' ''\\''waz '\\''qux\n'\n"),
        ({"foo": "b'ar"}, ["sh", "-c", "echo $foo"],
         "#!/bin/sh\nfoo='b'\\''ar' exec 'sh' '-c' 'echo $foo'\n"),
    ],
)
def test_reference_examples(env, argv, expected):
    for template in ("slurm", "lsf", "local"):
        assert render_script(template, env, argv) == expected


def test_placeholder_text_in_values_stays_literal():
    assert render_script("slurm", {"A": "{{argv}}"}, ["{{env}}"]) == (
        "#!/bin/sh\nA='{{argv}}' exec '{{env}}'\n")


def test_shell_quote():
    assert shell_quote("") == "''"
    assert shell_quote("it's") == "'it'\\''s'"
    assert shell_quote("$(x) `y`") == "'$(x) `y`'"


def test_gateway_auth_secret_is_hmac_sha256_hex():
    # RFC 4231-style known vector: HMAC-SHA256(key="key", msg="The quick brown fox ...").
    assert gateway_auth_secret("key", "The quick brown fox jumps over the lazy dog") == (
        "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8")


def test_container_job_script_slurm_and_lsf_order():
    cfg = ClusterConfig(cluster_id="zzzzz", system_root_token="xyzzy-root-token-000")
    cfg.containers.crunch_run_arguments_list = ["--debug", "-x"]
    cfg.containers.runtime_engine = "singularity"
    secret = gateway_auth_secret(cfg.system_root_token, UUID)
    assert container_job_script(cfg, UUID) == (
        f"#!/bin/sh\nGatewayAuthSecret='{secret}' exec 'crunch-run' '--debug' '-x' "
        f"'--runtime-engine=singularity' '{UUID}'\n")
    assert container_job_script(cfg, UUID, template="lsf", runtime_engine_first=True) == (
        f"#!/bin/sh\nGatewayAuthSecret='{secret}' exec 'crunch-run' "
        f"'--runtime-engine=singularity' '--debug' '-x' '{UUID}'\n")


@pytest.mark.parametrize("where", ["argv", "env"])
def test_nul_byte_refused_without_echoing_the_value(where):
    env, argv = {"V": "ok"}, ["ok"]
    if where == "argv":
        argv = ["se\x00cret"]
    else:
        env = {"V": "se\x00cret"}
    with pytest.raises(JobScriptError, match="NUL byte") as info:
        render_script("slurm", env, argv)
    assert "cret" not in str(info.value)


def test_bad_env_name_and_template_name():
    with pytest.raises(JobScriptError, match="not a valid shell name"):
        render_script("slurm", {"A B": "x"}, [])
    with pytest.raises(JobScriptError, match="invalid job script template name"):
        render_script("../etc/passwd", {}, [])
    with pytest.raises(JobScriptError, match="not found"):
        render_script("nosuchscheduler", {}, [])


# Anything but NUL (which a C string cannot carry) and lone surrogates (not encodable).
shell_text = st.one_of(
    st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
            max_size=40),
    st.sampled_from(["{{argv}}", "{{env}}", "$(id)", "`id`", "'", "\\", "\n", "-c", "'\\''"]),
)
DUMP = ("import json,os,sys;"
        "print(json.dumps({'argv': sys.argv[1:], 'env': os.environ.get('CG_VALUE'),"
        " 'cwd': os.environ.get('CG_CWD')}))")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command=st.lists(shell_text, max_size=4), env_value=shell_text, cwd=shell_text)
def test_any_text_reaches_the_process_literally(command, env_value, cwd):
    script = render_script(
        "slurm", {"CG_VALUE": env_value, "CG_CWD": cwd}, [sys.executable, "-c", DUMP, *command])
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, timeout=30, check=True)
    got = json.loads(out.stdout)
    assert got == {"argv": command, "env": env_value, "cwd": cwd}
