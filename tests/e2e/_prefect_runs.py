"""Run as a script against $PREFECT_API_URL (Prefect reads its settings at
import, so not in the test process): prints JSON.

    runs TAG               the flow runs carrying TAG: id, name, state, message
    runs-of FLOW           the flow runs of flow FLOW, newest first
    create-running TAG     a flow run carrying TAG, set Running; its id
"""

from __future__ import annotations

import json
import sys

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags
from prefect.client.schemas.sorting import FlowRunSort
from prefect.states import Running


def _rows(runs) -> list[dict]:
    return [
        {"id": str(r.id), "name": r.name, "state": r.state.type.value, "message": r.state.message, "tags": r.tags}
        for r in runs
    ]


def main(op: str, arg: str) -> object:
    with get_client(sync_client=True) as client:
        if op == "runs":
            return _rows(client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[arg]))))
        if op == "runs-of":
            return _rows(
                client.read_flow_runs(
                    flow_filter=FlowFilter(name=FlowFilterName(any_=[arg])), sort=FlowRunSort.EXPECTED_START_TIME_DESC
                )
            )
        if op == "create-running":
            from prefect import flow

            @flow(name="a-live-vmbackup-run")
            def live() -> None:
                pass

            fr = client.create_flow_run(live, tags=[arg], state=Running())
            return str(fr.id)
    raise SystemExit(f"unknown operation {op}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
