"""crunchgate's own async API client (legacy wire format) against the embedded controller."""

from __future__ import annotations

import asyncio

import pytest

from dispatcher.arvados.client import ArvadosClient, Forbidden, NotFound, Unprocessable
from tests.helpers.controller import ControllerProcess


def test_dispatcher_calls(controller_session: ControllerProcess) -> None:
    ctl = controller_session

    async def scenario() -> None:
        async with ArvadosClient(ctl.host, ctl.root_token, ca_file=str(ctl.ca_file),
                                 retries=0) as c:
            assert await c.token_uuid() == "zzzzz-gj3su-000000000000000"
            image = "client-" + ctl.add_user("client-marker")[-10:]
            uuids = []
            for prio in range(1, 6):
                ctr = await c.create("containers", {"command": ["c"], "priority": prio,
                                                    "container_image": image})
                uuids.append(ctr["uuid"])
            flt = [["container_image", "=", image], ["state", "=", "Queued"],
                   ["priority", ">", "0"]]
            items = await c.list_all("containers", filters=flt, order=["priority desc"],
                                     page_size=2)
            assert [i["uuid"] for i in items] == uuids[::-1]

            locked = await c.lock(uuids[0])
            assert locked["state"] == "Locked"
            auth = await c.container_auth(uuids[0])
            assert auth["api_token"]
            mine = await c.list("containers", filters=[["locked_by_uuid", "=", await c.token_uuid()],
                                                       ["uuid", "=", uuids[0]]])
            assert [i["uuid"] for i in mine["items"]] == [uuids[0]]
            updated = await c.update("containers", uuids[0],
                                     {"runtime_status": {"error": "no such partition"}})
            assert updated["runtime_status"] == {"error": "no such partition"}
            cancelled = await c.update("containers", uuids[0], {"state": "Cancelled"})
            assert cancelled["state"] == "Cancelled" and cancelled["locked_by_uuid"] is None

            with pytest.raises(Unprocessable) as err:
                await c.lock(uuids[0])
            assert "cannot lock when Cancelled" in str(err.value.errors)
            with pytest.raises(NotFound):
                await c.get("containers", "zzzzz-dz642-000000000000404")

            log = await c.create_log(uuids[1], "dispatch", text="sbatch failed")
            assert log["event_type"] == "dispatch" and log["properties"]["text"] == "sbatch failed"

        user_token = ctl.add_user("client-user")
        async with ArvadosClient(ctl.host, user_token, ca_file=str(ctl.ca_file), retries=0) as u:
            with pytest.raises((Forbidden, NotFound)):
                await u.lock(uuids[1])

    asyncio.run(scenario())
