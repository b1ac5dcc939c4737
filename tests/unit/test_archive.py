"""Unit tests for libra_worker.archive against a fake swiftclient Connection."""

from __future__ import annotations

import gzip
import hashlib
import logging
import random
import re
import socket
import time
from pathlib import Path

import pytest
import requests
from swiftclient.exceptions import ClientException

from libra_worker import archive, logsink
from libra_worker.errors import ArchiveFailed
from libra_worker.logsink import LogStore

TOKEN = "AUTH_tk0123456789abcdef0123456789abcdef"
ENDPOINT = "http://127.0.0.1:20001/v1/AUTH_test"
OBJECT_NAME = re.compile(r"^lbaaslogs/15/haproxy-\d{8}-\d{6}-\d{9}\.log\.gz$")


class FakeSwift:
    """Stands in for Swift: stores objects; ``failures`` are raised in order, those in
    ``failures_after_storing`` once the object is stored (an answer that never came)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.metadata: dict[tuple[str, str], dict[str, str]] = {}
        self.containers: set[str] = set()
        self.failures: list[Exception] = []
        self.failures_after_storing: list[Exception] = []
        self.keeps_metadata = True
        self.connections = 0
        self.puts = 0
        self.returned_etag: str | None = None

    def lines(self) -> bytes:
        """Every stored object's lines, in name order."""
        return b"".join(gzip.decompress(self.objects[key]) for key in sorted(self.objects))

    def connection(self, **kwargs) -> "FakeConnection":
        assert kwargs["preauthtoken"] == TOKEN and kwargs["retries"] == 0
        assert 0 < kwargs["timeout"] <= 15
        self.connections += 1
        return FakeConnection(self)


class FakeConnection:
    def __init__(self, swift: FakeSwift) -> None:
        self.swift = swift

    def put_object(self, container, name, contents, content_length, etag,
                   content_type, headers, response_dict):
        self.swift.puts += 1
        if self.swift.failures:
            raise self.swift.failures.pop(0)
        if container not in self.swift.containers:
            raise ClientException("not found", http_status=404)
        assert headers["If-None-Match"] == "*"
        if (container, name) in self.swift.objects:
            raise ClientException("exists", http_status=412)
        body = contents.read()
        assert len(body) == content_length
        assert hashlib.md5(body).hexdigest() == etag
        self.swift.objects[(container, name)] = body
        if self.swift.keeps_metadata:
            self.swift.metadata[(container, name)] = {
                key.lower(): value for key, value in headers.items()
                if key.lower().startswith("x-object-meta-")}
        if self.swift.failures_after_storing:
            raise self.swift.failures_after_storing.pop(0)
        response_dict["status"] = 201
        return self.swift.returned_etag or etag

    def put_container(self, container):
        self.swift.containers.add(container)

    def head_object(self, container, name):
        body = self.swift.objects[(container, name)]
        return {"etag": self.swift.returned_etag or hashlib.md5(body).hexdigest(),
                **self.swift.metadata.get((container, name), {})}

    def close(self) -> None:
        pass


@pytest.fixture
def swift(monkeypatch: pytest.MonkeyPatch) -> FakeSwift:
    fake = FakeSwift()
    monkeypatch.setattr(archive.swiftclient.client, "Connection", fake.connection)
    monkeypatch.setattr(archive, "FIRST_BACKOFF", 0.01)
    return fake


@pytest.fixture
def store(tmp_path: Path) -> LogStore:
    directory = tmp_path / "logs"
    directory.mkdir()
    return LogStore(directory)


def run(store: LogStore, protocol: str = "HTTP", token: str = TOKEN,
        job: str | None = None) -> dict:
    return archive.archive_logs(store.directory.parent, protocol=protocol, lb_id="15",
                                basepath="lbaaslogs", endpoint=ENDPOINT, token=token, job=job)


def shipped(swift: FakeSwift, result: dict) -> bytes:
    container, name = result["object"].split("/", 1)
    return gzip.decompress(swift.objects[(container, name)])


def leftovers(store: LogStore) -> list[str]:
    return sorted(path.name for path in store.directory.iterdir()
                  if path.name.startswith(".") or path.suffix == ".tmp")


