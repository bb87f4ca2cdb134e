"""Which agent backs up which VM, and in what order the VMs are started.

Plain Python, no Prefect: the flow calls it, the tests check it with
hypothesis.

Assignment: an agent may take a VM when it can reach the VM's host (an agent
with no hosts listed reaches every host). The most constrained VMs are placed
first, each on the least loaded agent that can take it (ties by agent name);
then loads are evened out by moving VMs along chains of agents (agent A gives
one VM to B, B one to C...) while a chain from a busier agent to one with at
least two VMs fewer exists. Every move lowers the sum of squared loads, so
this ends, and at the end the largest load is as small as any assignment
allows (a VM moved along a chain never leaves the agents that can reach it).
Everything is sorted by name first, so the same input gives the same plan.

Order: VMs are started round-robin over hosts (then agents), so that the
first tasks spread over hosts instead of queuing on one host's limit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


class VmLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def host(self) -> str: ...


class AgentLike(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def hosts(self) -> Sequence[str]: ...


@dataclass
class AgentPlan:
    """The outcome: ``assigned`` maps a VM name to its agent's name;
    ``unassignable`` maps a VM name to why no agent can take it."""

    assigned: dict[str, str] = field(default_factory=dict)
    unassignable: dict[str, str] = field(default_factory=dict)

    def loads(self, agents: Iterable[str]) -> dict[str, int]:
        out = dict.fromkeys(agents, 0)
        for a in self.assigned.values():
            out[a] = out.get(a, 0) + 1
        return out


def reaches(agent: AgentLike, host: str) -> bool:
    """An agent with no hosts listed reaches every host."""
    return not agent.hosts or host in agent.hosts


def assign_agents(
    vms: Sequence[VmLike],
    agents: Sequence[AgentLike],
    reach: Callable[[Any, Any], bool] | None = None,
    unreachable: Callable[[Any], str] | None = None,
) -> AgentPlan:
    """Assign every VM to one agent that reaches its host, balancing loads.

    Args:
        vms: the selected VMs (``name``, ``host``); names must be unique.
        agents: the plan's agents (``name``, ``hosts``); names must be unique.
        reach: ``reach(agent, vm)``: may this agent take this VM (default:
            :func:`reaches` of the VM's host; a Hyper-V VM needs its own test).
        unreachable: ``unreachable(vm)``: why no agent takes it (default:
            "no agent reaches host H").

    Returns:
        The assignment, and the VMs no agent can take with the reason.
    """
    names = sorted(a.name for a in agents)
    by_name = {a.name: a for a in agents}
    plan = AgentPlan()
    candidates: dict[str, list[str]] = {}
    host_of: dict[str, str] = {}
    for vm in sorted(vms, key=lambda v: v.name):
        host_of[vm.name] = vm.host
        if reach is None:
            cands = [n for n in names if reaches(by_name[n], vm.host)]
        else:
            cands = [n for n in names if reach(by_name[n], vm)]
        if cands:
            candidates[vm.name] = cands
        elif not agents:
            plan.unassignable[vm.name] = "the plan has no agents"
        elif unreachable is not None:
            plan.unassignable[vm.name] = unreachable(vm)
        else:
            plan.unassignable[vm.name] = f"no agent reaches host {vm.host}"

    load = dict.fromkeys(names, 0)
    holding: dict[str, list[str]] = {n: [] for n in names}
    for vm in sorted(candidates, key=lambda v: (len(candidates[v]), v)):
        agent = min(candidates[vm], key=lambda n: (load[n], n))
        plan.assigned[vm] = agent
        load[agent] += 1
        holding[agent].append(vm)

    while _rebalance_once(names, load, holding, candidates, plan):
        pass
    return plan


def _rebalance_once(
    names: list[str],
    load: dict[str, int],
    holding: dict[str, list[str]],
    candidates: dict[str, list[str]],
    plan: AgentPlan,
) -> bool:
    """Move one VM along the shortest chain from the busiest agent to one
    with at least two VMs fewer; False when no such chain exists."""
    for src in sorted(names, key=lambda n: (-load[n], n)):
        # Breadth-first over agents: an edge x -> y when x holds a VM y may take.
        prev: dict[str, tuple[str, str]] = {}
        seen = {src}
        queue = deque([src])
        target = None
        while queue and target is None:
            x = queue.popleft()
            for vm in sorted(holding[x]):
                for y in candidates[vm]:
                    if y in seen:
                        continue
                    seen.add(y)
                    prev[y] = (x, vm)
                    if load[y] <= load[src] - 2:
                        target = y
                        break
                    queue.append(y)
                if target is not None:
                    break
        if target is None:
            continue
        y = target
        while y != src:
            x, vm = prev[y]
            holding[x].remove(vm)
            holding[y].append(vm)
            plan.assigned[vm] = y
            y = x
        load[src] -= 1
        load[target] += 1
        return True
    return False


def submission_order(vms: Sequence[VmLike], plan: AgentPlan) -> list[str]:
    """The assigned VMs in the order to start them: round-robin over hosts,
    and within a host over agents, names sorted within each group."""
    groups: dict[str, dict[str, list[str]]] = {}
    for vm in sorted(vms, key=lambda v: v.name):
        agent = plan.assigned.get(vm.name)
        if agent is not None:
            groups.setdefault(vm.host, {}).setdefault(agent, []).append(vm.name)
    per_host: dict[str, deque[str]] = {}
    for host, by_agent in groups.items():
        queues = [deque(by_agent[a]) for a in sorted(by_agent)]
        interleaved: deque[str] = deque()
        while any(queues):
            for q in queues:
                if q:
                    interleaved.append(q.popleft())
        per_host[host] = interleaved
    order: list[str] = []
    hosts = sorted(per_host)
    while any(per_host[h] for h in hosts):
        for h in hosts:
            if per_host[h]:
                order.append(per_host[h].popleft())
    return order
