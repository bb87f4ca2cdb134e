"""Planning: which agent takes which VM, and the start order (no Prefect)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from vmbackup.planning import assign_agents, reaches, submission_order


@dataclass(frozen=True)
class Vm:
    name: str
    host: str


@dataclass(frozen=True)
class Agent:
    name: str
    hosts: tuple[str, ...]


HOSTS = ["h0", "h1", "h2", "h3"]


@st.composite
def inventories(draw, max_vms=12, max_agents=4):
    agents = [
        Agent(f"a{i}", tuple(draw(st.lists(st.sampled_from(HOSTS), unique=True, max_size=3))))
        for i in range(draw(st.integers(0, max_agents)))
    ]
    vms = [Vm(f"vm{i:02d}", draw(st.sampled_from(HOSTS))) for i in range(draw(st.integers(0, max_vms)))]
    return vms, agents


def best_max_load(vms, agents) -> int:
    """The smallest possible largest load, by trying every assignment."""
    placeable = [[a.name for a in agents if reaches(a, v.host)] for v in vms]
    placeable = [p for p in placeable if p]
    best = len(placeable)
    for choice in itertools.product(*placeable):
        counts: dict[str, int] = {}
        for a in choice:
            counts[a] = counts.get(a, 0) + 1
        best = min(best, max(counts.values(), default=0))
    return best


@settings(max_examples=300, deadline=None)
@given(inventories())
def test_every_vm_assigned_once_to_an_agent_that_reaches_it_or_reported(inv):
    vms, agents = inv
    plan = assign_agents(vms, agents)
    by_name = {a.name: a for a in agents}
    assert set(plan.assigned) | set(plan.unassignable) == {v.name for v in vms}
    assert not set(plan.assigned) & set(plan.unassignable)
    for v in vms:
        if v.name in plan.assigned:
            assert reaches(by_name[plan.assigned[v.name]], v.host)
        else:
            assert not any(reaches(a, v.host) for a in agents)
            assert v.host in plan.unassignable[v.name] or not agents
    assert assign_agents(list(reversed(vms)), list(reversed(agents))) == plan  # deterministic


@settings(max_examples=200, deadline=None)
@given(inventories(max_vms=8, max_agents=3))
def test_largest_load_is_the_smallest_possible(inv):
    vms, agents = inv
    plan = assign_agents(vms, agents)
    loads = plan.loads(a.name for a in agents)
    assert max(loads.values(), default=0) == best_max_load(vms, agents)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40), st.integers(1, 5), st.lists(st.sampled_from(HOSTS), min_size=40, max_size=40))
def test_agents_that_reach_everything_are_balanced_within_one(n, n_agents, hosts):
    vms = [Vm(f"vm{i}", hosts[i]) for i in range(n)]
    agents = [Agent(f"a{i}", ()) for i in range(n_agents)]
    loads = assign_agents(vms, agents).loads(a.name for a in agents).values()
    assert max(loads) - min(loads) <= 1


def test_constrained_vms_do_not_pile_up_on_the_agent_that_reaches_more():
    # a0 reaches both hosts, a1 only h0: a naive first-fit puts three on a0.
    agents = [Agent("a0", ("h0", "h1")), Agent("a1", ("h0",))]
    vms = [Vm("vm1", "h0"), Vm("vm2", "h0"), Vm("vm3", "h1"), Vm("vm4", "h1")]
    plan = assign_agents(vms, agents)
    assert plan.assigned == {"vm3": "a0", "vm4": "a0", "vm1": "a1", "vm2": "a1"}


@settings(max_examples=200, deadline=None)
@given(inventories(max_vms=20))
def test_submission_order_is_a_permutation_that_spreads_over_hosts(inv):
    vms, agents = inv
    plan = assign_agents(vms, agents)
    order = submission_order(vms, plan)
    assert sorted(order) == sorted(plan.assigned)
    host = {v.name: v.host for v in vms}
    hosts_with_vms = {host[v] for v in order}
    first = order[: len(hosts_with_vms)]
    assert {host[v] for v in first} == hosts_with_vms


def test_a_greedy_choice_is_undone_when_another_agent_could_take_the_vm():
    # Placed one by one, vm00 goes to a0 (tie with a2, by name), and a0 later
    # gets vm04 too; only moving vm00 to a2 gives everyone at most one VM.
    agents = [Agent("a0", ("h3", "h2", "h1")), Agent("a1", ("h2", "h1")), Agent("a2", ("h3",))]
    vms = [Vm("vm00", "h3"), Vm("vm01", "h0"), Vm("vm03", "h1"), Vm("vm04", "h1")]
    plan = assign_agents(vms, agents)
    assert max(plan.loads(a.name for a in agents).values()) == 1
    assert plan.assigned["vm00"] == "a2"
    assert plan.unassignable == {"vm01": "no agent reaches host h0"}
