"""Benchmark: crunchgate's HTTP/2 tunnel against OpenSSH reverse forwarding, same machine, one run.

Both sides get the same shape (loopback only):

    client (this process) -> entry port -> [ssh: sshd | ours: broker] == one tunnel ==>
        [ssh: ssh -N -R | ours: agent] -> target services (sink / echo), another process

* ssh: a throwaway ``sshd`` on a loopback port (temp host key and authorized_keys,
  ``aes128-gcm@openssh.com``) and ``ssh -N -R`` forwarding two ports over one connection.
* ours: ``Broker`` (TLS, uvloop; ``--loop asyncio`` for the stock loop) with an entry listener
  per target that opens one tunnel stream per accepted connection, and the real ``Agent``
  dialling it. The measuring client is the same code, on the stock asyncio loop, for both.

Measured: (1) bulk throughput, 1 stream and 8 streams; (2) 100-byte request/response round trip,
median and p99; (3) the same while a bulk transfer runs on another stream of the same tunnel;
(4) new streams per second (open, 1-byte echo, close); (5) 1,000 idle tunnels on one broker:
RSS per tunnel (sshd: PSS per connection of its session processes, measured at 50).

Both setups are up at the same time and every measure runs in interleaved rounds (ssh, ours,
ours, ssh, ...), so a change in the machine's background load hits both sides alike; round-trip
samples are pooled over the rounds, rates are the median of the rounds.

Usage: ``python bench/tunnel.py [--quick] [--rounds N] [--only rr,rrl] [--tunnels N]``. Sizes
and durations are bounded; ``--quick`` takes about two minutes. Bulk figures move by +-25%
between runs on a busy 2-core machine: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROOT_TOKEN = "benchroottoken0123456789abcdefghijklmnopqrstuvwxyz"
UUID = "zzzzz-dz642-000000000000001"
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.05)


class Procs:
    """Child processes, stopped by PID at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()


def bench_settings() -> Any:
    """TunnelSettings for both ends; ``BENCH_WINDOW_KIB`` overrides the stream window."""
    from tunnel.protocol import TunnelSettings

    kib = int(os.environ.get("BENCH_WINDOW_KIB", "0") or 0)
    return TunnelSettings(stream_window_bytes=kib * 1024) if kib else TunnelSettings()


