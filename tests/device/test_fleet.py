"""Fleet rollouts against a real Mosquitto with real device processes (daemon + fleet agent, fake engine), real
signed bundles (tests/shared/factories.py) and real A/B data dirs."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
import threading
from typing import Callable, Iterator

import pytest

from fieldpack.shared import fleet_protocol as fp

from fieldpack.device.fleet.pusher import FleetView, Rollout, RolloutResult
from tests.conftest import run_cli
from tests.device.fleet_harness import DeviceFleet, state_of, wait_online, wait_until
from tests.mqtt_broker import MosquittoBroker, have_mosquitto
from tests.shared.factories import Keys, make_bundle, make_keys

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto and mosquitto_passwd (apt install mosquitto)"),
]

V1, V2 = "pg-ops@1.0.0", "pg-ops@1.1.0"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    other = make_keys(d / "other-keys")
    return {
        "v1": make_bundle(d / "v1.fpk", keys, name="pg-ops", version="1.0.0", seed=1),
        "v2": make_bundle(d / "v2.fpk", keys, name="pg-ops", version="1.1.0", seed=2, model_bytes=3 << 20),
        "small": make_bundle(d / "small.fpk", keys, name="pg-ops", version="1.1.0", seed=3, model_bytes=300_000),
        "untrusted": make_bundle(d / "untrusted.fpk", other, name="pg-ops", version="1.1.0", seed=4),
        "sick": make_bundle(d / "sick.fpk", keys, name="pg-ops", version="1.1.0", seed=5,
                            recipe={"test_fail": "health"}),
    }


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def view_of(broker: MosquittoBroker) -> Iterator:
    views: list[FleetView] = []

    def make(group: str) -> FleetView:
        v = FleetView(broker.settings(), group, client_prefix="test-view")
        v.connect()
        views.append(v)
        return v

    yield make
    for v in views:
        v.close()


def _push_in_thread(rollout: Rollout, **kw: object) -> tuple[threading.Thread, list[RolloutResult | BaseException]]:
    out: list[RolloutResult | BaseException] = []

    def target() -> None:
        try:
            out.append(rollout.run(**kw))  # type: ignore[arg-type]
        except BaseException as exc:  # surfaced by the test
            out.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _result(thread: threading.Thread, out: list, timeout_s: float, fleet: DeviceFleet) -> RolloutResult:
    thread.join(timeout_s)
    assert out, f"rollout did not end in {timeout_s} s\n{fleet.logs()}"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


@contextlib.contextmanager
def _running(broker: MosquittoBroker, tmp_path: Path, keys: Keys, bundles: dict[str, Path], n: int, group: str,
             view_of: Callable[[str], FleetView], *, args: dict[str, list[str]] | None = None,
             ) -> Iterator[tuple[DeviceFleet, FleetView]]:
    """``n`` device processes with ``v1`` installed, started (with ``args`` per device) and online, and a view."""
    with DeviceFleet(broker, tmp_path, group, keys.public, bundles["v1"], n) as fleet:
        for device in fleet.ids:
            fleet.start(device, *(args or {}).get(device, []))
        view = view_of(group)
        wait_online(view, fleet.ids)
        yield fleet, view


# --- staged rollout, resume ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("size_mib,rate_mib_s,chunk_kib", [(3, 1, 32), (60, 8, 256)], ids=["3MiB", "60MiB"])
def test_three_devices_resume_after_broker_restart_and_device_kill(broker, tmp_path, keys, bundles, view_of,
                                                                   size_mib, rate_mib_s, chunk_kib) -> None:
    group = f"resume-{size_mib}"
    bundle = bundles["v2"] if size_mib == 3 else make_bundle(
        tmp_path / "big.fpk", keys, name="pg-ops", version="1.1.0", seed=9, model_bytes=size_mib << 20)
    with _running(broker, tmp_path, keys, bundles, 3, group, view_of) as (fleet, view):
        rollout = Rollout(bundle, group, broker.settings(), canary=1.0, rate=rate_mib_s << 20,
                          chunk_bytes=chunk_kib * 1024)
        thread, out = _push_in_thread(rollout)

        def done(device: str) -> int:
            s = state_of(view, device)
            return s.done if s and s.phase == "downloading" and s.target == V2 else 0

        chunks = -(-rollout.size // (chunk_kib * 1024))
        wait_until(lambda: done("dev-0") >= chunks // 4, 60, "dev-0 a quarter through")
        fleet.kill("dev-0")
        at_kill = done("dev-0")
        wait_until(lambda: done("dev-1") >= chunks // 2, 60, "dev-1 half through")
        broker.restart()
        fleet.start("dev-0")
        result = _result(thread, out, 300, fleet)

    assert result.outcome == "done", fleet.logs()
    for device in fleet.ids:
        assert result.states[device].phase == "healthy", (device, result.states[device])
        assert fleet.active_label(device) == V2
    assert max(result.sends.values()) <= 2, sorted(result.sends.items(), key=lambda kv: -kv[1])[:5]
    dev0 = sum(n for (d, _), n in result.sends.items() if d == "dev-0")
    assert dev0 < chunks + chunks // 2  # resumed from its staged chunks, not from zero
    assert at_kill >= chunks // 4
    assert not (fleet.data_dir("dev-0") / "fleet" / "staging" / rollout.sha256).exists()  # staging cleaned


# --- failures ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_canary_failing_health_check_rolls_back_and_halts_before_others_start(broker, tmp_path, keys, bundles,
                                                                               view_of) -> None:
    group = "sick"
    with _running(broker, tmp_path, keys, bundles, 3, group, view_of) as (fleet, view):
        rollout = Rollout(bundles["sick"], group, broker.settings(), canary=0.1, health_timeout_s=20)
        result = _result(*_push_in_thread(rollout), 90, fleet)
        record = view.desired
    assert result.outcome == "halted"
    canary = result.states["dev-0"]
    assert canary.phase == "rolled_back", canary
    assert "health check failed" in (canary.reason or "") and "model cannot be loaded" in (canary.reason or "")
    assert canary.active == V1
    for device in ("dev-1", "dev-2"):
        assert result.states[device].phase in ("waiting", "idle")  # idle once they see the halted record
        assert not any(d == device for d, _ in result.sends)
        assert not (fleet.data_dir(device) / "fleet" / "staging").exists()
    assert record is not None and record.state == "halted" and record.targets == ["dev-0"]
    assert all(fleet.active_label(d) == V1 for d in fleet.ids)  # nobody without a valid active bundle


@pytest.mark.slow
def test_untrusted_bundle_is_refused_before_download_and_halts(broker, tmp_path, keys, bundles, view_of) -> None:
    group = "untrusted"
    with _running(broker, tmp_path, keys, bundles, 2, group, view_of) as (fleet, view):
        result = _result(*_push_in_thread(Rollout(bundles["untrusted"], group, broker.settings(), canary=0.5)), 60,
                         fleet)
    assert result.outcome == "halted"
    assert result.states["dev-0"].phase == "refused"
    assert "signature" in (result.states["dev-0"].reason or "").lower() or "trust" in (result.states["dev-0"].reason or "")
    assert result.states["dev-1"].phase in ("waiting", "idle")
    assert not result.sends  # not one chunk went out
    assert all(fleet.active_label(d) == V1 for d in fleet.ids)


@pytest.mark.slow
def test_small_disk_refuses_before_download_others_proceed(broker, tmp_path, keys, bundles, view_of) -> None:
    group = "quota"
    with _running(broker, tmp_path, keys, bundles, 3, group, view_of,
                  args={"dev-1": ["--disk-free-bytes", str(64 * 1024)]}) as (fleet, view):
        rollout = Rollout(bundles["small"], group, broker.settings(), canary=1.0, max_failures=0.5)
        result = _result(*_push_in_thread(rollout), 60, fleet)
    assert result.outcome == "done"
    refused = result.states["dev-1"]
    assert refused.phase == "refused" and "not enough disk" in (refused.reason or ""), refused
    assert refused.fetched == 0 and not any(d == "dev-1" for d, _ in result.sends)
    assert fleet.active_label("dev-1") == V1
    assert [result.states[d].phase for d in ("dev-0", "dev-2")] == ["healthy", "healthy"]
    assert fleet.active_label("dev-0") == fleet.active_label("dev-2") == V2


def test_corrupted_chunk_is_fetched_again_and_chunks_fit_the_broker_packet_limit(tmp_path, keys, bundles) -> None:
    group = "corrupt"
    with MosquittoBroker(tmp_path / "mq", extra_config="max_packet_size 65536\n") as small_broker:
        with DeviceFleet(small_broker, tmp_path, group, keys.public, bundles["v1"], 1) as fleet:
            fleet.start_all()
            view = FleetView(small_broker.settings(), group)
            view.connect()
            try:
                wait_online(view, fleet.ids)
                flipped: list[int] = []

                class FlippingRollout(Rollout):
                    """Flips one byte of chunk 3's data the first time it goes out (damage in transit)."""

                    def frame(self, device: str, index: int, data: bytes) -> bytes:
                        frame = super().frame(device, index, data)
                        if index == 3 and not flipped:
                            flipped.append(index)
                            return frame[:-10] + bytes([frame[-10] ^ 0x01]) + frame[-9:]
                        return frame

                rollout = FlippingRollout(bundles["small"], group, small_broker.settings(), canary=1.0)
                result = _result(*_push_in_thread(rollout), 60, fleet)
                record = view.desired
            finally:
                view.close()
    assert result.outcome == "done" and result.states["dev-0"].phase == "healthy"
    assert fleet.active_label("dev-0") == V2
    assert record is not None and record.chunk_size == 65536 // fp.CHUNK_PACKET_FRACTION
    assert flipped == [3] and result.sends[("dev-0", 3)] == 2
    assert result.states["dev-0"].fetched == record.chunks + 1


