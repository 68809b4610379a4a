"""Admission: crafted handshake replies leave their node out, never the run;
partitions bound to node keys by a challenge-response; the DP sampling rate over
the partitions admitted."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedkd.errors import ConfigError
from fedkd.partition_keys import PartitionKeys, public_key_text
from fedkd.privacy.ledger import PrivacyLedger
from fedkd.protocol import CONFIG, INFO, METRICS
from fedkd.server import discover_partitions
from tests.test_server import DIGEST, FakeGrid, handshake

RUN = 42


def content(metrics=None, info=None) -> RecordDict:
    records = {}
    if metrics is not None:
        records[METRICS] = MetricRecord(metrics)
    if info is not None:
        records[INFO] = ConfigRecord(info)
    return RecordDict(records)


class Exploding:
    """A reply whose every read raises: no exception may escape the handshake."""

    metadata = SimpleNamespace(src_node_id=13)

    def has_error(self):
        raise RuntimeError("the reply fell apart")


@pytest.mark.parametrize(
    "crafted, reason",
    [
        (content(info={"proxy-digest": DIGEST}), "no metrics record"),
        (content({"num-examples": 5}, {"proxy-digest": DIGEST}), "partition-id=None"),
        (content({"partition-id": 1.0}, {"proxy-digest": DIGEST}), "partition-id=1.0"),
        (content({"partition-id": [1]}, {"proxy-digest": DIGEST}), "partition-id=[1]"),
        (content({"partition-id": 9}, {"proxy-digest": DIGEST}), "partition 9, outside 0..2"),
        (content({"partition-id": -1}, {"proxy-digest": DIGEST}), "outside 0..2"),
        (content({"partition-id": 2}), "no proxy digest"),
        (content({"partition-id": 2}, {"host": "x"}), "no proxy digest"),
        (content({"partition-id": 2}, {"proxy-digest": 7}), "no proxy digest"),
    ],
)
def test_a_malformed_handshake_reply_leaves_its_node_out(crafted, reason, caplog):
    # on the old main: KeyError / ValueError out of discover_partitions, the run died
    def craft(node, query):
        return Message(crafted, reply_to=query) if node == 13 else None

    assert handshake(FakeGrid({11: 0, 12: 1, 13: 2}, craft=craft)) == {11: 0, 12: 1}
    (line,) = [r.getMessage() for r in caplog.records if "node 13" in r.getMessage()]
    assert "failed the handshake and is left out" in line and reason in line


def test_any_exception_reading_a_reply_is_contained(caplog):
    grid = FakeGrid({11: 0, 12: 1, 13: 2}, craft=lambda n, q: Exploding() if n == 13 else None)
    assert handshake(grid) == {11: 0, 12: 1}
    assert "node 13 failed the handshake and is left out: malformed reply" in caplog.text
    assert "RuntimeError: the reply fell apart" in caplog.text


def test_a_reply_from_a_node_not_asked_or_a_second_reply_is_left_out(caplog):
    def stranger(node, query):  # node 12's reply claims to come from node 13
        if node != 12:
            return None
        msg = Message(content({"partition-id": 2}, {"proxy-digest": DIGEST}), reply_to=query)
        return SimpleNamespace(
            metadata=SimpleNamespace(src_node_id=13), has_error=msg.has_error, content=msg.content
        )

    grid = FakeGrid({11: 0, 12: 1}, craft=stranger)
    assert discover_partitions(grid, [11, 12], 3, 5, DIGEST) == {11: 0}
    assert "node 13 failed the handshake and is left out: it answered a handshake" in caplog.text

    class Twice(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            return [*replies, replies[-1]]

    assert discover_partitions(Twice({11: 0, 12: 1}), [11, 12], 2, 5, DIGEST) == {11: 0, 12: 1}
    assert "node 12 failed the handshake and is left out: it answered twice" in caplog.text


# ------------------------------------------------------------------- key binding
def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def signing_grid(partitions, keys, claims=None, run_id=RUN, tamper=()):
    """Nodes that sign their claim (or `claims[node]`) with `keys[node]` as
    fedkd.client.signed_claim does; `tamper` nodes sign another nonce."""
    from fedkd.partition_keys import challenge

    def craft(node, query):
        if node not in keys:
            return None
        pid = (claims or {}).get(node, partitions[node])
        nonce = query.content.config_records[CONFIG]["nonce"]
        if node in tamper:
            nonce = bytes(len(nonce))
        key = keys[node]
        info = {
            "proxy-digest": DIGEST,
            "public-key": public_key_text(key.public_key()),
            "signature": key.sign(challenge(nonce, run_id, pid), ec.ECDSA(_sha384())),
        }
        return Message(content({"partition-id": pid}, info), reply_to=query)

    return FakeGrid(partitions, craft=craft)


def _sha384():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA384()


def bound(keys: dict[int, ec.EllipticCurvePrivateKey], pids: dict[int, int]) -> PartitionKeys:
    return PartitionKeys({public_key_text(keys[n].public_key()): pids[n] for n in pids})


def bound_handshake(grid, binding, nodes=(11, 12, 13)):
    return discover_partitions(grid, list(nodes), 3, 5, DIGEST, binding, RUN)


def test_signed_claims_bound_to_their_keys_are_admitted():
    keys = {n: new_key() for n in (11, 12, 13)}
    grid = signing_grid({11: 0, 12: 1, 13: 2}, keys)
    assert bound_handshake(grid, bound(keys, {11: 0, 12: 1, 13: 2})) == {11: 0, 12: 1, 13: 2}


def test_a_node_claiming_another_nodes_partition_is_left_out_the_owner_admitted(caplog):
    keys = {n: new_key() for n in (11, 12, 13)}
    binding = bound(keys, {11: 0, 12: 1, 13: 2})
    grid = signing_grid({11: 0, 12: 1, 13: 1}, keys)  # 13 (key of partition 2) claims 1
    assert bound_handshake(grid, binding) == {11: 0, 12: 1}
    assert "it claims partition 1, but its key is bound to partition 2" in caplog.text
    assert "all claim" not in caplog.text  # not a contest: the impostor never counted


@pytest.mark.parametrize(
    "case, reason",
    [
        ("tampered", "its signature of the challenge for partition 2 does not verify"),
        ("other run", "does not verify"),
        ("unknown key", "its key is not in the partition-keys file"),
        ("unsigned", "no signed claim"),
        ("forged key", "does not verify"),
    ],
)
def test_an_unproven_claim_is_left_out(case, reason, caplog):
    keys = {n: new_key() for n in (11, 12, 13)}
    binding = bound(keys, {11: 0, 12: 1, 13: 2})
    if case == "tampered":
        grid = signing_grid({11: 0, 12: 1, 13: 2}, keys, tamper={13})
    elif case == "other run":  # a signature from another run's handshake
        other = signing_grid({13: 2}, {13: keys[13]}, run_id=RUN + 1)
        grid = signing_grid({11: 0, 12: 1, 13: 2}, {n: keys[n] for n in (11, 12)})
        grid.craft = (lambda c1, c2: lambda n, q: c1(n, q) or c2(n, q))(grid.craft, other.craft)
    elif case == "unknown key":
        grid = signing_grid({11: 0, 12: 1, 13: 2}, {**keys, 13: new_key()})
    elif case == "unsigned":  # node 13 sends the plain, unsigned reply
        grid = signing_grid({11: 0, 12: 1, 13: 2}, {n: keys[n] for n in (11, 12)})
    else:  # node 13 presents node 12's public key with its own signature
        grid = signing_grid({11: 0, 12: 1, 13: 2}, keys)
        craft = grid.craft

        def forged(node, query):
            reply = craft(node, query)
            if node == 13:
                info = reply.content.config_records[INFO]
                info["public-key"] = public_key_text(keys[12].public_key())
            return reply

        grid.craft = forged
    assert bound_handshake(grid, binding) == {11: 0, 12: 1}
    (line,) = [r.getMessage() for r in caplog.records if "node 13" in r.getMessage()]
    assert reason in line


def test_partition_keys_file_is_read_and_checked(tmp_path):
    key = new_key()
    text = public_key_text(key.public_key())
    path = tmp_path / "pk.json"
    path.write_text(json.dumps({text + " laptop": 3}))  # comments do not matter
    assert PartitionKeys.load(path).by_key == {text: 3}
    for bad, message in [
        ("{", "a readable file"),
        ("[]", "JSON object of OpenSSH public key -> partition id"),
        (json.dumps({"ssh-ed25519 AAAA": 0}), "is not an ECDSA public key"),
        (json.dumps({text: "1"}), "got '1'"),
        (json.dumps({text: -1}), "got -1"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=message):
            PartitionKeys.load(path)
    with pytest.raises(ConfigError, match="partition-keys="):
        PartitionKeys.load(tmp_path / "missing.json")


# ------------------------------------------------------------- DP sampling rate
def ledger(num_clients: int, per_round: int) -> PrivacyLedger:
    privacy = SimpleNamespace(
        mode="client", noise_multiplier=1.0, delta=1e-5, clip_norm=5.0, secure_noise=True
    )
    cfg = SimpleNamespace(
        privacy=privacy, seed=0, clients_per_round=per_round, num_clients=num_clients
    )
    return PrivacyLedger(cfg)


def test_dp_sampling_rate_is_over_the_partitions_admitted():
    full = ledger(10, 3)
    configured = full.sample_rate
    full.set_population(10)
    assert full.sample_rate == configured == 3 / 10  # all admitted: bit for bit unchanged
    fewer = ledger(10, 3)
    fewer.set_population(5)
    assert fewer.sample_rate == 3 / 5
    fewer.set_population(2)
    assert fewer.sample_rate == 1.0  # fewer than clients_per_round: all sampled
    full.rounds = fewer.rounds = 4
    fewer.set_population(5)
    assert fewer.stats()["epsilon"] > full.stats()["epsilon"]


def test_run_server_samples_dp_over_the_admitted_population(plain_cfg, tmp_path, monkeypatch):
    from fedkd import server

    seen = {}

    class Stop(Exception):
        pass

    def run_rounds(state, transport, recorder, out):
        seen["rate"], seen["population"] = state.privacy.sample_rate, state.population
        raise Stop

    monkeypatch.setattr(server, "wait_for_nodes", lambda grid, n, t: [5, 6])
    monkeypatch.setattr(server, "discover_partitions", lambda *a, **kw: {5: 0, 6: 2})
    monkeypatch.setattr(server, "run_rounds", run_rounds)
    with pytest.raises(Stop):
        server.run_server(None, plain_cfg("clients_per_round=1"), tmp_path)
    assert seen == {"rate": 1 / 2, "population": [0, 2]}  # configured: 1 / 3


# ------------------------------------------- one handshake for every kind of node
def left_out_because(caplog, node: int) -> str:
    """Why the handshake left `node` out (its one warning line)."""
    (line,) = [r.getMessage() for r in caplog.records if f"node {node} failed" in r.getMessage()]
    return line.split("is left out: ", 1)[1]


def test_a_cohort_node_with_no_examples_is_refused_as_a_deployed_node_is(caplog):
    # on the old main the cohort handshake admitted a shard of 0 examples
    from fedkd.cohort import discover_cohorts
    from tests.test_cohort import FakeGrid as CohortGrid

    def zero(node, query):
        metrics = {"partition-id": 2, "num-examples": 0}
        return Message(content(metrics, {"proxy-digest": DIGEST}), reply_to=query)

    assert handshake(
        FakeGrid({11: 0, 12: 1, 13: 2}, craft=lambda n, q: zero(n, q) if n == 13 else None)
    )
    deployed = left_out_because(caplog, 13)
    caplog.clear()

    def cohort(node, query):
        sizes = [5, 0] if node == 22 else [5]
        pids = [1, 2] if node == 22 else [0]
        return content({"partition-ids": pids, "num-examples": sizes}, {"proxy-digest": DIGEST})

    assert discover_cohorts(CohortGrid(cohort), [21, 22], 3, 1.0, DIGEST, {}) == {21: [0]}
    assert (
        left_out_because(caplog, 22) == deployed == "malformed reply: num-examples=0 is not a count"
    )


# ------------------------------------------------------- declared sizes are capped
def declaring(sizes: dict[int, int], digest: str = DIGEST):
    """craft: each node claims its partition with the shard size `sizes` gives it."""

    def craft(node, query):
        pid = node - 11
        metrics = {"partition-id": pid, "num-examples": sizes[pid]}
        return Message(content(metrics, {"proxy-digest": digest}), reply_to=query)

    return craft


def test_a_declared_shard_size_is_capped_at_max_examples_and_warned_once(caplog):
    # on the old main: no max_examples; the tally believed 2**62 examples
    sizes: dict[int, int] = {}
    grid = FakeGrid({11: 0, 12: 1, 13: 2}, craft=declaring({0: 40, 1: 2**62, 2: 100}))
    admitted = discover_partitions(
        grid, [11, 12, 13], 3, 5, DIGEST, shard_sizes=sizes, max_examples=100
    )
    assert admitted == {11: 0, 12: 1, 13: 2}  # capped, not refused
    assert sizes == {0: 40, 1: 100, 2: 100}
    (line,) = [r.getMessage() for r in caplog.records if "more examples" in r.getMessage()]
    assert line.startswith("node 12 declares more examples than its cap")
    assert f"partition 1: {2**62} > 100" in line


def test_an_undeclared_shard_size_gets_the_cap():
    sizes: dict[int, int] = {}
    grid = FakeGrid({11: 0, 12: 1})  # replies without num-examples
    discover_partitions(grid, [11, 12], 2, 5, DIGEST, shard_sizes=sizes, known_sizes=[7, 9])
    assert sizes == {0: 7, 1: 9}


def test_a_simulated_node_declaring_2_62_examples_keeps_its_partitions_size(
    plain_cfg, tmp_path, monkeypatch
):
    # on the old main: state.declared_examples[2] == 2**62, and FedAvg's average was
    # the attacker's weights
    from flwr.app import Context

    from fedkd import server
    from fedkd.data.federated import federated_data
    from fedkd.privacy.release import shard_size

    plain = plain_cfg()
    data = federated_data(plain)
    known = {pid: shard_size(plain["privacy"]["mode"], len(s)) for pid, s in enumerate(data.shards)}
    seen = {}

    class Stop(Exception):
        pass

    def run_rounds(state, transport, recorder, out):
        seen.update(state.declared_examples)
        raise Stop

    monkeypatch.setattr(server, "wait_for_nodes", lambda grid, n, t: [11, 12, 13])
    monkeypatch.setattr(server, "run_rounds", run_rounds)
    grid = FakeGrid({11: 0, 12: 1, 13: 2}, craft=declaring({**known, 2: 2**62}, data.proxy_digest))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(Stop):
        server.build_server_app(plain, tmp_path)(grid, context)  # what fedkd-sim runs
    assert seen == known and known[2] < 2**62