def me(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# --- child process roles -------------------------------------------------------------------------


async def role_targets(sink_port: int, echo_port: int) -> None:
    """sink: read to EOF, answer the byte count; echo: echo everything back."""

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        while chunk := await reader.read(1 << 20):
            n += len(chunk)
        writer.write(str(n).encode())
        await writer.drain()
        writer.close()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    s1 = await asyncio.start_server(sink, "127.0.0.1", sink_port)
    s2 = await asyncio.start_server(echo, "127.0.0.1", echo_port)
    async with s1, s2:
        await asyncio.Event().wait()


async def role_broker(port: int, certdir: str, entries: list[tuple[int, int]]) -> None:
    """The real Broker on TLS, plus entry listeners that open one tunnel stream per connection."""
    import ssl

    from aiohttp import web

    from tunnel.broker import Broker, BrokerConfig
    from tunnel.connection import LocalPipe

    class Backend:
        async def update_container(self, uuid: str, attrs: dict[str, Any]) -> None:
            pass

        async def close(self) -> None:
            pass

    cfg = BrokerConfig(system_root_token=ROOT_TOKEN, internal_url=f"https://127.0.0.1:{port}/",
                       max_gateway_tunnels=5000, settings=bench_settings())
    broker = Broker(cfg, Backend())  # type: ignore[arg-type]
    app = web.Application()
    broker.setup(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(f"{certdir}/tls/server.crt", f"{certdir}/tls/server.key")
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx, backlog=2048).start()

    class Entry(asyncio.Protocol):
        def __init__(self, target: int) -> None:
            self.target = target
            self.early: list[bytes] = []
            self.eof = False

        def connection_made(self, transport: Any) -> None:
            transport.pause_reading()
            asyncio.get_running_loop().create_task(self._open(transport))

        def data_received(self, data: bytes) -> None:
            # uvloop may read before the pause takes effect: keep it.
            self.early.append(data)

        def eof_received(self) -> bool:
            self.eof = True
            return True

        async def _open(self, transport: Any) -> None:
            conn = broker.tunnels.get(UUID)
            if conn is None:
                transport.abort()
                return
            try:
                st = await conn.open_stream(f"container:{self.target}")
            except Exception:  # noqa: BLE001 - a refused stream is just a closed connection
                transport.abort()
                return
            pipe = LocalPipe(st)
            # Resume first: the early bytes may fill the stream's queue, and then the pipe
            # pauses reading again (resuming after take_over() would undo that).
            transport.resume_reading()
            pipe.take_over(transport, b"".join(self.early))
            if self.eof:
                pipe.eof_received()
            if os.environ.get("BENCH_DEBUG"):
                await st.done
                print("entry stream", st.stream_id, "out", st.bytes_out, "in", st.bytes_in,
                      "err", st.error, file=sys.stderr)

    loop = asyncio.get_running_loop()
    for entry_port, target in entries:
        await loop.create_server(functools.partial(Entry, target), "127.0.0.1", entry_port,
                                 backlog=1024)
    await asyncio.Event().wait()


async def role_agent(port: int, certdir: str, count: int) -> None:
    """``count`` agents (tunnels) to the broker; the first one serves container ports."""
    from tunnel.agent import Agent, serve_gateway_stream
    from tunnel.connection import TunnelConnection, TunnelStream
    from tunnel.protocol import gateway_auth_secret

    def handler(conn: TunnelConnection, st: TunnelStream) -> None:
        asyncio.get_running_loop().create_task(
            serve_gateway_stream(None, "127.0.0.1", conn, st))  # type: ignore[arg-type]

    agents = []
    for i in range(count):
        uuid = UUID if i == 0 else f"zzzzz-dz642-{i + 1000:015d}"  # never UUID itself
        a = Agent(f"https://127.0.0.1:{port}", uuid, gateway_auth_secret(ROOT_TOKEN, uuid),
                  stream_handler=handler, ca_file=f"{certdir}/tls/ca.crt",
                  settings=bench_settings())
        a.start()
        agents.append(a)
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # do not flood the accept queue
    deadline = asyncio.get_running_loop().time() + 90
    while (sum(1 for a in agents if a.registered.is_set()) < count  # noqa: ASYNC110
           and asyncio.get_running_loop().time() < deadline):
        await asyncio.sleep(0.1)
    print("READY", sum(1 for a in agents if a.registered.is_set()), flush=True)
    await asyncio.Event().wait()


# --- measurements (client side) ------------------------------------------------------------------


async def bulk(port: int, streams: int, per_stream: int) -> float:
    """Gbit/s of ``streams`` concurrent uploads of ``per_stream`` bytes into the sink."""
    block = os.urandom(256 * 1024)

    async def one() -> int:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        sent = 0
        while sent < per_stream:
            w.write(block)
            sent += len(block)
            await w.drain()
        w.write_eof()
        got = int((await r.read()) or b"0")
        w.close()
        return got

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    dt = time.perf_counter() - t0
    if sum(counts) != streams * per_stream:
        raise RuntimeError(f"bulk lost data: {sum(counts)} != {streams * per_stream}")
    return sum(counts) * 8 / dt / 1e9


async def round_trips(port: int, n: int, stop: asyncio.Event | None = None) -> list[float]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 100
    w.write(msg)
    await r.readexactly(100)  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        w.write(msg)
        await r.readexactly(100)
        out.append(time.perf_counter() - t0)
        if stop is not None and stop.is_set():
            break
    w.close()
    return out


async def rr_under_load(sink_port: int, echo_port: int, n: int, bulk_bytes: int
                        ) -> tuple[list[float], float]:
    """Round trips on one stream while another stream of the same tunnel uploads bulk data."""
    block = os.urandom(256 * 1024)
    stop = asyncio.Event()
    r, w = await asyncio.open_connection("127.0.0.1", sink_port)
    sent = 0
    t0 = time.perf_counter()

    async def pusher() -> None:
        nonlocal sent
        while not stop.is_set() and sent < bulk_bytes:
            w.write(block)
            sent += len(block)
            await w.drain()

    task = asyncio.create_task(pusher())
    await asyncio.sleep(0.3)  # let the bulk stream fill the pipe
    rtts = await round_trips(echo_port, n)
    stop.set()
    await task
    rate = sent * 8 / (time.perf_counter() - t0) / 1e9
    w.write_eof()
    await r.read()
    w.close()
    return rtts, rate


async def new_streams(port: int, n: int, limit_s: float) -> tuple[float, float]:
    """Sequential open + 1-byte echo + close; (opens per second, median ms)."""
    times = []
    t_end = time.perf_counter() + limit_s
    for _ in range(n):
        t0 = time.perf_counter()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"!")
        await r.readexactly(1)
        w.close()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() > t_end:
            break
    return len(times) / sum(times), statistics.median(times) * 1000


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(len(s) * p))] * 1e6


