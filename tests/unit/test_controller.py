"""Unit tests for libra_worker.controller with an in-memory fake driver."""

from __future__ import annotations

import errno
import gc
import json
import logging
from typing import Any

import pytest

from libra_worker import __version__
from libra_worker import controller as controller_module
from libra_worker.controller import RELEASE, LBaaSController
from libra_worker.diagnostics import Diagnostics
from libra_worker.drivers.base import DeviceHealth, DeviceStats, LoadBalancerDriver, NodeStatus
from libra_worker.errors import (
    ActionTimeout,
    ArchiveFailed,
    ConfigCheckFailed,
    ReloadFailed,
    StatsUnavailable,
)
from libra_worker.messages import (
    MAX_ERROR_LENGTH,
    Action,
    ArchiveRequest,
    Device,
    Message,
    Protocol,
    bad_request,
    decode,
    encode_reply,
)
from libra_worker.metrics import MetricsPeriod

UPDATE = {
    "hpcs_action": "UPDATE",
    "loadbalancers": [
        {"name": "a-new-loadbalancer", "protocol": "http",
         "nodes": [{"address": "10.0.0.1", "port": "80", "weight": "1"}]}
    ],
}
ARCHIVE = {
    "hpcs_action": "ARCHIVE",
    "hpcs_object_store_basepath": "lbaaslogs",
    "hpcs_object_store_endpoint": "https://example.com/v1/100",
    "hpcs_object_store_token": "MY_AUTH_TOKEN",
    "hpcs_object_store_type": "swift",
    "loadbalancers": [{"id": "15", "name": "lb #1", "protocol": "HTTP"}],
}
STATS = DeviceStats(
    state="ACTIVE",
    since="2024-01-02T03:04:05Z",
    nodes=(NodeStatus("10.0.0.1_80", "UP", "HTTP"), NodeStatus("web2", "DOWN", "TCP")),
    restarts=2,
    last_error="HAProxy exited unexpectedly; restarted.",
)
PERIOD = MetricsPeriod("2026-11-26 07:00:00.000000", "2026-11-26 07:01:00.250000",
                       (("http", 12345), ("tcp", 0)))
HEALTH = DeviceHealth(state="ACTIVE", haproxy_version="2.6.12", haproxy_running=True,
                      haproxy_master_pid=42, haproxy_dropped_logs=0,
                      state_dir_free_bytes=10 ** 9, log_sink_running=True, log_sink_pid=43,
                      unreadable_access_lines=0)