def test_ships_each_pending_file_as_its_object_oldest_first(swift: FakeSwift,
                                                             store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\nb\n")
    store.rotate("http")
    store.active_path("http").write_bytes(b"c\n")
    store.active_path("tcp").write_bytes(b"tcp\n")
    result = run(store)
    assert len(result["objects"]) == 2 and result["object"] == result["objects"][-1]
    assert all(OBJECT_NAME.match(name) for name in result["objects"])
    assert sorted(result["objects"]) == result["objects"]
    assert [shipped(swift, {"object": name}) for name in result["objects"]] == [
        b"a\nb\n", b"c\n"]
    assert (result["lines"], result["bytes"], result["dropped"]) == (3, 6, 0)
    assert store.pending_paths("http") == []
    assert not store.active_path("http").exists()
    assert store.active_path("tcp").read_bytes() == b"tcp\n"
    assert leftovers(store) == []


def test_nothing_to_archive(swift: FakeSwift, store: LogStore) -> None:
    with pytest.raises(ArchiveFailed, match="no new TCP log lines"):
        run(store, protocol="tcp")
    assert swift.connections == 0


def test_streams_in_chunks(swift: FakeSwift, store: LogStore,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive, "CHUNK_SIZE", 7)
    lines = b"".join(b"line %d\n" % n for n in range(1000))
    store.active_path("http").write_bytes(lines)
    result = run(store)
    assert shipped(swift, result) == lines
    assert result["lines"] == 1000


def test_unauthorized_keeps_everything(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    swift.failures = [ClientException("Unauthorized", http_status=401)]
    with pytest.raises(ArchiveFailed, match="authorization token") as failure:
        run(store)
    assert TOKEN not in str(failure.value)
    assert swift.connections == 1
    store.active_path("http").write_bytes(b"b\n")
    run(store)
    assert swift.lines() == b"a\nb\n"


def test_unreachable_retries_with_fresh_connections_then_fails(
        swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    swift.failures = [requests.exceptions.ConnectionError("refused")] * 3
    with pytest.raises(ArchiveFailed, match="Could not reach"):
        run(store)
    assert swift.connections == archive.MAX_ATTEMPTS
    assert [p.read_bytes() for p in store.pending_paths("http")] == [b"a\n"]
    assert leftovers(store) == []


def bind_in_test_range(sock: socket.socket) -> None:
    for port in range(random.randint(20000, 31000), 32000):
        try:
            sock.bind(("127.0.0.1", port))
            return
        except OSError:
            continue
    raise RuntimeError("no free port")


def test_hung_endpoint_fails_within_the_timeout(store: LogStore) -> None:
    """Real swiftclient against a loopback socket that never answers."""
    store.active_path("http").write_bytes(b"a\n")
    with socket.socket() as silent:
        bind_in_test_range(silent)
        silent.listen(8)
        endpoint = "http://127.0.0.1:%d/v1/AUTH_test" % silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ArchiveFailed, match="Could not reach"):
            archive.archive_logs(store.directory, protocol="HTTP", lb_id="15",
                                 basepath="c", endpoint=endpoint, token=TOKEN,
                                 timeout=1.0)
        assert time.monotonic() - started < 1.0
    assert store.stored_bytes("http") == 2


def test_server_error_then_success(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    swift.failures = [ClientException("boom", http_status=503, http_reason="Unavailable")]
    assert shipped(swift, run(store)) == b"a\n"
    assert swift.connections == 2


def test_persistent_server_error_is_reported(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    swift.failures = [ClientException("boom", http_status=500)] * 3
    with pytest.raises(ArchiveFailed, match="HTTP 500"):
        run(store)
    assert store.stored_bytes("http") == 2


def test_etag_mismatch_is_a_failure(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    swift.returned_etag = "0" * 32
    with pytest.raises(ArchiveFailed, match="etag"):
        run(store)
    assert store.stored_bytes("http") == 2
    # The object under that name is not proven to be these lines: they go under another.
    swift.returned_etag = None
    swift.objects = {key: b"garbled" for key in swift.objects}
    result = run(store)
    assert len(swift.objects) == 2 and shipped(swift, result) == b"a\n"


def test_swift_422_is_an_etag_mismatch(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    swift.failures = [ClientException("Unprocessable", http_status=422)] * 3
    with pytest.raises(ArchiveFailed, match="etag"):
        run(store)


def test_a_name_holding_other_lines_is_never_overwritten(
        swift: FakeSwift, store: LogStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock set back gives a rotation the stamp of one already shipped (and gone)."""
    monkeypatch.setattr(logsink.time, "time_ns", lambda: 1_700_000_000_123_456_789)
    store.active_path("http").write_bytes(b"first\n")
    first = run(store)
    store.active_path("http").write_bytes(b"second\n")
    second = run(store)
    assert first["object"].endswith("/haproxy-20231114-221320-123456789.log.gz")
    assert first["object"] != second["object"]
    assert shipped(swift, first) == b"first\n"
    assert shipped(swift, second) == b"second\n"
    assert store.pending_paths("http") == []


@pytest.mark.parametrize("keeps_metadata", [True, False])
def test_an_object_stored_whose_answer_was_lost_is_shipped_once(
        swift: FakeSwift, store: LogStore, keeps_metadata: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Within one ARCHIVE (a retried attempt) and across ARCHIVEs, with new lines
    waiting; without metadata the etag alone proves it (the gzip is the same)."""
    swift.keeps_metadata = keeps_metadata
    swift.containers.add("lbaaslogs")
    store.active_path("http").write_bytes(b"a\n")
    swift.failures_after_storing = [requests.exceptions.ReadTimeout("no answer")]
    retried = run(store)
    assert swift.puts == 2 and shipped(swift, retried) == b"a\n"

    store.active_path("http").write_bytes(b"b\n")
    swift.failures_after_storing = [ClientException("lost", http_status=503)]
    monkeypatch.setattr(archive, "MAX_ATTEMPTS", 1)  # as if the worker died then
    with pytest.raises(ArchiveFailed, match="HTTP 503"):
        run(store)
    monkeypatch.setattr(archive, "MAX_ATTEMPTS", 3)
    assert len(swift.objects) == 2
    kept = store.pending_paths("http")
    store.active_path("http").write_bytes(b"c\n")
    later = run(store)
    assert len(later["objects"]) == 2 and later["lines"] == 2
    assert shipped(swift, {"object": later["objects"][0]}) == b"b\n"
    assert swift.lines() == b"a\nb\nc\n"
    assert len(kept) == 1 and not kept[0].exists()


def test_the_same_lines_compressed_otherwise_count_as_shipped(
        swift: FakeSwift, store: LogStore) -> None:
    """Another zlib after an upgrade: the lines' MD5 proves the object is theirs."""
    store.active_path("http").write_bytes(b"a\n" * 100)
    swift.failures = [ClientException("down", http_status=503)] * 3
    with pytest.raises(ArchiveFailed):
        run(store)
    (pending,) = store.pending_paths("http")
    name = ("lbaaslogs", "15/haproxy-%s.log.gz" % re.search(
        r"haproxy-(.*)\.log\.gz", archive.SwiftTarget(ENDPOINT, TOKEN, "lbaaslogs", "15")
        .object_name(logsink.pending_stamp(pending)))[1])
    swift.objects[name] = gzip.compress(b"a\n" * 100, compresslevel=1)
    swift.metadata[name] = {
        "x-object-meta-lines-md5": hashlib.md5(b"a\n" * 100).hexdigest(),
        "x-object-meta-gzip-md5": hashlib.md5(swift.objects[name]).hexdigest()}
    result = run(store)
    assert result["objects"] == ["/".join(name)] and len(swift.objects) == 1
    assert store.pending_paths("http") == []


def test_a_job_handed_out_again_gets_the_same_answer(swift: FakeSwift,
                                                     store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    first = run(store, job="H:lb:1 unique-1")
    store.active_path("http").write_bytes(b"b\n")
    assert run(store, job="H:lb:1 unique-1") == first
    assert len(swift.objects) == 1 and store.active_path("http").read_bytes() == b"b\n"
    assert shipped(swift, run(store, job="H:lb:2 unique-2")) == b"b\n"
    with pytest.raises(ArchiveFailed, match="no new HTTP"):
        run(store, job="H:lb:1 unique-1")


def test_a_partial_failure_keeps_only_what_was_not_shipped(swift: FakeSwift,
                                                          store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    store.rotate("http")
    store.active_path("http").write_bytes(b"b\n")
    swift.containers.add("lbaaslogs")
    first_put = FakeConnection.put_object

    def second_fails(self, container, name, *args, **kwargs):
        if self.swift.objects:
            raise ClientException("down", http_status=503)
        return first_put(self, container, name, *args, **kwargs)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(FakeConnection, "put_object", second_fails)
    try:
        with pytest.raises(ArchiveFailed, match="kept for the next ARCHIVE"):
            run(store)
    finally:
        monkeypatch.undo()
    assert [path.read_bytes() for path in store.pending_paths("http")] == [b"b\n"]
    assert shipped(swift, run(store)) == b"b\n"
    assert swift.lines() == b"a\nb\n"


def test_reports_dropped_lines_once(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("http").write_bytes(b"a\n")
    store.dropped_path("http").write_text("4\n")
    assert run(store)["dropped"] == 4
    store.active_path("http").write_bytes(b"b\n")
    assert run(store)["dropped"] == 0


def test_token_never_logged(swift: FakeSwift, store: LogStore,
                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store.active_path("http").write_bytes(b"a\n")

    def leaky_put(*args, **kwargs):
        logging.getLogger("swiftclient").debug("REQ: -H 'X-Auth-Token: %s'", TOKEN)
        raise ClientException("Unauthorized", http_status=401)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(FakeConnection, "put_object", leaky_put)
    try:
        with pytest.raises(ArchiveFailed):
            run(store)
    finally:
        monkeypatch.undo()
    assert "X-Auth-Token: <token>" in caplog.text
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("kwargs, message", [
    ({"protocol": "UDP"}, "protocol"),
    ({"lb_id": "a/b"}, "load balancer id"),
    ({"basepath": "/"}, "base path"),
    ({"endpoint": "ftp://x"}, "endpoint"),
    ({"token": ""}, "token is empty"),
])
def test_rejects_bad_arguments(store: LogStore, kwargs: dict, message: str) -> None:
    arguments = {"protocol": "HTTP", "lb_id": "15", "basepath": "lbaaslogs",
                 "endpoint": ENDPOINT, "token": TOKEN, **kwargs}
    with pytest.raises(ArchiveFailed, match=message):
        archive.archive_logs(store.directory, **arguments)


def test_basepath_may_carry_a_prefix(swift: FakeSwift, store: LogStore) -> None:
    store.active_path("tcp").write_bytes(b"t\n")
    result = archive.archive_logs(store.directory, protocol="TCP", lb_id="9",
                                  basepath="/logs/device-1/", endpoint=ENDPOINT,
                                  token=TOKEN)
    assert re.match(r"^logs/device-1/9/haproxy-\d{8}-\d{6}-\d{9}\.log\.gz$", result["object"])


# ---------------------------------------------------------------------- endpoint policy


@pytest.mark.parametrize("allowed, endpoint", [
    ((), "https://anything.example.com/v1/AUTH_x"),
    (("swift.example.com",), "https://swift.example.com/v1/AUTH_x"),
    (("swift.example.com",), "https://SWIFT.example.com:8443/v1/AUTH_x"),
    (("https://swift.example.com/v1/AUTH_x",), "https://swift.example.com/v1/AUTH_x"),
    (("https://swift.example.com/v1/AUTH_x/",), "https://swift.example.com/v1/AUTH_x/sub"),
    (("https://swift.example.com:443/v1",), "https://swift.example.com/v1/AUTH_x"),
    (("other.example.com", "[fd00::5]"), "https://[fd00::5]/v1/AUTH_x"),
])
def test_allowed_endpoints(allowed, endpoint):
    archive.EndpointPolicy(allowed).check(endpoint)


@pytest.mark.parametrize("allowed, endpoint", [
    (("swift.example.com",), "https://swift.example.com.evil.org/v1/AUTH_x"),
    (("swift.example.com",), "https://swift.example.com@evil.org/v1/AUTH_x"),
    (("swift.example.com",), "https://evil.org/swift.example.com"),
    (("https://swift.example.com/v1/AUTH_x",), "https://swift.example.com/v1/AUTH_xy"),
    (("https://swift.example.com/v1/AUTH_x",), "https://swift.example.com/v1/AUTH_y"),
    (("https://swift.example.com/v1",), "https://swift.example.com:8443/v1/AUTH_x"),
])
def test_endpoints_outside_the_allow_list_are_refused_naming_the_setting(allowed, endpoint):
    with pytest.raises(ArchiveFailed, match=r"\[archive\] allowed_endpoints") as caught:
        archive.EndpointPolicy(allowed).check(endpoint)
    assert "evil.org@" not in str(caught.value)


def test_plain_http_is_refused_unless_allowed():
    with pytest.raises(ArchiveFailed, match=r"allow_plain_http = false"):
        archive.EndpointPolicy(("swift.example.com",)).check("http://swift.example.com/v1/a")
    archive.EndpointPolicy(("swift.example.com",), allow_plain_http=True).check(
        "http://swift.example.com/v1/a")


def test_credentials_in_a_refused_endpoint_are_not_repeated():
    with pytest.raises(ArchiveFailed) as caught:
        archive.EndpointPolicy(("swift.example.com",)).check("https://user:pw@evil.org/v1?k=v")
    assert "pw" not in str(caught.value) and "pw" not in caught.value.detail
    assert "'https://evil.org/v1'" in caught.value.detail
    assert str(caught.value).startswith("hpcs_object_store_endpoint: not in [archive] allowed_endpoints")
