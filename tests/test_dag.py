"""redray.dag: graphs of tasks and actor calls built with `.bind()` and run with `execute`."""

from __future__ import annotations

import dataclasses

import pytest

import redray
from redray.dag import (
    ClassMethodNode,
    ClassNode,
    DAGNode,
    FunctionNode,
    InputAttributeNode,
    InputNode,
    MultiOutputNode,
)

pytestmark = [pytest.mark.usefixtures("ray_start"), pytest.mark.timeout(60)]


@redray.remote
def add(x, y=1):
    return x + y


@redray.remote
def scale(x, factor):
    return x * factor


@redray.remote
def types_of(items):
    return [type(item).__name__ for item in items]


@redray.remote
def fetch_all(refs):
    return redray.get(list(refs))


@redray.remote(num_returns=2)
def split(x):
    return x, -x


@redray.remote
class Account:
    def __init__(self, balance):
        self.balance = balance

    def deposit(self, amount):
        self.balance += amount
        return self.balance

    def read(self):
        return self.balance

    def actor_id(self):
        return redray.get_runtime_context().get_actor_id()


@redray.remote
class Journal:
    """Records every call it gets, to count how often a graph ran a node."""

    def __init__(self):
        self.entries = []

    def record(self, value):
        self.entries.append(value)
        return value

    def all(self):
        return self.entries


# -- Ray's documented examples, in our own words ---------------------------------------------
def test_function_nodes_chain_and_share_results():
    two_plus_three = add.bind(2, y=3)
    assert isinstance(two_plus_three, FunctionNode)
    assert redray.get(two_plus_three.execute()) == 5
    doubled = scale.bind(two_plus_three, 2)
    assert redray.get(doubled.execute()) == 10
    # One node used twice in a graph: both uses see the same result.
    total = add.bind(doubled, y=two_plus_three)
    assert redray.get(total.execute()) == 15


def test_actor_nodes_apply_method_calls_in_bind_order():
    first = Account.bind(100)
    assert isinstance(first, ClassNode)
    balance = first.read.bind()
    assert isinstance(balance, ClassMethodNode)
    assert redray.get(balance.execute()) == 100

    second = Account.bind(5)
    first.deposit.bind(20)
    first.deposit.bind(30)
    second.deposit.bind(1)
    both = add.bind(first.read.bind(), y=second.read.bind())
    assert redray.get(both.execute()) == 156


def test_input_node_feeds_execute_arguments():
    with InputNode() as amount:
        dag = scale.bind(add.bind(amount), 10)
    assert redray.get(dag.execute(1)) == 20
    assert redray.get(dag.execute(4)) == 50


def test_input_node_parts_by_index_key_and_attribute():
    with InputNode() as inp:
        by_position = add.bind(inp[0], y=inp[1])
    assert isinstance(inp[0], InputAttributeNode)
    assert redray.get(by_position.execute(2, 5)) == 7
    assert redray.get(by_position.execute([3, 4])) == 7  # one input: its items

    with InputNode() as inp:
        by_name = add.bind(inp[0], y=inp.bonus)
    assert redray.get(by_name.execute(1, bonus=9)) == 10

    @dataclasses.dataclass
    class Order:
        quantity: int
        price: int

    with InputNode() as inp:
        cost = scale.bind(inp.quantity, inp.price)
    assert redray.get(cost.execute(Order(quantity=3, price=7))) == 21

    with InputNode() as inp:
        keyed = add.bind(inp["a"], y=inp["b"])
    assert redray.get(keyed.execute({"a": 1, "b": 2})) == 3
    assert redray.get(keyed.execute(a=10, b=20)) == 30


def test_multi_output_node_returns_a_list_of_refs():
    with InputNode() as inp:
        dag = MultiOutputNode([add.bind(inp["x"]), scale.bind(inp["y"], 3)])
    refs = dag.execute({"x": 1, "y": 2})
    assert isinstance(refs, list) and all(isinstance(r, redray.ObjectRef) for r in refs)
    assert redray.get(refs) == [2, 6]