class FakeDriver(LoadBalancerDriver):
    """Records every call; `failures[method]` is raised instead of doing the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.failures: dict[str, BaseException] = {}
        self.archive_result: dict[str, Any] = {"object": "lbaaslogs/15/x.log.gz"}

    def _record(self, method: str, argument: Any = None) -> None:
        self.calls.append((method, argument))
        if method in self.failures:
            raise self.failures[method]

    def restore(self) -> None:
        self._record("restore")

    def update(self, device: Device) -> None:
        self._record("update", device)

    def suspend(self) -> None:
        self._record("suspend")

    def enable(self) -> None:
        self._record("enable")

    def delete(self) -> None:
        self._record("delete")

    def stats(self) -> DeviceStats:
        self._record("stats")
        return STATS

    def archive(self, request: ArchiveRequest, job: str | None = None) -> dict[str, Any]:
        self._record("archive", request)
        return self.archive_result

    def metrics(self, job: str | None = None) -> MetricsPeriod:
        self._record("metrics")
        return PERIOD

    def health(self) -> DeviceHealth:
        self._record("health")
        return HEALTH


@pytest.fixture
def driver() -> FakeDriver:
    return FakeDriver()


@pytest.fixture
def controller(driver) -> LBaaSController:
    return LBaaSController(driver)


def handle(controller, document) -> dict[str, Any]:
    """Send `document` as the JSON bytes a job carries; the reply must be JSON-serialisable,
    and the bytes sent back must be that reply."""
    answer = controller.handle(json.dumps(document).encode("utf-8"))
    assert json.loads(json.dumps(answer)) == answer
    assert json.loads(encode_reply(answer)) == answer
    return answer


# ---------------------------------------------------------------------- dispatch


def test_update_passes_parsed_device(controller, driver):
    answer = handle(controller, UPDATE)
    assert answer == {**UPDATE, "hpcs_response": "PASS"}
    [(method, device)] = driver.calls
    assert method == "update"
    assert isinstance(device, Device)
    assert device.loadbalancers[0].protocol is Protocol.HTTP
    assert device.loadbalancers[0].nodes[0].address == "10.0.0.1"


def test_a_pass_that_adds_only_the_outcome_echoes_the_bytes_received(controller):
    payload = b'{"hpcs_action":"UPDATE",\n "loadbalancers": [{"protocol": "HTTP", "port": 80, ' \
              b'"nodes": [{"address": "10.0.0.1", "port": 80, "note": "caf\xc3\xa9"}]}]}\n'
    answer = controller.handle(payload)
    assert encode_reply(answer) == payload.rstrip()[:-1] + b', "hpcs_response": "PASS"}'
    assert json.loads(encode_reply(answer)) == {**json.loads(payload), "hpcs_response": "PASS"}


def test_the_cycle_collector_is_paused_while_a_large_message_is_validated_not_a_ping(
        controller, monkeypatch):
    collector_running: list[bool] = []

    def watched(payload: Any, max_bytes: int) -> Any:
        collector_running.append(gc.isenabled())
        return decode(payload, max_bytes)

    monkeypatch.setattr(controller_module, "decode", watched)
    nodes = [{"address": "10.0.0.1", "port": 8000 + i} for i in range(200)]
    large = json.dumps({"hpcs_action": "UPDATE", "loadbalancers": [
        {"protocol": "HTTP", "port": 80, "nodes": nodes}]}).encode()
    assert handle(controller, {"hpcs_action": "DISCOVER"})["hpcs_response"] == "PASS"
    assert controller.handle(large)["hpcs_response"] == "PASS"
    assert collector_running == [True, False]
    assert gc.isenabled()


@pytest.mark.parametrize("payload", [
    b'{"hpcs_action": "SUSPEND", "HPCS_Response": "FAIL"}',  # the sender's outcome is replaced
    '{"hpcs_action": "SUSPEND"}',  # text, not bytes: encoded afresh
    b'{"hpcs_action": "DISCOVER"}',  # more than the outcome to add
])
def test_other_replies_are_encoded_afresh_with_one_outcome(controller, payload):
    answer = controller.handle(payload)
    encoded = encode_reply(answer)
    assert json.loads(encoded) == answer and answer["hpcs_response"] == "PASS"
    assert encoded.lower().count(b"hpcs_response") == 1


@pytest.mark.parametrize("action, method", [
    ("SUSPEND", "suspend"), ("suspend", "suspend"), ("ENABLE", "enable"), ("Delete", "delete"),
])
def test_simple_actions_dispatch(controller, driver, action, method):
    answer = handle(controller, {"hpcs_action": action})
    assert answer == {"hpcs_action": action, "hpcs_response": "PASS"}
    assert driver.calls == [(method, None)]


def test_discover_reports_version_without_driver(controller, driver):
    answer = handle(controller, {"hpcs_action": "DISCOVER"})
    assert answer == {
        "hpcs_action": "DISCOVER",
        "version": __version__,
        "release": RELEASE,
        "hpcs_response": "PASS",
    }
    assert RELEASE == f"libra-worker {__version__}"
    assert driver.calls == []


def test_stats_reply_shape(controller, driver):
    answer = handle(controller, {"hpcs_action": "STATS"})
    assert answer == {
        "hpcs_action": "STATS",
        "status": "ACTIVE",
        "since": "2024-01-02T03:04:05Z",
        "restarts": 2,
        "last_error": "HAProxy exited unexpectedly; restarted.",
        "nodes": [{"id": "10.0.0.1_80", "status": "UP", "protocol": "HTTP"},
                  {"id": "web2", "status": "DOWN", "protocol": "TCP"}],
        "hpcs_response": "PASS",
    }
    assert driver.calls == [("stats", None)]


def test_stats_error_carries_reply_fields(controller, driver):
    driver.failures["stats"] = StatsUnavailable("The load balancer was deleted.", status="DELETED")
    answer = handle(controller, {"hpcs_action": "STATS"})
    assert answer == {
        "hpcs_action": "STATS",
        "status": "DELETED",
        "hpcs_response": "FAIL",
        "hpcs_error": "The load balancer was deleted.",
    }


def test_archive_passes_request_and_result(controller, driver):
    answer = handle(controller, ARCHIVE)
    assert answer == {**ARCHIVE, "archive": {"object": "lbaaslogs/15/x.log.gz"}, "hpcs_response": "PASS"}
    [(method, request)] = driver.calls
    assert method == "archive"
    assert request == ArchiveRequest(Protocol.HTTP, "15", "lbaaslogs",
                                     "https://example.com/v1/100", "MY_AUTH_TOKEN")


def test_archive_failure(controller, driver):
    driver.failures["archive"] = ArchiveFailed("Swift answered 401 Unauthorized.")
    answer = handle(controller, ARCHIVE)
    assert answer["hpcs_response"] == "FAIL"
    assert answer["hpcs_error"] == "Swift answered 401 Unauthorized."
    assert answer["hpcs_object_store_basepath"] == "lbaaslogs"
    assert "archive" not in answer


# ---------------------------------------------------------------------- driver failures


@pytest.mark.parametrize("error", [
    ConfigCheckFailed("HAProxy rejected the configuration: bad server."),
    ReloadFailed("HAProxy failed to start: port in use."),
    ActionTimeout("haproxy -c did not finish within 30 s."),
])
def test_driver_worker_error_becomes_fail(controller, driver, error):
    driver.failures["update"] = error
    answer = handle(controller, UPDATE)
    assert answer == {**UPDATE, "hpcs_response": "FAIL", "hpcs_error": str(error)}
    assert "badRequest" not in answer


@pytest.mark.parametrize("action, method", [("UPDATE", "update"), ("SUSPEND", "suspend"),
                                            ("ENABLE", "enable"), ("DELETE", "delete"),
                                            ("STATS", "stats"), ("ARCHIVE", "archive"),
                                            ("METRICS", "metrics")])
def test_unexpected_exception_becomes_generic_fail(controller, driver, action, method, caplog):
    driver.failures[method] = RuntimeError("secret internals /etc/shadow")
    document = {"UPDATE": UPDATE, "ARCHIVE": ARCHIVE}.get(action, {"hpcs_action": action})
    with caplog.at_level(logging.ERROR, logger="libra_worker.controller"):
        answer = handle(controller, document)
    assert answer["hpcs_response"] == "FAIL"
    assert answer["hpcs_error"] == (
        f"The worker hit an internal error during {action}; see the worker's log for details."
    )
    assert "secret internals" not in json.dumps(answer)
    # The traceback went to the log instead.
    assert any(record.exc_info and "secret internals" in str(record.exc_info[1])
               for record in caplog.records)


def test_worker_keeps_working_after_a_failure(controller, driver):
    driver.failures["suspend"] = RuntimeError("boom")
    assert handle(controller, {"hpcs_action": "SUSPEND"})["hpcs_response"] == "FAIL"
    del driver.failures["suspend"]
    assert handle(controller, {"hpcs_action": "SUSPEND"})["hpcs_response"] == "PASS"


# ---------------------------------------------------------------------- invalid messages


@pytest.mark.parametrize("payload", [
    b"{not json", b"", b"\xff\xfe\xfa", b'{"hpcs_action": "STATS"', "[1, 2]".encode(),
    b'[{"hpcs_action": "STATS"}]', b'"STATS"',
])
def test_undecodable_payloads_fail_without_driver(controller, driver, payload):
    answer = controller.handle(payload)
    assert answer["hpcs_response"] == "FAIL"
    assert answer["hpcs_error"]
    assert answer["badRequest"]["validationErrors"]["message"] == answer["hpcs_error"]
    assert driver.calls == []


def test_non_utf8_bytes(controller, driver):
    answer = controller.handle(b'{"hpcs_action": "\xff"}')
    assert answer["hpcs_error"].startswith("The message is not valid JSON")
    assert driver.calls == []


def test_json_array(controller, driver):
    answer = controller.handle(b"[]")
    assert answer["hpcs_error"] == "The message must be a JSON object."
    assert driver.calls == []


def test_missing_action(controller, driver):
    answer = handle(controller, {"loadbalancers": UPDATE["loadbalancers"]})
    assert answer["hpcs_error"] == "Required field 'hpcs_action' is missing."
    assert answer["loadbalancers"] == UPDATE["loadbalancers"]
    assert driver.calls == []


def test_unknown_action(controller, driver):
    answer = handle(controller, {"hpcs_action": "REBOOT"})
    assert answer["hpcs_action"] == "REBOOT"
    assert answer["hpcs_response"] == "FAIL"
    assert answer["hpcs_error"].startswith("hpcs_action 'REBOOT' is not supported")
    assert answer["badRequest"]["code"] == "400"
    assert driver.calls == []


def test_invalid_update_never_reaches_driver(controller, driver):
    bad = {**UPDATE, "loadbalancers": [{"protocol": "TCP", "nodes": []}]}
    answer = handle(controller, bad)
    assert answer["hpcs_error"] == "Required field 'loadbalancers[0].port' is missing."
    assert answer["badRequest"]["validationErrors"] == {"message": answer["hpcs_error"]}
    assert driver.calls == []


def test_invalid_archive_never_reaches_driver(controller, driver):
    answer = handle(controller, {**ARCHIVE, "hpcs_object_store_type": "s3"})
    assert answer["hpcs_response"] == "FAIL"
    assert "MY_AUTH_TOKEN" not in answer["hpcs_error"]
    assert driver.calls == []


def test_text_payload_accepted(controller, driver):
    assert controller.handle('{"hpcs_action": "enable"}')["hpcs_response"] == "PASS"
    assert driver.calls == [("enable", None)]


# ---------------------------------------------------------------------- prepare / execute


def test_prepare_returns_message_without_touching_driver(controller, driver):
    prepared = controller.prepare(json.dumps(UPDATE).encode())
    assert isinstance(prepared, Message)
    assert prepared.action is Action.UPDATE and prepared.original == UPDATE
    assert driver.calls == []
    outcome = controller.execute(prepared)
    assert outcome.reply == {**UPDATE, "hpcs_response": "PASS"}
    assert outcome.error is None
    assert [method for method, _ in driver.calls] == ["update"]


def test_prepare_returns_fail_reply_for_invalid(controller, driver):
    prepared = controller.prepare(b'{"hpcs_action": "UPDATE"}')
    assert prepared == bad_request({"hpcs_action": "UPDATE"}, "Required field 'loadbalancers' is missing.")
    assert driver.calls == []


# ---------------------------------------------------------------------- METRICS, DIAGNOSTICS


def test_metrics_reply_has_libras_shape(controller, driver):
    answer = handle(controller, {"hpcs_action": "METRICS"})
    assert answer == {
        "hpcs_action": "METRICS",
        "utc_start": "2026-11-26 07:00:00.000000",
        "utc_end": "2026-11-26 07:01:00.250000",
        "loadBalancers": [{"protocol": "http", "bytes_out": 12345},
                          {"protocol": "tcp", "bytes_out": 0}],
        "hpcs_response": "PASS",
    }


@pytest.mark.parametrize("error", [
    StatsUnavailable("The load balancer has been deleted.", status="DELETED"),
    ActionTimeout("METRICS did not finish within its 10 s timeout."),
    RuntimeError("boom"),
    OSError(28, "No space left on device", "/state/metrics.json"),
])
def test_a_failed_metrics_still_carries_the_keys_libra_reads(controller, driver, error):
    driver.failures["metrics"] = error
    answer = handle(controller, {"hpcs_action": "metrics"})
    assert answer["hpcs_response"] == "FAIL" and answer["hpcs_error"]
    assert answer["loadBalancers"] == []
    assert answer["utc_start"] == answer["utc_end"]  # an empty period: nothing billed
    assert len(answer["utc_end"]) == len("2026-11-26 07:01:00.250000")
    if isinstance(error, StatsUnavailable):
        assert answer["status"] == "DELETED"


def test_diagnostics_with_no_job_server_configured(controller, driver):
    answer = handle(controller, {"hpcs_action": "DIAGNOSTICS"})
    assert answer["hpcs_response"] == "PASS"
    assert (answer["network"], answer["gearman"], answer["release"]) == ("FAIL", [], RELEASE)
    assert answer["device"]["haproxy_version"] == "2.6.12"
    assert driver.calls == [("health", None)]


def test_a_device_probe_that_raises_fails_alone(driver):
    # Nothing listens on port 1 of loopback: the connect is refused at once.
    controller = LBaaSController(driver, Diagnostics((("127.0.0.1", 1),)))
    driver.failures["health"] = RuntimeError("boom")
    answer = handle(controller, {"hpcs_action": "DIAGNOSTICS"})
    assert answer["hpcs_response"] == "PASS"
    assert answer["network"] == "FAIL"
    assert answer["gearman"] == [{"host": "127.0.0.1", "port": 1, "status": "FAIL"}]
    assert answer["device"] is None


def test_an_invalid_diagnostics_still_carries_the_keys_libra_reads(driver):
    controller = LBaaSController(driver, Diagnostics((("127.0.0.1", 1),)))
    answer = controller.handle(b'{"hpcs_action": "DIAGNOSTICS", "HPCS_ACTION": "DIAGNOSTICS"}')
    assert answer["hpcs_response"] == "FAIL" and answer["badRequest"]
    assert answer["network"] == "FAIL"
    assert answer["gearman"] == [{"host": "127.0.0.1", "port": 1, "status": "FAIL"}]
    assert driver.calls == []


# ---------------------------------------------------------------------- what Libra can store

# HAProxy's own words for a rejected file, as `haproxy -c` prints them: the location names
# the (long) state_dir path, and several alerts follow the first.
HAPROXY_REJECTION = (
    "[NOTICE]   (4242) : haproxy version is 2.6.12-1+deb12u4\n"
    "[ALERT]    (4242) : config : parsing [/var/lib/libra-worker/some/deep/state/dir/"
    "haproxy.cfg.new:31] : 'server lb-http/n1' : invalid address: 'bogus' in 'bogus:80'\n"
    "[ALERT]    (4242) : config : Error(s) found in configuration file : "
    "/var/lib/libra-worker/some/deep/state/dir/haproxy.cfg.new\n"
    "[ALERT]    (4242) : config : Fatal errors found in configuration.\n"
)


def _haproxy_rejection() -> ConfigCheckFailed:
    from libra_worker.drivers.haproxy import process

    return ConfigCheckFailed(
        "HAProxy rejected the configuration: " + process._first_alert(HAPROXY_REJECTION),
        detail="HAProxy rejected the configuration: " + process._alerts(HAPROXY_REJECTION),
    )


def test_haproxy_rejection_is_short_leads_with_line_and_keyword_and_keeps_the_detail(
        controller, driver, caplog):
    driver.failures["update"] = _haproxy_rejection()
    with caplog.at_level(logging.WARNING, logger="libra_worker.controller"):
        answer = handle(controller, UPDATE)
    assert len(answer["hpcs_error"]) <= MAX_ERROR_LENGTH
    assert answer["hpcs_error"].startswith(
        "HAProxy rejected the configuration: line 31: 'server lb-http/n1' : invalid address")
    detail = answer["hpcs_error_detail"]
    assert "/var/lib/libra-worker/some/deep/state/dir/haproxy.cfg.new:31" in detail
    assert "Fatal errors found in configuration." in detail
    assert detail in caplog.text


def _long_validation_errors():
    lb = UPDATE["loadbalancers"][0]
    node = lb["nodes"][0]
    yield "hpcs_action", {"hpcs_action": "X" * 500}
    yield "loadbalancers[0].algorithm", {**UPDATE, "loadbalancers": [{**lb, "algorithm": "Y" * 300}]}
    yield "loadbalancers[0].monitor.path", {**UPDATE, "loadbalancers": [
        {**lb, "monitor": {"type": "HTTP", "delay": 5, "timeout": 5, "attempts": 2, "path": "/" + "p" * 5000}}]}
    yield "loadbalancers[0].nodes[0].address", {**UPDATE, "loadbalancers": [
        {**lb, "nodes": [{**node, "address": "a" * 400}]}]}
    yield "loadbalancers[0].nodes[1].id", {**UPDATE, "loadbalancers": [
        {**lb, "nodes": [node, {**node, "port": 81, "id": "i" * 300}]}]}
    yield "loadbalancers[0].options.client_timeout", {**UPDATE, "loadbalancers": [
        {**lb, "options": {"client_timeout": "9" * 12}}]}


@pytest.mark.parametrize("field, document", list(_long_validation_errors()),
                         ids=[field for field, _ in _long_validation_errors()])
def test_validation_errors_fit_libras_errmsg_and_name_the_field_first(controller, field, document):
    answer = handle(controller, document)
    stored = answer["badRequest"]["validationErrors"]["message"]  # what Libra stores first
    assert stored == answer["hpcs_error"]
    assert len(stored) <= MAX_ERROR_LENGTH
    assert stored.startswith(field)
    # The whole sentence (with the full value list or value prefix) is kept when cut.
    detail = answer.get("hpcs_error_detail", stored)
    assert detail.startswith(stored.removesuffix("..."))


def test_short_errors_carry_no_detail(controller, driver):
    driver.failures["update"] = ReloadFailed("HAProxy failed to start: port in use.")
    answer = handle(controller, UPDATE)
    assert answer["hpcs_error"] == "HAProxy failed to start: port in use."
    assert "hpcs_error_detail" not in answer


def test_a_sender_cannot_plant_its_own_error_detail(controller):
    answer = handle(controller, {**UPDATE, "HPCS_ERROR_DETAIL": "planted"})
    assert answer["hpcs_response"] == "PASS"
    assert "planted" not in json.dumps(answer)


def test_a_full_state_dir_is_named_within_errmsg_and_the_file_in_the_detail(controller, driver):
    temporary = "/var/lib/libra-worker/.haproxy.cfg.new.q1w2e3r4.tmp"
    driver.failures["update"] = OSError(errno.ENOSPC, "No space left on device", temporary)
    answer = handle(controller, UPDATE)
    assert answer["hpcs_error"] == (
        "UPDATE failed: No space left on device in /var/lib/libra-worker; "
        "the running load balancer was left unchanged.")
    assert temporary in answer["hpcs_error_detail"]

    deep = "/srv/" + "d" * 120 + "/.state.json.x.tmp"
    driver.failures["update"] = OSError(errno.EROFS, "Read-only file system", deep)
    answer = handle(controller, UPDATE)
    assert len(answer["hpcs_error"]) <= MAX_ERROR_LENGTH
    assert answer["hpcs_error"].startswith("UPDATE failed: Read-only file system in /srv/ddd")
    assert deep in answer["hpcs_error_detail"]


@pytest.mark.parametrize("payload", [
    b'{"hpcs_action": "METRICS", "x": NaN}',
    b'{"hpcs_action": "metrics", "hpcs_action": "METRICS"}',
])
def test_an_undecodable_metrics_still_carries_the_keys_billing_reads(controller, driver, payload):
    answer = controller.handle(payload)
    assert answer["hpcs_response"] == "FAIL" and answer["badRequest"]
    assert answer["loadBalancers"] == [] and answer["utc_start"] == answer["utc_end"]
    assert driver.calls == []


def test_a_refused_metrics_carries_libras_keys_once_whatever_the_sender_wrote(controller):
    nested_too_deep = "[" * 40 + "]" * 40
    payload = ('{"hpcs_action": "METRICS", "LoadBalancers": "sent", "deep": %s}'
               % nested_too_deep).encode()
    answer = controller.handle(payload)
    assert answer["hpcs_response"] == "FAIL" and answer["badRequest"]
    assert answer["loadBalancers"] == [] and "LoadBalancers" not in answer