MEASURES = ("bulk1", "bulk8", "rr", "rrl", "opens")


async def measure_once(which: str, sink: int, echo: int, quick: bool) -> dict[str, Any]:
    """One round of one measure against one setup; raw samples where there are samples."""
    size1 = (128 if quick else 512) * MiB
    if which == "bulk1":
        return {"bulk1": await bulk(sink, 1, size1)}
    if which == "bulk8":
        return {"bulk8": await bulk(sink, 8, size1 // 8)}
    if which == "rr":
        return {"rr": await round_trips(echo, 500 if quick else 2000)}
    if which == "rrl":
        rtts, rate = await rr_under_load(sink, echo, 300 if quick else 1000,
                                         (2 if quick else 8) * 1024 * MiB)
        return {"rrl": rtts, "rrl_bulk": rate}
    rate, ms = await new_streams(echo, 200 if quick else 500, 5.0)
    return {"opens": rate, "open_ms": ms}


def measure_interleaved(setups: dict[str, tuple[int, int]], quick: bool, rounds: int,
                        only: list[str]) -> dict[str, dict[str, float]]:
    """Every measure ``rounds`` times per setup, alternating which goes first (ABBA), so that
    a change in the machine's background load hits both sides alike. Round-trip samples are
    pooled over the rounds; rates are the median of the rounds."""
    names = list(setups)
    raw: dict[str, dict[str, list[Any]]] = {n: {} for n in names}
    for which in only:
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                sink, echo = setups[name]
                got = asyncio.run(measure_once(which, sink, echo, quick))
                for key, val in got.items():
                    raw[name].setdefault(key, []).append(val)
            print(f"  {which} round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {_summary(raw[n], which)}" for n in names), file=sys.stderr)
    out: dict[str, dict[str, float]] = {}
    for name in names:
        res: dict[str, float] = {}
        for key, vals in raw[name].items():
            if key in ("rr", "rrl"):
                pooled = [x for v in vals for x in v]
                res[key + "_med"], res[key + "_p99"] = pct(pooled, 0.5), pct(pooled, 0.99)
            else:
                res[key] = statistics.median(vals)
        out[name] = res
    return out


def _summary(raw: dict[str, list[Any]], which: str) -> str:
    last: Any = raw[which][-1]
    if which in ("rr", "rrl"):
        return f"median {pct(last, 0.5):.0f} us p99 {pct(last, 0.99):.0f} us"
    return f"{last:.2f}"


# --- the two setups ------------------------------------------------------------------------------


def start_ours(work: Path, procs: Procs) -> tuple[int, int]:
    """Targets, broker (with entry listeners) and one agent; returns the entry ports."""
    from tunnel.certs import make_certs

    make_certs(work / "certs")
    sink_t, echo_t = free_port(), free_port()
    procs.start(me("_targets", str(sink_t), str(echo_t)))
    bport, e_sink, e_echo = free_port(), free_port(), free_port()
    procs.start(me("_broker", str(bport), str(work / "certs"),
                   f"{e_sink}:{sink_t}", f"{e_echo}:{echo_t}"))
    wait_port(bport)
    agent = procs.start(me("_agent", str(bport), str(work / "certs"), "1"),
                        stdout=subprocess.PIPE)
    assert agent.stdout is not None
    if not agent.stdout.readline().startswith(b"READY 1"):
        raise RuntimeError("agent did not register")
    wait_port(sink_t)
    return e_sink, e_echo


def run_ours_idle(work: Path, n: int) -> float:
    """KiB of broker RSS per idle tunnel, with ``n`` tunnels."""
    procs = Procs()
    try:
        bport = free_port()
        broker = procs.start(me("_broker", str(bport), str(work / "certs")))
        wait_port(bport)
        time.sleep(0.5)
        base = rss_kib(broker.pid)
        agent = procs.start(me("_agent", str(bport), str(work / "certs"), str(n)),
                            stdout=subprocess.PIPE)
        assert agent.stdout is not None
        line = agent.stdout.readline().split()
        registered = int(line[1]) if len(line) == 2 and line[0] == b"READY" else 0
        if not registered:
            raise RuntimeError("agents did not register")
        if registered < n:
            print(f"only {registered} of {n} tunnels registered in 90 s", file=sys.stderr)
        time.sleep(1.0)
        return (rss_kib(broker.pid) - base) / registered
    finally:
        procs.stop_all()


def start_sshd(work: Path, procs: Procs) -> tuple[int, Path]:
    from dispatcher.proc import CommandRunner

    runner = CommandRunner(max_concurrency=2, default_timeout_s=30)
    for name in ("host", "user"):
        asyncio.run(runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                                str(work / name)]))
    (work / "authorized_keys").write_text((work / "user.pub").read_text())
    os.chmod(work / "authorized_keys", 0o600)
    port = free_port()
    (work / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {work}/host
AuthorizedKeysFile {work}/authorized_keys
PidFile none
UsePAM no
StrictModes no
PermitRootLogin yes
PasswordAuthentication no
Ciphers aes128-gcm@openssh.com
AllowTcpForwarding yes
MaxStartups 200:30:400
MaxSessions 100
LogLevel ERROR
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    procs.start(["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")])
    wait_port(port)
    return port, work / "user"


