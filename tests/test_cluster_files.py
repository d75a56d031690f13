"""The operator's files for a cluster, checked where they act: the shipped nftables rules loaded in network
namespaces of the test's own (tests/netns.py) and connections made from a named source and from another; the
units' specifiers as systemd expands them (tests/units.py)."""
import re
import socket

import pytest

from tests import netns
from tests.units import UNITS, WORKER_UNIT, Installation

SCHEDULER_RULES, WORKER_RULES = UNITS / "nftables/dask-scheduler.nft", UNITS / "nftables/dask-worker.nft"


@pytest.fixture(scope="module")
def lan():
    netns.require()
    lan = netns.Lan()
    try:
        for name in ("svc", "sched", "w1", "w2"):
            lan.add(name)
        yield lan
    finally:
        lan.close()


def load(lan, vm: str, rules_file, sources: list[str]) -> None:
    """The shipped rules with the operator's sources in place of the example's, loaded in ``vm`` (twice: loading
    it again replaces it, as after an edit)."""
    text = re.sub(r"(set sources4 \{.*?elements = \{ )[^}]*( \})", rf"\g<1>{', '.join(sources)}\g<2>",
                  rules_file.read_text(), count=1, flags=re.S)
    for _ in range(2):
        netns._nft(lan.vms[vm].ns, text)


def reaches(lan, source: str, target: str, port: int) -> bool:
    with lan.inside(source):
        try:
            socket.create_connection((lan.vms[target].address, port), timeout=1).close()
            return True
        except OSError:  # dropped: timed out
            return False


def listen(lan, vm: str, port: int) -> socket.socket:
    with lan.inside(vm):
        server = socket.create_server((lan.vms[vm].address, port))
    return server


def test_the_scheduler_rule_lets_in_the_named_sources_only(lan):
    with listen(lan, "sched", 8786), listen(lan, "sched", 8787):
        assert reaches(lan, "w2", "sched", 8786)  # no rule yet
        load(lan, "sched", SCHEDULER_RULES, [lan.vms["svc"].address, lan.vms["w1"].address])
        assert reaches(lan, "svc", "sched", 8786) and reaches(lan, "w1", "sched", 8786)
        assert not reaches(lan, "w2", "sched", 8786)
        assert reaches(lan, "w2", "sched", 8787)  # only its port: the rest of the host's firewall is the operator's


def test_the_worker_rule_lets_in_the_scheduler_only_on_every_worker_port(lan):
    servers = [listen(lan, "w1", port) for port in (8790, 8799)]
    try:
        load(lan, "w1", WORKER_RULES, [lan.vms["sched"].address])
        for port in (8790, 8799):
            assert reaches(lan, "sched", "w1", port)
            assert not reaches(lan, "svc", "w1", port) and not reaches(lan, "w2", "w1", port)
    finally:
        for server in servers:
            server.close()


def test_the_worker_units_specifiers_are_expanded_everywhere_as_systemd_does(tmp_path):
    vm = Installation(tmp_path / "vm", hostname="cloned")
    (vm.etc / "dask.env").write_text("RETAILPULSE_DASK_SCHEDULER=tls://10.0.0.5:8786\nRETAILPULSE_DASK_HOST=10.0.0.7\n")
    env = vm.environment(WORKER_UNIT, instance="3")
    assert env["DASK_TEMPORARY_DIRECTORY"] == f"{vm.root}/var/lib/retail-pulse-dask/worker-3"
    argv = vm.command(WORKER_UNIT, env, instance="3")
    assert argv[argv.index("--name") + 1] == "10.0.0.7-3"  # unique where hosts share a host name
    assert not [word for word in argv if "%" in word]