# --- CLI: push, status, abort --------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_push_status_abort(broker, tmp_path, keys, bundles, view_of) -> None:
    group = "cli"
    login = ["--broker", broker.url(), "--username", broker.username, "--password-file", str(broker.password_file)]
    with _running(broker, tmp_path, keys, bundles, 2, group, view_of) as (fleet, view):
        r = run_cli("fleet", "push", str(bundles["small"]), *login, "--group", group, "--canary", "50%",
                    "--rate", "4MiB/s", timeout=120)
        assert r.returncode == 0, r.stderr + fleet.logs()
        r = run_cli("fleet", "status", *login, "--group", group, "--json", timeout=60)
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        assert status["desired"]["label"] == V2 and status["desired"]["state"] == "done"
        assert {d["device"]: (d["phase"], d["active"]) for d in status["devices"]} == {
            "dev-0": ("healthy", V2), "dev-1": ("healthy", V2)}
        r = run_cli("fleet", "status", *login, "--group", group, timeout=60)
        assert r.returncode == 0 and "dev-1" in r.stdout and "healthy" in r.stdout
        # a finished rollout is not relabelled "aborted" (a trial's abort of a done rollout said "aborted")
        r = run_cli("fleet", "abort", *login, "--group", group, timeout=60)
        assert r.returncode == 0 and "nothing to abort" in r.stdout and "already done" in r.stdout, r.stdout
        assert view.desired is not None and view.desired.state == "done"
        # an option that takes a share names itself, and a bare 10 suggests 10%
        r = run_cli("fleet", "push", str(bundles["small"]), *login, "--group", group, "--canary", "10", timeout=60)
        assert r.returncode == 2 and "--canary '10'" in r.stderr and "--canary 10%" in r.stderr, r.stderr
        r = run_cli("fleet", "push", str(bundles["small"]), *login, "--group", group, "--health-timeout", "-5",
                    timeout=60)
        assert r.returncode == 2 and "--health-timeout" in r.stderr, r.stderr
    r = run_cli("fleet", "abort", *login, "--group", "nobody-here", timeout=60)
    assert r.returncode == 2 and "no rollout" in r.stderr