def ssh_argv(port: int, key: Path, forwards: list[tuple[int, int]]) -> list[str]:
    argv = ["ssh", "-N", "-T", "-p", str(port), "-i", str(key), "-c", "aes128-gcm@openssh.com",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "LogLevel=ERROR"]
    for rport, target in forwards:
        argv += ["-R", f"127.0.0.1:{rport}:127.0.0.1:{target}"]
    return [*argv, f"{os.environ.get('USER', 'root')}@127.0.0.1"]


def start_ssh_forward(work: Path, procs: Procs) -> tuple[int, int]:
    """Targets, a throwaway sshd and ``ssh -N -R``; returns the forwarded ports."""
    port, key = start_sshd(work, procs)
    sink_t, echo_t = free_port(), free_port()
    procs.start(me("_targets", str(sink_t), str(echo_t)))
    r_sink, r_echo = free_port(), free_port()
    procs.start(ssh_argv(port, key, [(r_sink, sink_t), (r_echo, echo_t)]))
    wait_port(r_sink)
    wait_port(r_echo)
    wait_port(sink_t)
    return r_sink, r_echo


def run_ssh_idle(work: Path, n: int) -> float:
    """KiB of sshd PSS per idle ``ssh -N -R`` connection (session processes), with ``n``."""
    procs = Procs()
    try:
        idle = work / "idle"
        idle.mkdir(exist_ok=True)
        port, key = start_sshd(idle, procs)
        listener = procs.procs[-1].pid
        for _ in range(n):
            procs.start(ssh_argv(port, key, [(free_port(), 9)]))
        deadline = time.monotonic() + 60
        while True:
            children = [int(p) for p in Path(f"/proc/{listener}/task/{listener}/children")
                        .read_text().split()]
            if len(children) >= n or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(1.0)
        total = 0
        for c in children:  # per connection: sshd monitor + its privsep child
            total += pss_kib(c)
            with contextlib.suppress(OSError):
                for g in Path(f"/proc/{c}/task/{c}/children").read_text().split():
                    total += pss_kib(int(g))
        return total / max(1, len(children))
    finally:
        procs.stop_all()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        import uvloop

        role, rargs = sys.argv[1], sys.argv[2:]
        # Our broker and agent run on uvloop unless BENCH_LOOP=asyncio (what the embedded
        # controller and crunch-run use today); the targets always run on uvloop.
        run: Any = asyncio.run if os.environ.get("BENCH_LOOP") == "asyncio" else uvloop.run
        if role == "_targets":
            uvloop.run(role_targets(int(rargs[0]), int(rargs[1])))
        elif role == "_broker":
            entries = [(int(a.split(":")[0]), int(a.split(":")[1])) for a in rargs[2:]]
            run(role_broker(int(rargs[0]), rargs[1], entries))
        elif role == "_agent":
            run(role_agent(int(rargs[0]), rargs[1], int(rargs[2])))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    parser.add_argument("--rounds", type=int, default=0,
                        help="rounds per measure and side, interleaved (default 3, quick 2)")
    parser.add_argument("--only", default=",".join(MEASURES),
                        help=f"comma-separated subset of {','.join(MEASURES)}")
    parser.add_argument("--tunnels", type=int, default=1000,
                        help="idle tunnels for (5); 0 skips (5)")
    parser.add_argument("--ssh-idle", type=int, default=50, help="idle ssh connections for (5)")
    parser.add_argument("--window-kib", type=int, default=0,
                        help="stream window for our tunnel (default: TunnelSettings)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="event loop of our broker and agent (default uvloop)")
    args = parser.parse_args()
    os.environ["BENCH_LOOP"] = args.loop
    only = [m for m in args.only.split(",") if m]
    if unknown := set(only) - set(MEASURES):
        parser.error(f"unknown measures: {', '.join(sorted(unknown))}")
    rounds = args.rounds or (2 if args.quick else 3)
    if args.window_kib:
        os.environ["BENCH_WINDOW_KIB"] = str(args.window_kib)
    if not shutil.which("ssh") or not os.path.exists("/usr/sbin/sshd"):
        print("needs OpenSSH client and server (apt install openssh-client openssh-server)")
        return 2
    ours_idle = ssh_idle = float("nan")
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as tmp:
        work = Path(tmp)
        procs = Procs()
        try:
            print("starting OpenSSH ssh -N -R and the crunchgate tunnel ...", file=sys.stderr)
            (work / "ssh").mkdir()
            setups = {"ssh": start_ssh_forward(work / "ssh", procs),
                      "ours": start_ours(work, procs)}
            res = measure_interleaved(setups, args.quick, rounds, only)
        finally:
            procs.stop_all()
        if args.tunnels:
            print(f"idle tunnels: {args.tunnels} ours, {args.ssh_idle} ssh ...", file=sys.stderr)
            ours_idle = run_ours_idle(work, args.tunnels)
            ssh_idle = run_ssh_idle(work, args.ssh_idle)
    ssh, ours = res["ssh"], res["ours"]

    rows = [
        ("(1) bulk, 1 stream (Gbit/s)", "bulk1", True, 0.5),
        ("(1) bulk, 8 streams (Gbit/s)", "bulk8", True, 0.5),
        ("(2) RR 100 B median (us)", "rr_med", False, 1.5),
        ("(2) RR 100 B p99 (us)", "rr_p99", False, None),
        ("(3) RR under bulk, median (us)", "rrl_med", False, None),
        ("(3) RR under bulk, p99 (us)", "rrl_p99", False, 1.0),
        ("(3) bulk rate meanwhile (Gbit/s)", "rrl_bulk", True, None),
        ("(4) new streams per second", "opens", True, 1.0),
        ("(4) new stream median (ms)", "open_ms", False, None),
    ]
    print(f"\n{rounds} interleaved rounds per measure and side; our broker and agent on "
          f"{args.loop}")
    print(f"{'measure':<36}{'ssh -R':>12}{'crunchgate':>12}{'ratio':>9}  goal")
    for label, key, higher, goal in rows:
        if key not in ssh or key not in ours:
            continue
        a, b = ssh[key], ours[key]
        ratio = b / a if a else float("nan")
        if goal is None:
            verdict = ""
        elif higher:
            verdict = f">= {goal}x  {'ok' if ratio >= goal else 'MISSED'}"
        else:
            verdict = f"<= {goal}x  {'ok' if ratio <= goal else 'MISSED'}"
        print(f"{label:<36}{a:>12.2f}{b:>12.2f}{ratio:>9.2f}  {verdict}")
    if args.tunnels:
        print(f"{'(5) memory per idle tunnel (KiB)':<36}{ssh_idle:>12.0f}{ours_idle:>12.0f}"
              f"{ours_idle / ssh_idle if ssh_idle else float('nan'):>9.2f}  "
              f"(ours: broker RSS over {args.tunnels} tunnels; ssh: sshd PSS per connection, "
              f"{args.ssh_idle} connections)")
    return 0

if __name__ == "__main__":
    # SIGTERM (a timeout, kill) unwinds like Ctrl-C: the finally blocks stop what was started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
