"""Pure argv construction of the crunch-run runtimes (no docker/singularity needed)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.crunchrun.runtimes import (
    ContainerSpec,
    DockerRuntime,
    LocalRuntime,
    RuntimeSpecError,
    SingularityRuntime,
    docker_exec_argv,
    docker_kill_argv,
    docker_run_argv,
    find_namespaced_descendant,
    image_reference,
    make_runtime,
    nsenter_argv,
    singularity_env,
    singularity_exec_argv,
)

UUID = "zzzzz-dz642-000000000000001"

# Arbitrary text without NUL (which no argv can carry); env names also without "=".
text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]))
env_name = st.text(st.characters(exclude_characters="\0=", exclude_categories=["Cs"]),
                   min_size=1)


def spec(**kw: object) -> ContainerSpec:
    base: dict[str, object] = dict(uuid=UUID, command=("echo", "hi"), env={"A": "1"},
                                   cwd="/work", image="debian:12", vcpus=2, ram=1 << 30,
                                   scratch_dir="/scratch/x")
    base.update(kw)
    return ContainerSpec(**base)  # type: ignore[arg-type]


def test_docker_run_argv_shape() -> None:
    assert docker_run_argv(spec()) == [
        "docker", "run", "--rm", f"--name={UUID}", "-i",
        "--env=TMPDIR=/tmp", "--env=A=1", "--workdir=/work", "--cpus=2",
        f"--memory={1 << 30}", "--mount=type=bind,source=/scratch/x,target=/tmp",
        "debian:12", "echo", "hi",
    ]


def test_docker_secret_env_not_in_argv() -> None:
    rt = DockerRuntime(spec(secret_env={"ARVADOS_API_TOKEN": "v2/x/supersecret"}), {"PATH": "/b"})
    argv = rt.argv()
    assert "--env=ARVADOS_API_TOKEN" in argv
    assert not any("supersecret" in a for a in argv)
    assert rt.process_env()["ARVADOS_API_TOKEN"] == "v2/x/supersecret"
    assert rt.container_env["ARVADOS_API_TOKEN"] == "v2/x/supersecret"


def test_docker_runtime_process_env_has_no_host_secrets() -> None:
    rt = DockerRuntime(spec(), {"PATH": "/bin", "ARVADOS_API_TOKEN": "root", "X": "y"})
    assert rt.process_env() == {"PATH": "/bin"}


def test_docker_exec_and_kill(tmp_path: Path) -> None:
    assert docker_exec_argv(UUID, ["ls", "-l"], False) == ["docker", "exec", "-i", UUID, "ls", "-l"]
    assert docker_exec_argv(UUID, ["bash"], True) == ["docker", "exec", "-i", "-t", UUID, "bash"]
    assert docker_kill_argv(UUID, signal.SIGTERM) == ["docker", "kill", "--signal=SIGTERM", UUID]
    argv = DockerRuntime(spec(), {"PATH": "/nonexistent"}).exec_argv(["id"], False)
    assert argv == ["docker", "exec", "-i", UUID, "id"]
    # With docker on PATH the gateway gets an absolute path (it may run with the container env).
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    argv = DockerRuntime(spec(), {"PATH": str(tmp_path)}).exec_argv(["id"], False)
    assert argv == [str(fake), "exec", "-i", UUID, "id"]


def test_singularity_argv_and_env() -> None:
    s = spec()
    assert singularity_exec_argv(s) == [
        "singularity", "exec", "--containall", "--cleanenv", "--pwd=/work",
        "--bind=/scratch/x:/tmp", "docker://debian:12", "echo", "hi"]
    assert singularity_env(s) == {"SINGULARITYENV_TMPDIR": "/tmp", "SINGULARITYENV_A": "1"}
    rt = SingularityRuntime(s, {"PATH": "/bin"})
    assert rt.process_env()["SINGULARITYENV_A"] == "1"
    assert nsenter_argv(42, ["sh"]) == ["nsenter", "--target=42", "--all", "sh"]


def test_image_reference_rules() -> None:
    assert image_reference("debian:12", "docker") == "debian:12"
    assert image_reference("/images/x.sif", "singularity") == "/images/x.sif"
    assert image_reference("oras://r/x:1", "singularity") == "oras://r/x:1"
    assert image_reference("x.sif", "singularity") == "x.sif"
    with pytest.raises(RuntimeSpecError, match="portable data hash"):
        image_reference("d41d8cd98f00b204e9800998ecf8427e+0", "docker")
    for bad in ("", "--privileged", "a b", "-v"):
        with pytest.raises(RuntimeSpecError):
            image_reference(bad, "docker")


def test_unbindable_scratch_is_not_mounted() -> None:
    argv = docker_run_argv(spec(scratch_dir="/a,b:c"))
    assert not any(a.startswith("--mount") for a in argv)


def test_local_runtime() -> None:
    rt = LocalRuntime(spec(command=("sh", "-c", "x"), scratch_dir="/s"), {"PATH": "/p", "T": "t"})
    assert rt.argv() == ["sh", "-c", "x"]
    env = rt.process_env()
    assert env == {"PATH": "/p", "HOME": "/s", "TMPDIR": "/s/tmp", "A": "1"}
    assert rt.process_cwd() == "/work"
    assert rt.exec_argv(["id", "-u"], True) == ["id", "-u"]


def test_spec_validation() -> None:
    with pytest.raises(RuntimeSpecError):
        LocalRuntime(spec(command=()))
    with pytest.raises(RuntimeSpecError):
        LocalRuntime(spec(command=("a\0b",)))
    with pytest.raises(RuntimeSpecError):
        LocalRuntime(spec(env={"A=B": "x"}))
    with pytest.raises(RuntimeSpecError):
        make_runtime("podman", spec())
    with pytest.raises(RuntimeSpecError, match="portable data hash"):
        make_runtime("docker", spec(image="d41d8cd98f00b204e9800998ecf8427e+0"))


@settings(max_examples=100, deadline=None)
@given(command=st.lists(text, min_size=1, max_size=5),
       env=st.dictionaries(env_name, text, max_size=4), cwd=text)
def test_docker_every_value_is_one_argv_element(command: list[str], env: dict[str, str],
                                                 cwd: str) -> None:
    s = spec(command=tuple(command), env=env, cwd=cwd)
    argv = docker_run_argv(s)
    image_at = argv.index("debian:12", len(argv) - len(command) - 1)
    # The command is exactly the tail, after the image: nothing was split or joined.
    assert argv[image_at + 1:] == command
    options = argv[:image_at]
    for k, v in env.items():
        assert f"--env={k}={v}" in options
    if cwd:
        assert f"--workdir={cwd}" in options
    # Every option is in --flag=value form: a hostile value can never become its own flag.
    assert all(o.startswith("--") or o in ("docker", "run", "-i") for o in options)


@settings(max_examples=100, deadline=None)
@given(command=st.lists(text, min_size=1, max_size=5),
       env=st.dictionaries(env_name, text, max_size=4), cwd=text)
def test_singularity_every_value_is_one_argv_element(command: list[str], env: dict[str, str],
                                                      cwd: str) -> None:
    s = spec(command=tuple(command), env=env, cwd=cwd)
    argv = singularity_exec_argv(s)
    assert argv[-len(command):] == command
    assert argv[-len(command) - 1] == "docker://debian:12"
    envs = singularity_env(s)
    for k, v in env.items():
        assert envs[f"SINGULARITYENV_{k}"] == v
    # Values travel in SINGULARITYENV_* variables, never as (comma-split) --env arguments.
    assert not any(a.startswith("--env") for a in argv[:-len(command)])


@settings(max_examples=100, deadline=None)
@given(command=st.lists(text, min_size=1, max_size=5), tty=st.booleans())
def test_exec_argv_keeps_command_intact(command: list[str], tty: bool) -> None:
    assert docker_exec_argv(UUID, command, tty)[-len(command):] == command
    assert LocalRuntime(spec()).exec_argv(command, tty) == command


def test_find_namespaced_descendant_none_for_plain_child() -> None:
    # Our own children share our mount namespace: there is nothing to nsenter into.
    assert find_namespaced_descendant(os.getpid()) is None
    assert find_namespaced_descendant(2**22 + 12345) is None