# --- serving during a rollout, HTTP source, a 60 MiB bundle --------------------------------------------------
@pytest.mark.slow
def test_request_being_answered_finishes_on_the_old_bundle(broker, tmp_path, keys, bundles, view_of) -> None:
    from fieldpack.device.mqtt import Requester

    group = "busy"
    with _running(broker, tmp_path, keys, bundles, 1, group, view_of,
                  args={"dev-0": ["--answer-delay", "0.4"]}) as (fleet, view):
        with Requester(broker.settings()) as asker:
            pending = asker.submit("How do I reset pump 3?", device="dev-0")
            wait_until(lambda: len(pending.partials) >= 1, 20, "the answer to start")
            result = _result(*_push_in_thread(Rollout(bundles["small"], group, broker.settings(), canary=1.0)), 60,
                             fleet)
            final = pending.wait(30)
    assert final is not None and final.ok and final.bundle == V1  # finished on the bundle it started with
    assert result.states["dev-0"].phase == "healthy" and fleet.active_label("dev-0") == V2


@pytest.mark.slow
def test_http_url_is_used_when_reachable_else_mqtt(broker, tmp_path, keys, bundles, view_of) -> None:
    import functools
    import http.server

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(bundles["small"].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for group, url, over_mqtt in (("http-ok", f"{base}/{bundles['small'].name}", False),
                                      ("http-404", f"{base}/missing.fpk", True)):
            with DeviceFleet(broker, tmp_path / group, group, keys.public, bundles["v1"], 2) as fleet:
                fleet.start_all()
                view = view_of(group)
                wait_online(view, fleet.ids)
                result = _result(*_push_in_thread(Rollout(bundles["small"], group, broker.settings(), canary=1.0,
                                                          url=url)), 60, fleet)
            assert result.outcome == "done", fleet.logs()
            assert all(fleet.active_label(d) == V2 for d in fleet.ids)
            assert bool(result.sends) == over_mqtt, (group, len(result.sends))
    finally:
        server.shutdown()


@pytest.mark.slow
def test_sixty_mib_bundle_reaches_three_devices_once_per_chunk(broker, tmp_path, keys, view_of) -> None:
    group = "big"
    big = make_bundle(tmp_path / "big.fpk", keys, name="pg-ops", version="1.1.0", seed=9, model_bytes=60 << 20)
    v1 = make_bundle(tmp_path / "v1.fpk", keys, name="pg-ops", version="1.0.0", seed=1)
    with DeviceFleet(broker, tmp_path, group, keys.public, v1, 3) as fleet:
        fleet.start_all()
        view = view_of(group)
        wait_online(view, fleet.ids)
        rollout = Rollout(big, group, broker.settings(), canary=0.34)
        result = _result(*_push_in_thread(rollout), 300, fleet)
    assert result.outcome == "done", fleet.logs()
    assert all(result.states[d].phase == "healthy" and fleet.active_label(d) == V2 for d in fleet.ids)
    chunks = -(-rollout.size // fp.DEFAULT_CHUNK_BYTES)
    assert rollout.size > 60 << 20 and len(result.sends) == 3 * chunks
    assert max(result.sends.values()) <= 2


@pytest.mark.slow
def test_abort_mid_download_stops_devices_which_keep_what_they_run(broker, tmp_path, keys, bundles, view_of) -> None:
    from fieldpack.device.fleet.pusher import abort_rollout

    group = "abort"
    with _running(broker, tmp_path, keys, bundles, 2, group, view_of) as (fleet, view):
        wait_until(lambda: all((s := state_of(view, d)) is not None and s.phase == "idle" and s.active == V1
                               and s.ts > 0 for d in fleet.ids), 15, "idle devices say what they run")
        rollout = Rollout(bundles["v2"], group, broker.settings(), canary=1.0, rate=256 * 1024,
                          chunk_bytes=32 * 1024)
        thread, out = _push_in_thread(rollout)
        wait_until(lambda: (s := state_of(view, "dev-0")) is not None and s.phase == "downloading" and s.done >= 4,
                   30, "dev-0 downloading")
        record, aborted = abort_rollout(broker.settings(), group)
        result = _result(thread, out, 30, fleet)
        wait_until(lambda: all((s := state_of(view, d)) is not None and s.phase == "idle" for d in fleet.ids), 15,
                   "devices idle")
        states = {d: state_of(view, d) for d in fleet.ids}
    assert aborted and record.state == "aborted" and result.outcome == "aborted"
    for device, s in states.items():
        assert s is not None and s.reason == "rollout aborted" and s.active == V1, s
        assert fleet.active_label(device) == V1
    staged = fleet.data_dir("dev-0") / "fleet" / "staging" / rollout.sha256 / "chunks.log"
    assert staged.is_file() and staged.read_text().strip()  # kept: a later push of this bundle resumes


# --- a trial's operator findings: stale reports, downgrades, a second pusher ----------------------------------
@pytest.mark.slow
def test_a_repush_waits_for_this_rollouts_reports_after_a_local_rollback(broker, tmp_path, keys, bundles,
                                                                        view_of) -> None:
    """A trial rolled one device back by hand (`fieldpack rollback`) and pushed the same bundle again: the push said
    `done, 0.0 MiB sent in 0.5 s` from the devices' old `healthy` reports and exited, leaving that device waiting
    for chunks nobody served; `fleet status` meanwhile showed the rolled-back device on the new version."""
    group = "repush"
    login = ["--broker", broker.url(), "--username", broker.username, "--password-file", str(broker.password_file)]
    with _running(broker, tmp_path, keys, bundles, 2, group, view_of) as (fleet, view):
        first = _result(*_push_in_thread(Rollout(bundles["small"], group, broker.settings(), canary=1.0)), 60, fleet)
        assert first.outcome == "done" and all(fleet.active_label(d) == V2 for d in fleet.ids), fleet.logs()
        r = run_cli("rollback", "--data-dir", str(fleet.data_dir("dev-1")), timeout=60)
        assert r.returncode == 0 and fleet.active_label("dev-1") == V1, r.stderr
        wait_until(lambda: "dev-1" in view.statuses and view.statuses["dev-1"].bundle == V1, 20,
                   "dev-1's status says it runs v1 again")
        r = run_cli("fleet", "status", *login, "--group", group, "--json", timeout=60)
        active = {d["device"]: d["active"] for d in json.loads(r.stdout)["devices"]}
        assert active == {"dev-0": V2, "dev-1": V1}, active  # the daemon's own status, not the old rollout state
        second = Rollout(bundles["small"], group, broker.settings(), canary=1.0)
        result = _result(*_push_in_thread(second), 60, fleet)
    assert result.outcome == "done", fleet.logs()
    assert all(s.rollout == second.rollout_id and s.phase == "healthy" for s in result.states.values())
    assert fleet.active_label("dev-1") == V2  # really updated again
    assert {d for d, _ in result.sends} == {"dev-1"}  # dev-0 already ran it: no chunk for it


@pytest.mark.slow
def test_a_retry_after_a_failed_health_check_is_a_new_rollout(broker, tmp_path, keys, bundles, view_of) -> None:
    """A trial's retry right after a canary's failed health check halted at once, quoting the previous rollout's
    `rolled_back`: the new push must be judged on its own reports."""
    group = "retry"
    with _running(broker, tmp_path, keys, bundles, 1, group, view_of) as (fleet, view):
        first = _result(*_push_in_thread(Rollout(bundles["sick"], group, broker.settings(), canary=1.0,
                                                 health_timeout_s=20)), 90, fleet)
        assert first.outcome == "halted" and first.states["dev-0"].phase == "rolled_back"
        retry = Rollout(bundles["sick"], group, broker.settings(), canary=1.0, health_timeout_s=20)
        result = _result(*_push_in_thread(retry), 90, fleet)
    s = result.states["dev-0"]
    assert result.outcome == "halted" and s.rollout == retry.rollout_id and s.phase == "rolled_back", s
    assert result.sends  # it really tried again (the health check is what fails, again)


@pytest.mark.slow
def test_an_older_bundle_is_refused_before_the_first_chunk(broker, tmp_path, keys, bundles, view_of) -> None:
    """A trial's push of an older version sent 531 MiB to the canaries, which then refused it as a downgrade."""
    from fieldpack.shared.errors import DowngradeError

    group = "older"
    older = make_bundle(tmp_path / "v0.fpk", keys, name="pg-ops", version="0.9.0", seed=6)
    with _running(broker, tmp_path, keys, bundles, 2, group, view_of) as (fleet, view):
        rollout = Rollout(older, group, broker.settings(), canary=1.0)
        with pytest.raises(DowngradeError, match=r"pg-ops@0\.9\.0 would be refused by 2 of 2 devices .*dev-0 runs "
                                                 r"pg-ops@1\.0\.0") as e:
            rollout.run()
        assert "higher --version" in e.value.hint
        assert view.desired is None and not rollout.sends  # no record published, no chunk sent


@pytest.mark.slow
def test_a_second_push_to_the_group_supersedes_the_first(broker, tmp_path, keys, bundles, view_of) -> None:
    """A trial's second operator pushed while a push ran: the first pusher ran on silently for its wave timeout
    and would have published its final record over the second one's."""
    group = "two-pushers"
    with _running(broker, tmp_path, keys, bundles, 2, group, view_of) as (fleet, view):
        slow = Rollout(bundles["v2"], group, broker.settings(), canary=1.0, rate=256 * 1024, chunk_bytes=32 * 1024)
        thread, out = _push_in_thread(slow)
        wait_until(lambda: (s := state_of(view, "dev-0")) is not None and s.phase == "downloading" and s.done >= 2,
                   30, "dev-0 downloading")
        other = Rollout(bundles["small"], group, broker.settings(), canary=1.0)
        t2, out2 = _push_in_thread(other)
        first = _result(thread, out, 30, fleet)
        second = _result(t2, out2, 60, fleet)
        wait_until(lambda: view.desired is not None and view.desired.state == "done", 10, "the second's final record")
        record = view.desired
    assert first.outcome == "superseded" and slow.superseded_by is not None
    assert slow.superseded_by.rollout == other.rollout_id
    assert second.outcome == "done" and all(fleet.active_label(d) == V2 for d in fleet.ids), fleet.logs()
    assert record is not None and record.rollout == other.rollout_id  # the first did not write over it
