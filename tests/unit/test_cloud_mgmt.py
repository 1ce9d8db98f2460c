"""Management API (reference 5.12, 7.7 TestManagementAPI_*) and the ``dispatch-cloud
instances/hold/drain/run/kill`` commands, against a real aiohttp server on loopback over a pool
with the stub driver."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dispatcher.cloud import cli as cloud_cli
from dispatcher.cloud.clock import FakeClock
from dispatcher.cloud.drivers.stub import StubInstanceSet
from dispatcher.cloud.mgmt import add_management_routes
from dispatcher.cloud.pool import Pool
from dispatcher.cloud.scheduler import Scheduler
from dispatcher.service import create_service_app
from tests.helpers.cloud import StubQueue, itype, make_ent, stub_config

TOKEN = "management-token-0123456789"


class Disp:
    def __init__(self, token: str = TOKEN) -> None:
        self.cfg = stub_config([itype(1)], max_concurrent_instance_create_ops=0)
        self.cfg.management_token = token
        self.clock = FakeClock()
        self.iset = StubInstanceSet(self.clock)
        self.pool = Pool(self.cfg, self.iset, self.iset.executor, set_id="s", clock=self.clock)
        self.queue = StubQueue()
        self.scheduler = Scheduler(self.cfg, self.queue, self.pool, clock=self.clock)


async def serve(disp: Disp) -> tuple[web.AppRunner, str]:
    app = create_service_app(disp.cfg, "DispatchCloud", standard_metrics=False)
    add_management_routes(app, disp, disp.cfg.management_token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    disp.cfg.services.dispatch_cloud.internal_urls = {f"http://127.0.0.1:{port}": None}  # type: ignore[dict-item]
    return runner, f"http://127.0.0.1:{port}"


async def call(base: str, method: str, path: str, token: str | None = TOKEN,
               params: dict[str, str] | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with aiohttp.ClientSession() as s, s.request(method, base + path, headers=headers,
                                                        params=params) as r:
        text = await r.text()
        return r.status, json.loads(text) if text else None


def run(disp: Disp, body) -> Any:
    async def go():
        runner, base = await serve(disp)
        try:
            return await body(base)
        finally:
            await runner.cleanup()
            await disp.pool.stop()

    return asyncio.run(go())


def test_permissions():
    async def body(base):
        assert (await call(base, "GET", "/arvados/v1/dispatch/instances", token=None))[0] == 401
        assert (await call(base, "GET", "/arvados/v1/dispatch/instances", token="wrong"))[0] == 403
        assert (await call(base, "GET", "/arvados/v1/dispatch/instances"))[0] == 200

    run(Disp(), body)


def test_disabled_without_management_token():
    async def body(base):
        for token in (None, "anything"):
            status, data = await call(base, "GET", "/arvados/v1/dispatch/containers", token=token)
            assert status == 403
            assert data == {"errors": ["Management API authentication is not configured"]}

    run(Disp(token=""), body)


def test_containers_and_instances():
    disp = Disp()

    async def body(base):
        status, data = await call(base, "GET", "/arvados/v1/dispatch/containers")
        assert (status, data) == (200, {"items": []})
        assert (await call(base, "GET", "/arvados/v1/dispatch/instances"))[1] == {"items": []}
        disp.queue.add(make_ent(1, "Queued", menu=[itype(1)]))
        disp.scheduler.run_queue()
        await disp.scheduler.settle()
        status, data = await call(base, "GET", "/arvados/v1/dispatch/containers")
        (item,) = data["items"]
        assert item["container"]["uuid"] == "zzzzz-dz642-000000000000001"
        assert set(item) == {"container", "instance_resources", "instance_types",
                             "first_seen_at", "scheduling_status"}
        assert item["instance_types"][0]["ProviderType"] == "providertype1"
        assert "Name" not in item["instance_types"][0]
        status, one = await call(base, "GET", "/arvados/v1/dispatch/container",
                                 params={"container_uuid": "zzzzz-dz642-000000000000001"})
        assert status == 200 and one["container"]["uuid"] == item["container"]["uuid"]
        assert (await call(base, "GET", "/arvados/v1/dispatch/container",
                           params={"container_uuid": "zzzzz-dz642-999999999999999"}))[0] == 404
        disp.pool.create(itype(1))
        await disp.pool.settle()
        status, data = await call(base, "GET", "/arvados/v1/dispatch/instances")
        (inst,) = data["items"]
        assert inst["instance"].startswith("inst") and inst["worker_state"] == "booting"
        assert inst["price"] == pytest.approx(0.123) and inst["idle_behavior"] == "run"
        assert inst["arvados_instance_type"] == "type1"
        assert inst["provider_instance_type"] == "providertype1"
        assert inst["running_container_uuids"] == [] and inst["last_container_uuid"] == ""

    run(disp, body)


def test_instance_actions_and_errors():
    disp = Disp()

    async def body(base):
        disp.pool.create(itype(1))
        await disp.pool.settle()
        (iid,) = disp.pool.workers
        P = "/arvados/v1/dispatch/instances/"
        assert (await call(base, "POST", P + "hold"))[1] == {
            "errors": ["instance_id parameter not provided"]}
        status, data = await call(base, "POST", P + "drain", params={"instance_id": "nope"})
        assert (status, data) == (404, {"errors": ["requested instance does not exist"]})
        assert (await call(base, "POST", P + "hold", params={"instance_id": iid}))[0] == 200
        assert disp.pool.workers[iid].idle_behavior.value == "hold"
        assert (await call(base, "POST", P + "run", params={"instance_id": iid}))[0] == 200
        assert (await call(base, "POST", P + "kill", params={"instance_id": "nope"}))[1] == {
            "errors": ["instance not found"]}
        assert (await call(base, "POST", "/arvados/v1/dispatch/containers/kill"))[0] == 400
        assert (await call(base, "POST", "/arvados/v1/dispatch/containers/kill",
                           params={"container_uuid": "zzzzz-dz642-000000000000001"}))[0] == 404
        assert (await call(base, "POST", P + "kill",
                           params={"instance_id": iid, "reason": "test"}))[0] == 200
        await disp.pool.settle()
        assert not disp.iset.vms

    run(disp, body)


def test_cli_instances_table_tsv_and_actions(capsys):
    disp = Disp()

    async def body(base):
        disp.pool.create(itype(1))
        await disp.pool.settle()
        (iid,) = disp.pool.workers
        rc = await asyncio.to_thread(cloud_cli.list_instances, disp.cfg, True, True)
        assert rc == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "\t".join(cloud_cli.COLUMNS)
        assert out[1].split("\t") == [iid, "10.0.0.1", "booting", "run", "type1",
                                      "providertype1", "0.123000", "-"]
        rc = await asyncio.to_thread(cloud_cli.instance_action, disp.cfg, "hold", [iid], "")
        err = capsys.readouterr()
        assert rc == 0 and err.out == "" and err.err.startswith(f"{iid}: 200 OK (127.0.0.1:")
        rc = await asyncio.to_thread(cloud_cli.list_instances, disp.cfg, False, False)
        table = capsys.readouterr().out
        assert rc == 0 and "hold" in table and iid in table
        rc = await asyncio.to_thread(cloud_cli.instance_action, disp.cfg, "drain", ["inst404"],
                                     "")
        assert rc == 1 and "inst404: 404 Not Found (127.0.0.1:" in capsys.readouterr().err
        assert await asyncio.to_thread(cloud_cli.instance_action, disp.cfg, "run", [], "") == 2

    run(disp, body)


def test_kill_container_and_form_body_parameters(caplog):
    """POST /containers/kill starts the kill sequence of a running container (200, empty body,
    the reason logged as "via management API: ..."); parameters may come in a form body."""
    disp = Disp()

    async def body(base):
        disp.pool.create(itype(1))
        await disp.pool.settle()
        await disp.pool.probe_all(wait=True)
        (iid,) = disp.pool.workers
        uuid = "zzzzz-dz642-000000000000001"
        assert disp.pool.start_container(iid, {"uuid": uuid})
        await disp.pool.settle()
        vm = disp.iset.vms[iid]
        assert uuid in vm.procs
        async with aiohttp.ClientSession() as s, s.post(
                base + "/arvados/v1/dispatch/containers/kill",
                headers={"Authorization": f"Bearer {TOKEN}"},
                data={"container_uuid": uuid, "reason": "stuck"}) as r:
            assert r.status == 200 and await r.read() == b""
        await disp.pool.settle()
        assert uuid not in vm.procs
        assert any(c.endswith(f"--kill 15 {uuid}") for c in vm.commands)
        # Now it runs nowhere: 404.
        status, data = await call(base, "POST", "/arvados/v1/dispatch/containers/kill",
                                  params={"container_uuid": uuid})
        assert (status, data) == (404, {"errors": ["container not found"]})
        async with aiohttp.ClientSession() as s, s.post(
                base + "/arvados/v1/dispatch/instances/drain",
                headers={"Authorization": f"Bearer {TOKEN}"},
                data={"instance_id": iid}) as r:
            assert r.status == 200
        assert disp.pool.workers[iid].idle_behavior.value == "drain"

    with caplog.at_level("INFO", logger="crunchgate.cloud"):
        run(disp, body)
    assert "via management API: stuck" in caplog.text
