"""Pure parts of the skylet (status from driver states, cluster selection), of skyctl's job
commands (log prefixing, --wait defaults) and of the process helpers."""
from __future__ import annotations

import io
import os

import click
import pytest

from skylet.agent import Selection, apply_replica_state
from skyctl.jobs_cmds import LogPrinter, wait_defaults
from skyshift import processes
from skyshift.drivers.base import Endpoint, Phase, ReplicaState
from skyshift.v1 import objects_pb2 as pb


def test_prefixed_output_is_split_into_whole_lines_per_replica():
    out = io.BytesIO()
    printer = LogPrinter(prefixed=True, out=out)
    printer.write("a-0", b"one\ntw")
    printer.write("a-1", b"x\n")
    printer.write("a-0", b"o\nthr")
    printer.finish()
    assert out.getvalue() == b"[a-0] one\n[a-1] x\n[a-0] two\n[a-0] thr\n"


def test_single_replica_output_passes_through_unchanged():
    out = io.BytesIO()
    printer = LogPrinter(prefixed=False, out=out)
    printer.write("a-0", b"\x00raw")
    printer.finish()
    assert out.getvalue() == b"\x00raw"


def test_wait_runs_a_job_once_unless_told_otherwise_and_refuses_always():
    flags = {"restart_policy": ""}
    wait_defaults(flags)
    assert flags["restart_policy"] == "Never"
    flags = {"restart_policy": "onfailure"}
    wait_defaults(flags)
    assert flags["restart_policy"] == "onfailure"
    with pytest.raises(click.BadParameter):
        wait_defaults({"restart_policy": "Always"})


def test_replica_status_follows_the_driver_but_never_leaves_a_terminal_phase():
    replica = pb.Replica()
    running = ReplicaState(Phase.RUNNING, start_time=100.5, node="n1", endpoints=(Endpoint("10.0.0.1", 80, "n1"),))
    assert apply_replica_state(replica, running, "h1")
    assert (replica.status.phase, replica.status.handle) == ("RUNNING", "h1")
    assert replica.status.start_time.ToNanoseconds() == 100_500_000_000
    assert [(e.address, e.port, e.node) for e in replica.status.endpoints] == [("10.0.0.1", 80, "n1")]
    assert not apply_replica_state(replica, running, "h1")  # nothing new: no write

    done = ReplicaState(Phase.FAILED, exit_code=3, start_time=100.5, finish_time=101.0, node="n1")
    assert apply_replica_state(replica, done, "h1")
    assert (replica.status.phase, replica.status.exit_code, list(replica.status.endpoints)) == ("FAILED", 3, [])

    replica.status.phase = "EVICTED"
    assert not apply_replica_state(replica, running, "h1")
    assert replica.status.phase == "EVICTED"


def test_a_skylet_serves_named_clusters_or_one_managers():
    named = Selection(names=("a",))
    assert (named.cluster_field_selector(), named.replica_field_selector()) == ("metadata.name=a", "spec.cluster=a")
    several = Selection(names=("a", "b"))
    assert (several.cluster_field_selector(), several.replica_field_selector()) == ("", "")
    sim = Selection(manager="sim")
    assert sim.cluster_field_selector() == "spec.manager=sim"
    cluster = pb.Cluster()
    cluster.metadata.name, cluster.spec.manager = "b", "sim"
    assert several.serves(cluster) and sim.serves(cluster) and not named.serves(cluster)
    with pytest.raises(ValueError):
        Selection()


def test_a_pid_matches_only_the_arguments_it_was_started_with():
    me = os.getpid()
    argv = processes.command_line(me)
    assert argv and processes.matches(me, argv[1:])
    assert not processes.matches(me, ["--surely-not-an-argument-of-pytest"])
    assert processes.is_alive(me)