# -- a graph over tasks and actors, run twice -------------------------------------------------
def test_graph_of_tasks_and_actors_executed_twice_with_new_inputs():
    journal = Journal.remote()
    with InputNode() as inp:
        account = Account.bind(1000)
        logged = journal.record.bind(inp.deposit)  # a call on a live actor
        after_deposit = account.deposit.bind(logged)
        after_fee = account.deposit.bind(scale.bind(inp[0], -1))
        ids = (account.actor_id.bind(), account.actor_id.bind())
        dag = MultiOutputNode([after_deposit, after_fee, add.bind(logged, y=logged), *ids])

    first = redray.get(dag.execute(5, deposit=100))
    second = redray.get(dag.execute(7, deposit=300))

    # Each execute creates its account afresh, as Ray does: the balances start from 1000.
    assert first[:3] == [1100, 1095, 200]
    assert second[:3] == [1300, 1293, 600]
    # ...and once: every call of one execute went to the same actor, a new one each time.
    assert first[3] == first[4] and second[3] == second[4] and first[3] != second[3]
    # A node used three times ran once per execute.
    assert redray.get(journal.record.bind(0).execute()) == 0
    assert redray.get(journal.all.remote()) == [100, 300, 0]


def test_method_bound_on_a_live_actor_keeps_its_state_between_executes():
    account = Account.remote(0)
    with InputNode() as inp:
        dag = account.deposit.bind(inp)
    assert redray.get(dag.execute(5)) == 5
    assert redray.get(dag.execute(6)) == 11
    assert redray.get(account.read.remote()) == 11


def test_class_node_executed_alone_returns_a_new_actor_handle():
    node = Account.bind(7)
    handles = [node.execute(), node.execute()]
    assert redray.get([h.deposit.remote(1) for h in handles]) == [8, 8]
    assert len({redray.get(h.actor_id.remote()) for h in handles}) == 2


def test_options_before_bind_apply_at_execute():
    pair = split.bind(3)
    assert redray.get(pair.execute()) == [3, -3]
    renamed = add.options(num_returns=1, name="renamed").bind(1)
    assert renamed.get_options() == {"num_returns": 1, "name": "renamed"}
    assert redray.get(renamed.execute()) == 2

    named = Account.options(name="graph-account").bind(0)
    assert redray.get(named.deposit.bind(2).execute()) == 2
    assert redray.get(redray.get_actor("graph-account").read.remote()) == 2

    account = Account.remote(0)
    both = account.deposit.options(num_returns=1).bind(4)
    assert redray.get(both.execute()) == 4


def test_nodes_nested_in_arguments_are_passed_as_refs():
    # As in Ray: nested results arrive as refs (a task resolves only top-level ones).
    nested = types_of.bind([add.bind(1), 5])
    assert redray.get(nested.execute()) == ["ObjectRef", "int"]
    fetched = fetch_all.bind((add.bind(1), add.bind(2)))
    assert redray.get(fetched.execute()) == [2, 3]

    @dataclasses.dataclass
    class Pair:
        left: object
        right: object

    @redray.remote
    def total(pair):
        return redray.get(pair.left) + pair.right

    assert redray.get(total.bind(Pair(add.bind(10), 1)).execute()) == 12


def test_long_chain_of_calls_on_one_actor_executes():
    account = Account.bind(0)
    last = None
    for _ in range(3000):  # deeper than Python's recursion limit
        last = account.deposit.bind(1)
    assert redray.get(last.execute()) == 3000


def test_misuse_raises_rays_errors():
    node = add.bind(1)
    assert isinstance(node, DAGNode)
    with pytest.raises(AttributeError, match=r"\.remote\(\) cannot be used on"):
        node.remote()
    with pytest.raises(AttributeError, match=r"\.bind\(\) cannot be used again"):
        node.bind()
    with pytest.raises(AttributeError, match="has no attribute 'withdraw'"):
        _ = Account.bind(1).withdraw
    with pytest.raises(AttributeError, match="Use .bind"):
        Account.bind(1).read.remote()
    with pytest.raises(ValueError, match="should not take any args"):
        InputNode(1)
    with pytest.raises(ValueError, match="Invalid input type"):
        MultiOutputNode(add.bind(1))
    with InputNode() as inp:
        with pytest.raises(ValueError, match="cannot be used as args"):
            Account.bind(inp)
    outside = InputNode()
    with pytest.raises(AssertionError, match="context manager"):
        add.bind(outside).execute(1)
    with InputNode() as one, InputNode() as other:
        with pytest.raises(AssertionError, match="only have one unique InputNode"):
            add.bind(one, y=other).execute(1)


def test_remote_call_arguments_are_still_checked_at_execute():
    with pytest.raises(TypeError):
        add.bind(1, 2, 3).execute()
