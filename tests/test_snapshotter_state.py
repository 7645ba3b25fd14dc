"""The snapshotter's own logic without containerd: state, filters, mounts
it hands out, and the gRPC codes containerd relies on."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from lazyfs.containerd import api
from lazyfs.snapshotter.filters import parse_filters, snapshot_fields
from lazyfs.snapshotter.remote import LABEL_TARGET
from lazyfs.snapshotter.server import SnapshotsService
from lazyfs.snapshotter.snapshots import Snapshotter
from lazyfs.snapshotter.store import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Kind,
    NotFound,
    Store,
)


@pytest.fixture
def sn(tmp_path: Path) -> Snapshotter:
    return Snapshotter(tmp_path, Store(tmp_path / "metadata.db"), remote=None)


def committed(sn: Snapshotter, name: str, parent: str = "") -> None:
    sn.prepare(f"tmp-{name}", parent, {})
    (sn.fs_of(sn.stat(f"tmp-{name}")) / f"{name}.txt").write_text(name * 1000)
    sn.commit(name, f"tmp-{name}", {})


# -- filters


def test_filter_as_containerd_sends_it_matches_label_and_empty_parent():
    fields = snapshot_fields("n", "", "committed", {LABEL_TARGET: "sha256:abc"})
    assert parse_filters([f'labels."{LABEL_TARGET}"==sha256:abc,parent==""'])(fields)
    assert not parse_filters([f'labels."{LABEL_TARGET}"==sha256:abd,parent==""'])(fields)
    assert not parse_filters([f'labels."{LABEL_TARGET}"==sha256:abc,parent=="x"'])(fields)


def test_filters_in_a_list_are_or_and_clauses_are_and():
    fields = snapshot_fields("n", "p", "active", {"a": "1"})
    assert parse_filters(["kind==committed", "labels.a==1"])(fields)
    assert not parse_filters(["kind==committed,labels.a==1"])(fields)
    assert parse_filters(["name~=^n$", "nothing"])(fields)
    assert parse_filters(["labels.a"])(fields) and not parse_filters(["labels.b"])(fields)
    assert parse_filters(["kind!=view"])(fields)


@pytest.mark.parametrize("bad", ["==x", 'labels."unterminated==1', "name~=(", "name==a b"])
def test_malformed_filter_is_an_invalid_argument_naming_it(bad):
    with pytest.raises(InvalidArgument, match="filter"):
        parse_filters([bad])


# -- semantics


def test_active_snapshot_without_parent_is_a_writable_bind(sn):
    (m,) = sn.prepare("a", "", {})
    assert (m.type, m.options) == ("bind", ("rbind", "rw"))
    assert m.source == str(sn.fs_of(sn.stat("a")))


def test_active_snapshot_stacks_its_ancestors_nearest_first(sn):
    committed(sn, "l0")
    committed(sn, "l1", "l0")
    (m,) = sn.prepare("c", "l1", {})
    opts = dict(o.split("=", 1) for o in m.options)
    assert m.type == "overlay"
    assert opts["lowerdir"] == f"{sn.fs_of(sn.stat('l1'))}:{sn.fs_of(sn.stat('l0'))}"
    assert opts["upperdir"] == str(sn.fs_of(sn.stat("c")))
    assert Path(opts["workdir"]).is_dir()


def test_views_are_read_only(sn):
    committed(sn, "l0")
    committed(sn, "l1", "l0")
    (one,) = sn.view("v1", "l0", {})
    assert (one.type, one.source, one.options) == ("bind", str(sn.fs_of(sn.stat("l0"))), ("rbind", "ro"))
    (two,) = sn.view("v2", "l1", {})
    assert two.type == "overlay" and not any(o.startswith(("upperdir", "workdir")) for o in two.options)


def test_commit_renames_records_usage_and_refuses_views_and_taken_names(sn):
    committed(sn, "l0")
    snap = sn.stat("l0")
    assert snap.kind == Kind.COMMITTED and snap.size >= 2000 and snap.inodes == 1
    assert sn.usage("l0").size == snap.size
    with pytest.raises(NotFound):
        sn.stat("tmp-l0")
    sn.view("v", "l0", {})
    with pytest.raises(FailedPrecondition):
        sn.commit("x", "v", {})
    sn.prepare("a", "l0", {})
    with pytest.raises(AlreadyExists):
        sn.commit("l0", "a", {})


def test_parent_must_exist_and_be_committed(sn):
    with pytest.raises(NotFound):
        sn.prepare("a", "nope", {})
    sn.prepare("active", "", {})
    with pytest.raises(InvalidArgument, match="not a committed"):
        sn.prepare("b", "active", {})
    with pytest.raises(AlreadyExists):
        sn.prepare("active", "", {})


def test_remove_refuses_a_parent_and_deletes_the_directory(sn):
    committed(sn, "l0")
    sn.prepare("c", "l0", {})
    with pytest.raises(FailedPrecondition, match="children"):
        sn.remove("l0")
    d = sn.dir_of(sn.stat("c"))
    sn.remove("c")
    assert not d.exists()
    sn.remove("l0")
    assert sn.list([]) == []


def test_update_replaces_or_edits_labels_by_mask(sn):
    sn.prepare("a", "", {"x": "1", "y": "2"})
    assert sn.update("a", {"x": "9"}, ["labels.x"]).labels == {"x": "9", "y": "2"}
    assert sn.update("a", {}, ["labels.y"]).labels == {"x": "9"}
    assert sn.update("a", {"z": "3"}, []).labels == {"z": "3"}
    with pytest.raises(InvalidArgument):
        sn.update("a", {}, ["parent"])


def test_state_survives_reopening_the_database(tmp_path):
    sn = Snapshotter(tmp_path, Store(tmp_path / "metadata.db"), remote=None)
    committed(sn, "l0")
    sn.prepare("c", "l0", {"k": "v"})
    sn.store.close()
    again = Snapshotter(tmp_path, Store(tmp_path / "metadata.db"), remote=None)
    assert [(s.key, s.kind, s.labels) for s in again.list([])] == [
        ("l0", Kind.COMMITTED, {}),
        ("c", Kind.ACTIVE, {"k": "v"}),
    ]


def test_cleanup_removes_directories_no_snapshot_owns(sn):
    sn.prepare("a", "", {})
    orphan = sn.snapshots_dir / "999"
    (orphan / "fs").mkdir(parents=True)
    assert sn.cleanup() == 1
    assert not orphan.exists() and sn.fs_of(sn.stat("a")).is_dir()


# -- over gRPC


@pytest.fixture
def channel(sn: Snapshotter, tmp_path: Path):
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((SnapshotsService(sn).handler(),))
    sock = tmp_path / "s.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    ch = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield ch
    finally:
        ch.close()
        server.stop(0)


def _call(ch: grpc.Channel, name: str, req: str, resp: str, **fields):
    m = api.messages()
    request = m(f"containerd.services.snapshots.v1.{req}")(**fields)
    if name == "List":
        stub = ch.unary_stream(api.method(api.SNAPSHOTS, name), request_serializer=type(request).SerializeToString, response_deserializer=m(resp).FromString)
        return list(stub(request, timeout=10))
    stub = ch.unary_unary(api.method(api.SNAPSHOTS, name), request_serializer=type(request).SerializeToString, response_deserializer=m(resp).FromString)
    return stub(request, timeout=10)


def test_grpc_codes_are_the_ones_containerd_maps_back(channel):
    prep = ("Prepare", "PrepareSnapshotRequest", "containerd.services.snapshots.v1.PrepareSnapshotResponse")
    out = _call(channel, *prep, key="a", labels={"l": "1"})
    assert out.mounts[0].type == "bind"
    with pytest.raises(grpc.RpcError) as exc:
        _call(channel, *prep, key="a")
    assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as exc:
        _call(channel, "Stat", "StatSnapshotRequest", "containerd.services.snapshots.v1.StatSnapshotResponse", key="zz")
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:
        _call(channel, "List", "ListSnapshotsRequest", "containerd.services.snapshots.v1.ListSnapshotsResponse", filters=["name~=("])
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_list_streams_matching_snapshots_with_kind_and_labels(channel):
    prep = ("Prepare", "PrepareSnapshotRequest", "containerd.services.snapshots.v1.PrepareSnapshotResponse")
    for i in range(150):
        _call(channel, *prep, key=f"k{i}", labels={"even": str(i % 2 == 0)})
    batches = _call(channel, "List", "ListSnapshotsRequest", "containerd.services.snapshots.v1.ListSnapshotsResponse", filters=["labels.even==True"])
    infos = [info for b in batches for info in b.info]
    assert len(infos) == 75 and {i.kind for i in infos} == {int(Kind.ACTIVE)}
    assert all(i.labels["even"] == "True" and i.created_at.seconds > 0 for i in infos)


def test_concurrent_prepares_of_one_key_create_it_once(sn):
    errors: list[Exception] = []

    def go() -> None:
        try:
            sn.prepare("same", "", {})
        except AlreadyExists as exc:
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 7 and len(sn.list([])) == 1


# -- the pre-imported mount helper


def test_zygote_runs_commands_and_reports_status_and_stderr():
    from lazyfs.snapshotter.zygote import Zygote

    z = Zygote()
    z.start()
    try:
        assert z.run(["--version"], None, 60) == (0, "")
        rc, err = z.run(["mount", "localhost:1/no/such:v1", "/nonexistent/dir"], None, 60)
        assert rc == 1 and err.startswith("lazyerofs: error:") and "Traceback" not in err
        # It serves one request after another from the same process.
        assert z.run(["--version"], None, 60) == (0, "")
    finally:
        z.stop()


def test_zygote_that_is_gone_declines_so_the_caller_starts_a_process():
    from lazyfs.snapshotter.zygote import Zygote

    z = Zygote()
    assert z.run(["--version"], None, 5) is None  # never started
    z.start()
    z.stop()
    assert z.run(["--version"], None, 5) is None
