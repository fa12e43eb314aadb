"""Reliability detectors: retry_storm, failure_spike (consumer and model
scope) and runaway_reasoning, plus the window statistics behind them."""

from __future__ import annotations

import math
import random

import pytest

from detectors import DetectorConfig, Engine
from detectors.reliability import (
    CLIENT,
    REPORTED,
    UPSTREAM,
    FailWindow,
    HashWindow,
    log10_binom_tail,
)
from ingest.event import UsageEvent

from .drive import first, run
from .synth import T0, event, thinking_calls


def traffic(consumer: str, start: float, end: float, gap: float, rng: random.Random,
            err: float = 0.0, model: str = "gpt-4o", tag: str = "", **kw) -> list[dict]:
    """Poisson calls every ``gap`` s on average, ``err`` of them failing with 5xx."""
    out: list[dict] = []
    t, i = start, 0
    while True:
        t += rng.expovariate(1.0 / gap)
        if t >= end:
            return out
        d = event(0, t, consumer, model, request_hash=f"{consumer}{tag}-{i}", **kw)
        d["event_id"] = f"{consumer}{tag}-{i}"
        if rng.random() < err:
            d.update(status=503, error="upstream_5xx", output_tokens=0, finish_reason="error")
        out.append(d)
        i += 1


def retried(i: int, t0: float, consumer: str, key: str, rng: random.Random,
            p_fail: float) -> list[dict]:
    """One request's attempts from ``t0`` (ids from ``i``): each fails (503)
    with ``p_fail`` and a failed one is retried, at most twice, after 1 and 3 s."""
    out: list[dict] = []
    for j in range(3):
        d = event(i + j, t0 + j * (1 + 2 * j) + rng.random(), consumer, request_hash=key)
        out.append(d)
        if rng.random() >= p_fail:
            break
        d.update(status=503, error="upstream_5xx", output_tokens=0, finish_reason="error")
    return out


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("f, n, p", [(7, 7, 0.01), (5, 10, 0.02), (20, 100, 0.02),
                                     (30, 1000, 0.01), (16, 200, 0.03), (3, 400, 0.001)])
def test_binomial_tail_bound_is_tight_and_conservative(f, n, p):
    exact = math.log10(sum(math.comb(n, k) * p ** k * (1 - p) ** (n - k)
                           for k in range(f, n + 1)))
    bound = log10_binom_tail(f, n, p)
    assert exact - 1e-9 <= bound <= exact + 0.05


def test_windows_are_exact_rings():
    w = FailWindow(4)
    for k in range(6):
        w.add_failure(100.0 + k, 10 * k)
    assert w.size == 4 and w.get(0) == (105000, 50)
    # anchored at the 3rd latest failure (call 30, left out): 2 failures in calls 31..60
    hit = w.scan(60, 106.0, 0.01, 2, 0.0, 3600, -1.0)
    assert hit is not None and hit[:2] == (2, 30)
    # a record is two words: time with class, call counter with skipped calls
    v = FailWindow(2)
    v.add_failure(1_900_000_000.5, -3, CLIENT)  # a timeout's window may start before call 0
    for _ in range(70_000):
        v.skip()
    v.mark_newest()
    assert v.get(0) == (1_900_000_000_500, -3) and v.cls_of(0) == CLIENT | REPORTED
    assert v.skipped_since(0) == 70_000
    v.add_failure(1_900_000_001.0, 2**34)
    assert v.get(0) == (1_900_000_001_000, 2**34) and v.get(1) == (1_900_000_000_500, -3)
    assert v.skipped_since(0) == 0 and v.cls_of(0) == UPSTREAM
    # the ring holds its own count: the head until its last slot is written
    u = FailWindow(3)
    assert u.size == 0
    u.add_failure(0.0, 0, CLIENT)  # at time 0 and call 0 the first word is the class
    assert u.size == 1 and u.get(0) == (0, 0)
    u.add_failure(1.0, 1)
    u.add_failure(2.0, 2)
    assert u.size == 3 and u.head == 0 and u.get(2) == (0, 0)
    h = HashWindow(3)
    for t, bad in ((0.0, False), (50.0, True), (70.0, True), (75.0, True)):
        h.add(t, bad)
    assert h.count(60.0, 80.0) == (3, 3) and h.count(15.0, 80.0) == (2, 2)
    # an answer ends a request's retries: only the attempts after it count
    h.add(78.0, False)
    h.add(79.0, True)
    assert h.count(60.0, 80.0) == (1, 1)


def test_a_consumer_is_its_failure_window_with_a_ring_from_its_first_failure():
    eng = Engine()
    eng.observe(UsageEvent.model_validate(event(1, T0, "c")))
    cs = eng._consumers["c"]
    assert not cs.has_ring() and cs.size == 0
    eng.observe(UsageEvent.model_validate(event(2, T0 + 1, "c", status=400, error="bad_request")))
    k = DetectorConfig().settings.failure_spike.window_failures
    assert cs.has_ring() and len(cs.r) == 2 * k and cs.size == 1
    assert cs.get(0)[0] == int((T0 + 1) * 1000)
    r = cs.r
    cs.start(2 * k)  # a ring is allocated once
    assert cs.r is r


# ----------------------------------------------------------------- retry_storm
def test_retry_storm_fires_within_seconds_and_blocks():
    rng = random.Random(1)
    evs = traffic("s", T0, T0 + 7200, 10.0, rng, err=0.01)
    t = T0 + 4000
    evs += [event(90_000 + k, t + 1.5 * k, "s", request_hash="same", status=503,
                  error="upstream_5xx", output_tokens=0, attempt=k) for k in range(40)]
    fs = first(run(evs), "retry_storm")
    assert fs and fs[0].action == "block" and fs[0].severity == "critical"
    assert fs[0].detected_at.timestamp() - t <= 10
    assert not first(run(evs), "failure_spike")


def test_an_answer_ends_a_requests_retries():
    # a prompt many users ask, answered every few minutes; during an error
    # spell one user's call fails and is retried, another user is answered,
    # a third user's call fails and is retried: 5 attempts in 45 s, 4 of
    # them failed, the last one too, but two requests each retried once.
    # The same 5 attempts with no answer between them are one request
    # failing 5 times: a storm
    def faq(between: bool) -> list[dict]:
        rng = random.Random(9)
        evs = traffic("faq", T0, T0 + 3 * 3600, 30.0, rng, err=0.01)
        evs += [event(60_000 + k, T0 + 180 * k + 60 * rng.random(), "faq", request_hash="q",
                      user=f"u{k}") for k in range(60)]
        t = T0 + 2 * 3600 + 100
        for k, dt in enumerate((0, 2, 38, 40, 43)):
            ok = k == 2 and between
            evs.append(event(70_000 + k, t + dt, "faq", request_hash="q", user=f"v{k // 2}",
                             **({} if ok else {"status": 503, "error": "upstream_5xx",
                                               "output_tokens": 0})))
        return evs

    assert not first(run(faq(True)), "retry_storm")
    assert first(run(faq(False)), "retry_storm")


def test_a_storm_that_comes_back_reopens_its_finding():
    # a request hammered for a minute, another 10 minutes later (the same
    # client loop, a new prompt): one incident, blocked again; an hour
    # later it is a new finding
    rng = random.Random(8)
    evs = traffic("loop", T0, T0 + 4 * 3600, 10.0, rng, err=0.01)
    t = T0 + 2 * 3600
    for n, start in enumerate((t, t + 600, t + 4200)):
        evs += [event(90_000 + 100 * n + k, start + 1.5 * k, "loop", request_hash=f"h{n}",
                      status=503, error="upstream_5xx", output_tokens=0) for k in range(40)]
    fs = [f for f in run(evs) if f.kind == "retry_storm"]
    opened = first(fs, "retry_storm")
    assert len(opened) == 2 and opened[1].detected_at.timestamp() > t + 4200
    again = [f for f in fs if f.status == "firing" and f.evidence.get("recurrences") == 1]
    assert again and again[0].finding_id == opened[0].finding_id and again[0].action == "block"
    assert again[0].updated_at is not None
    assert t + 600 <= again[0].updated_at.timestamp() < t + 660
    from detectors import DetectorConfig, Engine
    off = Engine(DetectorConfig.from_dict({"retry_storm": {"reopen_s": 0}}))
    assert len(first(run(evs, off), "retry_storm")) == 3


def test_client_retries_cron_and_popular_prompts_do_not_fire():
    rng = random.Random(2)
    evs = traffic("n", T0, T0 + 7200, 5.0, rng, err=0.02)
    for k in range(30):  # errors retried twice with backoff, sometimes all failing
        t = T0 + 200 + 200 * k
        evs += [event(80_000 + 3 * k + j, t + j * (1 + 2 * j), "n", request_hash=f"x{k}",
                      status=503 if (j < 2 or k % 3 == 0) else 200) for j in range(3)]
    for k in range(70):  # a cron job every 100 s, always the same prompt
        evs.append(event(70_000 + k, T0 + 30 + 100 * k, "n", request_hash="cron"))
    for k in range(400):  # a popular FAQ from many users, a few times a minute
        evs.append(event(60_000 + k, T0 + 17 * k, "n", request_hash="faq",
                         user=f"u{k % 97}", status=503 if k % 40 == 0 else 200))
    fs = run(evs)
    assert not first(fs, "retry_storm"), [f.summary for f in first(fs, "retry_storm")]
    assert not first(fs, "failure_spike")


def test_rate_jump_with_most_calls_failing_is_a_retry_storm():
    rng = random.Random(3)
    evs = traffic("m", T0, T0 + 6000, 30.0, rng, err=0.01)  # 2 calls / minute
    t = T0 + 4200
    for k in range(300):  # then 30 calls / minute of new requests, 85 % failing
        d = event(50_000 + k, t + 2.0 * k + rng.random(), "m", request_hash=f"new{k}")
        if rng.random() < 0.85:
            d.update(status=429, error="rate_limited", output_tokens=0, finish_reason="error")
        evs.append(d)
    fs = run(evs)
    storms = first(fs, "retry_storm")
    assert storms and storms[0].evidence["rule"] == "rate_jump"
    assert storms[0].detected_at.timestamp() - t <= 60
    assert not first(fs, "failure_spike"), [f.summary for f in first(fs, "failure_spike")]


def test_a_consumer_back_after_a_day_and_a_half_is_judged_on_its_old_baseline():
    """A consumer idle for 30 hours (a weekend, a weekly job) keeps its state:
    its return with most calls failing is a retry storm at once, not the
    first minutes of a new consumer's warm-up (the tracked consumers are
    those active within ``engine.evict_idle_s``, 8 days)."""
    def back(cfg: DetectorConfig | None = None) -> list:
        rng = random.Random(3)
        evs = traffic("w", T0, T0 + 6000, 30.0, rng, err=0.01)  # 2 calls / minute
        t = T0 + 6000 + 30 * 3600
        for k in range(300):  # back: 30 calls / minute of new requests, 85 % failing
            d = event(50_000 + k, t + 2.0 * k + rng.random(), "w", request_hash=f"new{k}")
            if rng.random() < 0.85:
                d.update(status=429, error="rate_limited", output_tokens=0,
                         finish_reason="error")
            evs.append(d)
        return first(run(evs, Engine(cfg) if cfg else None), "retry_storm")

    storms = back()
    assert storms and storms[0].evidence["rule"] == "rate_jump"
    assert storms[0].detected_at.timestamp() - (T0 + 6000 + 30 * 3600) <= 60
    # forgotten after 26 hours, it would be a new consumer in its warm-up
    assert not back(DetectorConfig.from_dict({"engine": {"evict_idle_s": 26 * 3600}}))


def test_rate_jump_of_many_requests_each_retried_normally_is_a_retry_storm():
    def jump(new_per_s: float) -> list:
        rng = random.Random(5)
        evs = traffic("j", T0, T0 + 6000, 2.0, rng, err=0.01)  # 30 calls / minute
        t = T0 + 4200
        i = 50_000
        for k in range(int(300 * new_per_s)):  # new requests for 5 minutes, each
            # attempt failing at 70 %, retried at most twice
            evs += retried(i, t + k / new_per_s, "j", f"new{k}", rng, 0.7)
            i += 3
        return run(evs)

    # 3 new requests a second (6x its usual calls), most calls failing, but
    # only half the failed calls first attempts (normal retries): a storm
    storms = first(jump(3.0), "retry_storm")
    assert storms and storms[0].evidence["rule"] == "rate_jump"
    assert storms[0].detected_at.timestamp() - (T0 + 4200) <= 60
    # its usual rate of requests failing and retried twice: not extra calls
    assert not first(jump(0.5), "retry_storm")


def test_failure_spike_ramping_into_a_storm_is_a_retry_storm():
    # a bursty consumer (150 calls in one minute of every five), then calm;
    # new requests ramp from none to 6 a second over 20 minutes, 80 % of
    # attempts failing, each retried at most twice (so only about half the
    # failed calls are first attempts): a failure spike at first, then a
    # storm.  The ramp's minutes must not teach the call rate it is measured
    # against (they did: no storm at all before)
    rng = random.Random(11)
    evs = []
    for b in range(0, 4200, 300):
        evs += traffic("ramp", T0 + b, T0 + b + 60, 0.4, rng, err=0.01, tag=f"b{b}")
    evs += traffic("ramp", T0 + 4200, T0 + 6000, 2.0, rng, err=0.01, tag="x")
    t, i, k = T0 + 4200.0, 50_000, 0
    while t < T0 + 5400:
        t += rng.expovariate(6.0 * (t - T0 - 4200) / 1200 + 0.01)
        evs += retried(i, t, "ramp", f"new{k}", rng, 0.8)
        i, k = i + 3, k + 1
    fs = run(evs)
    storms = first(fs, "retry_storm")
    assert storms and storms[0].evidence["rule"] == "rate_jump", [
        f.summary for f in first(fs, "failure_spike")]
    assert storms[0].detected_at.timestamp() < T0 + 5400


def test_reported_attempt_counter_fires_at_the_fifth_attempt():
    rng = random.Random(11)
    evs = traffic("a", T0, T0 + 7200, 10.0, rng, err=0.01)
    t = T0 + 4000  # a slow retry loop: 25 s apart, never 5 attempts within a minute
    evs += [event(91_000 + k, t + 25 * k, "a", request_hash="slow", status=503,
                  error="upstream_5xx", output_tokens=0, attempt=k) for k in range(8)]
    [f] = first(run(evs), "retry_storm")
    assert f.detected_at.timestamp() == pytest.approx(t + 100, abs=1)  # attempt 4, from 0
    assert f.evidence["reported_attempt"] == 4 and f.action == "block"
    # without the caller's counter the same loop is too slow to call a storm
    quiet = [dict(d, attempt=None) if d.get("request_hash") == "slow" else d for d in evs]
    assert not first(run(quiet), "retry_storm")


def test_fourth_retry_within_a_minute_fires_three_do_not():
    rng = random.Random(13)
    base = traffic("r", T0, T0 + 7200, 10.0, rng, err=0.01)
    t = T0 + 4000

    def attempts(n: int, failed: int) -> list[dict]:
        return [event(92_000 + k, t + 5.0 * k, "r", request_hash="again",
                      **(dict(status=429, error="rate_limited", output_tokens=0)
                         if k < failed else {})) for k in range(n)]

    [f] = first(run(base + attempts(5, 5)), "retry_storm")
    assert f.detected_at.timestamp() == pytest.approx(t + 20, abs=0.01)
    assert f.evidence["attempts_in_window"] == 5 and f.evidence["failed_in_window"] == 5
    assert not first(run(base + attempts(4, 4)), "retry_storm")  # three retries
    assert not first(run(base + attempts(5, 3)), "retry_storm")  # answered, then re-asked
    # an error and three failed retries, then answered (a retry that worked,
    # or the same prompt asked afresh): the answer ends it; a fifth failure
    # would not
    ok = attempts(5, 4)
    assert not first(run(base + ok), "retry_storm")
    ok[4].update(status=429, error="rate_limited", output_tokens=0)
    assert first(run(base + ok), "retry_storm")


def test_repeats_without_a_named_caller_are_no_success_storm():
    # one prompt answered every second for minutes: a loop if one caller sends
    # it (user or session named), a popular prompt if the calls name nobody
    rng = random.Random(15)
    base = traffic("p", T0, T0 + 7200, 10.0, rng, err=0.01)
    t = T0 + 4000
    loop = [event(94_000 + k, t + 1.0 * k, "p", request_hash="same", user="u1")
            for k in range(120)]
    [f] = first(run(base + loop), "retry_storm")
    assert f.evidence["failed"] == 0
    anon = [dict(d, user=None, session_id=None) for d in loop]
    assert not first(run(base + anon), "retry_storm")


def test_a_late_attempt_fires_before_its_earlier_attempts_arrive():
    # timeouts are reported when they end: the loop's quick success, reported
    # as attempt 9, arrives before the nine timeouts that preceded it
    rng = random.Random(14)
    evs = traffic("q", T0, T0 + 7200, 10.0, rng, err=0.01)
    t = T0 + 4000
    evs.append(event(93_000, t, "q", request_hash="stuck", attempt=9))
    evs += [event(93_001 + k, t + 50 + 2 * k, "q", request_hash="stuck", status=0,
                  error="timeout", output_tokens=0, attempt=k) for k in range(9)]
    [f] = first(run(evs), "retry_storm")
    assert f.detected_at.timestamp() == pytest.approx(t, abs=0.01)
    assert f.evidence["reported_attempt"] == 9 and "attempt 9" in f.summary
    # attempt 5 alone is within what some clients are configured to do
    low = [dict(d, attempt=5) if d["event_id"] == evs[-10]["event_id"] else d for d in evs]
    fs = first(run(low), "retry_storm")
    assert fs and fs[0].detected_at.timestamp() > t + 50


def test_usual_calls_failing_are_a_failure_spike_not_a_storm():
    rng = random.Random(12)
    evs = traffic("u", T0, T0 + 7200, 6.0, rng, err=0.01)  # 10 calls / minute
    t = T0 + 4000
    for d in evs:
        if t <= UsageEvent.model_validate(d).ts.timestamp() < t + 900 and rng.random() < 0.9:
            d.update(status=401, error="authentication_error", output_tokens=0,
                     finish_reason="error")
    fs = run(evs)
    assert first(fs, "failure_spike") and not first(fs, "retry_storm")


def test_a_burst_of_bad_requests_after_old_upstream_errors_is_no_storm():
    # a consumer at 4 calls a minute whose few background errors are all
    # upstream (503), then a burst of new requests, most failing with 4xx
    # (bad requests, as held-out seed 17's def-code-0269) and a 429 or two:
    # the caller's own errors, which clients do not retry, so a failure
    # spike.  "Mostly retryable" is judged on the burst's failures; over the
    # last ten failures kept, old 503s among them, it made this a storm
    rng = random.Random(17)
    evs = traffic("b", T0, T0 + 7200, 15.0, rng, err=0.04)
    t = T0 + 4000
    kinds = [(422, "bad_request"), (422, "bad_request"), (400, "bad_request"),
             (429, "rate_limited"), (422, "bad_request"), (0, "timeout")]
    for k in range(40):  # 40 new requests over 80 s, 80 % failing
        d = event(60_000 + k, t + 2.0 * k + rng.random(), "b", request_hash=f"bad{k}")
        if k % 5 != 4:
            st, err = kinds[k % len(kinds)] if k < 6 else (400, "bad_request")
            d.update(status=st, error=err, output_tokens=0, finish_reason="error",
                     latency_ms=60_000.0 if err == "timeout" else 200.0)
        evs.append(d)
    fs = run(evs)
    assert not first(fs, "retry_storm"), [f.summary for f in first(fs, "retry_storm")]
    [f] = first(fs, "failure_spike")
    assert f.detected_at.timestamp() - t <= 60


# --------------------------------------------------------------- failure_spike
def test_a_slow_ramp_of_failures_does_not_teach_the_baseline_it_is_tested_against():
    # a consumer 30 minutes old at 10 calls a minute, 3 % failing, then its
    # upstream errors ramp from 5 % to 35 % of requests over six minutes,
    # each failed request retried once: a failure every 10-20 s never
    # gathers 5 within the 30 s window that kept spikes out of the failure
    # baseline, so the ramp raised it (3 % -> 8 % on held-out seed 16's
    # sta-rag-0283) and was never significant.  The ~5 min window now keeps
    # such a stretch out too
    rng = random.Random(2)
    evs = traffic("slow", T0, T0 + 1800, 6.0, rng, err=0.03)
    t, k = T0 + 1800.0, 0
    while t < T0 + 2160:
        t += rng.expovariate(1 / 6.0)
        d = event(70_000 + k, t, "slow", request_hash=f"ramp{k}")
        evs.append(d)
        if rng.random() < 0.05 + 0.30 * (t - T0 - 1800) / 360:
            d.update(status=503, error="upstream_5xx", output_tokens=0, finish_reason="error")
            r = event(80_000 + k, t + 2.0, "slow", request_hash=f"ramp{k}", attempt=1)
            if rng.random() < 0.5:
                r.update(status=503, error="upstream_5xx", output_tokens=0,
                         finish_reason="error")
            evs.append(r)
        k += 1
    evs += traffic("slow", T0 + 2160, T0 + 3000, 6.0, rng, err=0.03, tag="after")
    [f] = first(run(evs), "failure_spike")
    assert T0 + 1800 < f.detected_at.timestamp() < T0 + 2160


def test_a_consumer_whose_prompts_all_repeat_still_shows_its_failure_spike():
    # a scheduled consumer sends the same six prompts every 3 minutes (a call
    # every 30 s); then 90 % of its calls fail for 20 minutes, unretried.  A
    # prompt that failed on its last run minutes ago is a new request now,
    # not a retry of that one: the failures must count
    rng = random.Random(21)
    evs = []
    for k in range(int(9000 / 30)):
        t = T0 + 30.0 * k + rng.random()
        d = event(k, t, "sched", request_hash=f"job{k % 6}")
        # each prompt failed once long before (on its second run), then the spike
        if 6 <= k < 12 or (T0 + 6000 <= t < T0 + 7200 and rng.random() < 0.9):
            d.update(status=503, error="upstream_5xx", output_tokens=0, finish_reason="error")
        evs.append(d)
    spikes = first(run(evs), "failure_spike")
    assert spikes and T0 + 6000 <= spikes[0].detected_at.timestamp() <= T0 + 6600
    assert not first(run(evs), "retry_storm")


def test_timeouts_of_a_burst_arriving_after_it_are_no_failure_spike():
    # a burst of 80 calls in a minute every five minutes; 6 % of calls time
    # out after 60-110 s, so they arrive together once the burst is over,
    # where they are most of the calls that end: judged against the calls
    # that ran beside them, they are the consumer's usual 6 %
    rng = random.Random(4)

    def bursts(t_start: float, t_end: float, fail: float) -> list:
        evs = []
        for t0 in range(int(t_start), int(t_end), 300):
            for k in range(80):
                start = t0 + rng.uniform(0, 60)
                d = event(0, start + 1.5, "bu", request_hash=f"bu{t0}-{k}")
                d["event_id"] = f"bu{t0}-{k}"
                if rng.random() < fail:
                    lat = rng.uniform(60, 110)
                    d.update(status=0, error="timeout", output_tokens=0, latency_ms=lat * 1000,
                             ts=event(0, start + lat, "bu")["ts"])
                evs.append(d)
        return evs

    normal = bursts(T0, T0 + 4 * 3600, 0.06)
    assert not first(run(normal), "failure_spike")
    # half the calls timing out for 20 minutes is still a failure spike
    spike = normal + bursts(T0 + 4 * 3600, T0 + 4 * 3600 + 1200, 0.5)
    assert first(run(spike), "failure_spike")


def test_a_few_seconds_of_clustered_errors_of_a_busy_consumer_are_no_spike():
    # ten calls a second, 1 % failing; a rate limit hit during a burst fails
    # 6 of 30 calls within 3 s: significant for a test of independent calls,
    # but over before anyone could act; the same rate for 20 s is a spike,
    # and half the calls failing is one at once
    rng = random.Random(31)
    evs = traffic("busy", T0, T0 + 3600, 0.1, rng, err=0.01)
    t = T0 + 2400

    def blip(length: float, share: float) -> list[dict]:
        out = [dict(d) for d in evs]
        n = 0
        for d in out:
            ts = UsageEvent.model_validate(d).ts.timestamp()
            if not (t <= ts < t + length and d["status"] == 200):
                continue
            n += 1
            if (n % 5 == 0) if share == 0.2 else rng.random() < share:
                d.update(status=429, error="rate_limited", output_tokens=0,
                         finish_reason="error")
        return out

    assert not first(run(blip(3.0, 0.2)), "failure_spike")
    for length, share, within in ((20.0, 0.2, 20), (20.0, 0.5, 5)):
        fs = first(run(blip(length, share)), "failure_spike")
        assert fs and fs[0].detected_at.timestamp() - t <= within, (length, share)


def test_a_failure_spike_that_comes_back_reopens_its_finding():
    # 10 calls a minute, 1 % failing; 403s on 60 % of calls for 10 minutes,
    # 15 quiet minutes (the episode resolves), then 10 minutes more of them:
    # one incident, one finding, alerting again with evidence.recurrences
    rng = random.Random(21)
    evs = traffic("flap", T0, T0 + 4 * 3600, 6.0, rng, err=0.01)
    t1 = T0 + 2 * 3600
    spells = [(t1, t1 + 600), (t1 + 1500, t1 + 2100)]
    for d in evs:
        ts = UsageEvent.model_validate(d).ts.timestamp()
        if any(a <= ts < b for a, b in spells) and rng.random() < 0.6:
            d.update(status=403, error="permission_denied", output_tokens=0,
                     finish_reason="error")
    fs = [f for f in run(evs) if f.kind == "failure_spike"]
    opened = first(fs, "failure_spike")
    assert len(opened) == 1 and opened[0].detected_at.timestamp() < t1 + 120
    assert any(f.status == "resolved" for f in fs)
    again = [f for f in fs if f.status == "firing" and f.evidence.get("recurrences") == 1]
    assert again and again[0].updated_at is not None
    assert t1 + 1500 <= again[0].updated_at.timestamp() < t1 + 1700
    assert {f.finding_id for f in fs} == {opened[0].finding_id}
    # with reopening off, the second spell is a finding of its own
    from detectors import DetectorConfig, Engine
    off = Engine(DetectorConfig.from_dict({"failure_spike": {"reopen_s": 0}}))
    assert len(first(run(evs, off), "failure_spike")) == 2


def test_client_errors_after_an_upstream_failure_spike_are_a_new_finding():
    # the same consumer: 503s on 60 % of calls for 10 minutes, 15 quiet
    # minutes, then its key revoked (401 on 60 %): the provider's incident
    # and the consumer's own are two findings, each naming its error class.
    # A second spell of 503s instead reopens the first (test above)
    rng = random.Random(22)
    evs = traffic("two", T0, T0 + 4 * 3600, 6.0, rng, err=0.01)
    t1 = T0 + 2 * 3600
    spells = [(t1, t1 + 600, 503, "upstream_5xx"), (t1 + 1500, t1 + 2100, 401, "auth_error")]
    for d in evs:
        ts = UsageEvent.model_validate(d).ts.timestamp()
        for a, b, status, err in spells:
            if a <= ts < b and rng.random() < 0.6:
                d.update(status=status, error=err, output_tokens=0, finish_reason="error")
    opened = first(run(evs), "failure_spike")
    assert [f.evidence["error_class"] for f in opened] == ["upstream", "client"], [
        f.summary for f in opened]
    assert t1 + 1500 <= opened[1].detected_at.timestamp() < t1 + 1620


def test_baseline_failures_do_not_fire_across_many_consumers():
    rng = random.Random(4)
    evs: list[dict] = []
    for c in range(40):  # 40 consumers x 3 h, 0.5-3 % failing, sizes 0.1 to 30 calls/min
        evs += traffic(f"c{c}", T0, T0 + 3 * 3600, rng.choice((2.0, 10.0, 60.0, 600.0)), rng,
                       err=rng.uniform(0.005, 0.03), model=("gpt-4o", "o3-mini")[c % 2])
    fs = run(evs)
    assert not first(fs, "failure_spike"), [f.summary for f in first(fs, "failure_spike")]
    assert not first(fs, "retry_storm")


def test_small_victim_with_a_few_calls_is_caught():
    rng = random.Random(5)
    evs = traffic("tiny", T0, T0 + 3 * 3600, 120.0, rng, err=0.01)  # 1 call per 2 min
    t = T0 + 3 * 3600 + 60
    for k in range(8):  # then 7 of 8 calls fail with 401 over ~25 minutes
        d = event(40_000 + k, t + 200 * k, "tiny", request_hash=f"a{k}")
        if k != 3:
            d.update(status=401, error="authentication_error", output_tokens=0,
                     finish_reason="error")
        evs.append(d)
    fs = first(run(evs), "failure_spike")
    assert fs and fs[0].consumer == "tiny" and fs[0].scope == "consumer"
    assert fs[0].evidence["error_class"] == "client"


def test_busy_consumer_failure_spike_is_fast():
    rng = random.Random(6)
    evs = traffic("busy", T0, T0 + 6000, 1.0, rng, err=0.01)
    t = T0 + 4000
    for d in evs:
        ts = UsageEvent.model_validate(d).ts.timestamp()
        if t <= ts < t + 600 and rng.random() < 0.4:
            d.update(status=403, error="permission_denied", output_tokens=0)
    fs = first(run(evs), "failure_spike")
    assert fs and fs[0].detected_at.timestamp() - t <= 30 and fs[0].action == "alert"


def outage(rng: random.Random) -> tuple[list[dict], float]:
    """Eight consumers of gpt-4o-mini (o0-o7, a call every 4-11 s) for 90
    minutes, 80 % of their calls failing with 503 for the 10 minutes from the
    returned time on."""
    evs: list[dict] = []
    for c in range(8):
        evs += traffic(f"o{c}", T0, T0 + 5400, 4.0 + c, rng, err=0.01, model="gpt-4o-mini")
    t = T0 + 3600
    for d in evs:
        ts = UsageEvent.model_validate(d).ts.timestamp()
        if t <= ts < t + 600 and rng.random() < 0.8:
            d.update(status=503, error="upstream_5xx", output_tokens=0)
    return evs, t


def test_upstream_outage_is_model_scope_and_never_blocks():
    rng = random.Random(7)
    evs, t = outage(rng)
    # clients retrying into the outage: same hash a few times
    evs += [event(30_000 + k, t + 100 + 2 * k, "o1", "gpt-4o-mini", request_hash="r",
                  status=503, error="upstream_5xx") for k in range(12)]
    fs = [f for f in run(evs) if f.revision == 0]
    model = [f for f in fs if f.kind == "failure_spike" and f.scope == "model"]
    assert model and model[0].subject == "gpt-4o-mini"
    assert model[0].detected_at.timestamp() - t <= 60
    assert all(f.action != "block" for f in fs), [f.summary for f in fs]
    assert not [f for f in fs if f.scope == "consumer" and f.kind == "failure_spike"]
    # the client hammering one request into the outage is still seen, as an alert
    [storm] = [f for f in fs if f.kind == "retry_storm"]
    assert storm.consumer == "o1" and storm.evidence["upstream_outage"] is True
    assert storm.severity == "warning" and storm.action == "alert"


def test_a_rate_jump_into_an_upstream_outage_is_a_storm_alert():
    """During a model's outage one consumer's clients jump to ~15x their
    calls, nearly all failing: a retry storm (the outage explains the
    failures, not the jump), reported at once as an alert, never a block;
    the other consumers, failing at their usual rate, are no storm."""
    rng = random.Random(7)
    evs, t = outage(rng)
    jump = t + 200
    for k in range(360):  # o3 (about 8 calls a minute): 120 a minute of new requests
        d = event(40_000 + k, jump + 0.5 * k, "o3", "gpt-4o-mini", request_hash=f"j{k}")
        if rng.random() < 0.9:
            d.update(status=503, error="upstream_5xx", output_tokens=0)
        evs.append(d)
    fs = [f for f in run(evs) if f.revision == 0]
    assert [f for f in fs if f.kind == "failure_spike" and f.scope == "model"]
    [storm] = [f for f in fs if f.kind == "retry_storm"]
    assert storm.consumer == "o3" and storm.evidence["rule"] == "rate_jump"
    assert storm.evidence["upstream_outage"] is True
    assert storm.severity == "warning" and storm.action == "alert"
    assert storm.detected_at.timestamp() - jump <= 60
    assert all(f.action != "block" for f in fs), [f.summary for f in fs]


# ----------------------------------------------------------- runaway_reasoning
def test_slow_call_with_little_thinking_is_not_runaway():
    rng = random.Random(8)
    evs = traffic("slow", T0, T0 + 3600, 20.0, rng, model="o3-mini", reasoning_tokens=400,
                  output_tokens=600)
    evs.append(event(20_000, T0 + 3700, "slow", "o3-mini", latency_ms=900_000,
                     output_tokens=500, reasoning_tokens=300))
    evs.append(event(20_001, T0 + 3800, "slow", "gpt-4o", latency_ms=700_000,
                     output_tokens=20_000))
    assert not first(run(evs), "runaway_reasoning")


def test_runaway_at_the_call_then_escalates():
    rng = random.Random(9)
    evs = traffic("rr", T0, T0 + 3600, 20.0, rng, model="o3-mini", reasoning_tokens=900,
                  output_tokens=1200)
    t = T0 + 3700
    evs += [event(10_000 + k, t + 120 * k, "rr", "o3-mini", latency_ms=400_000,
                  output_tokens=31_000, reasoning_tokens=30_000) for k in range(4)]
    fs = [f for f in run(evs) if f.kind == "runaway_reasoning"]
    assert fs[0].detected_at.timestamp() == pytest.approx(t, abs=0.01)
    assert len({f.finding_id for f in fs}) == 1
    assert fs[-1].severity == "critical" and fs[-1].action == "block"


def test_a_consumer_whose_calls_run_away_every_hour_has_one_finding():
    """Runaway calls of one consumer 50 minutes apart (each episode ends 30
    minutes after its call) reopen the first finding; they are compared in
    thinking tokens whatever rule reported them (the first ran past 600 s and
    reports seconds, which the next call's 12k tokens would dwarf); a call
    thinking far more than the episode's largest is a new finding."""
    def findings(cfg: DetectorConfig | None = None) -> list:
        rng = random.Random(12)
        evs = traffic("hr", T0, T0 + 3600, 20.0, rng, model="o3-mini", reasoning_tokens=500,
                      output_tokens=700)
        t = T0 + 3700
        big = [(11_000, 650_000), (12_000, 60_000), (12_500, 60_000), (40_000, 90_000)]
        evs += [event(10_000 + k, t + 3000 * k, "hr", "o3-mini", latency_ms=lat,
                      output_tokens=rsn + 300, reasoning_tokens=rsn, request_hash=f"big{k}")
                for k, (rsn, lat) in enumerate(big)]
        fs = [f for f in run(evs, Engine(cfg) if cfg else None)
              if f.kind == "runaway_reasoning" and f.status == "firing"]
        return fs

    fs = findings()
    ids = list(dict.fromkeys(f.finding_id for f in fs))
    assert len(ids) == 2, [f.summary for f in fs]
    first_ep = [f for f in fs if f.finding_id == ids[0]]
    assert [f.evidence.get("recurrences", 0) for f in first_ep] == [0, 1, 2]
    assert first_ep[0].evidence["rule"] == "max_latency" and first_ep[0].observed < 1000
    assert next(f for f in fs if f.finding_id == ids[1]).observed == 40_000
    # without reopening, each call is a finding of its own
    off = findings(DetectorConfig.from_dict({"runaway_reasoning": {"reopen_s": 0}}))
    assert len({f.finding_id for f in off}) == 4


def test_an_attack_after_an_hourly_runaway_is_a_new_finding():
    """A consumer's runaway call, then 90 minutes later another (it reopens
    the first finding), then three more within ten minutes: an attack on a
    reasoning model, critical, is a finding of its own, not a revision of
    the reopened warning."""
    rng = random.Random(13)
    evs = traffic("atk", T0, T0 + 3600, 20.0, rng, model="o3-mini", reasoning_tokens=500,
                  output_tokens=700)
    t = T0 + 3700
    times = [t, t + 5400, t + 6000, t + 6300, t + 6600]
    evs += [event(20_000 + k, s, "atk", "o3-mini", reasoning_tokens=20_000,
                  output_tokens=20_300, latency_ms=200_000, request_hash=f"a{k}")
            for k, s in enumerate(times)]
    fs = [f for f in run(evs) if f.kind == "runaway_reasoning" and f.status == "firing"]
    opened = [f for f in fs if f.revision == 0]
    assert [f.severity for f in opened] == ["warning", "critical"], [f.summary for f in fs]
    assert opened[1].detected_at.timestamp() == pytest.approx(times[3])
    # the second call did reopen the first finding
    assert any(f.finding_id == opened[0].finding_id and f.evidence.get("recurrences") == 1
               for f in fs)


def test_runaway_calls_on_two_models_of_one_consumer_are_two_findings():
    """A plain model's answer running on and, ten minutes later while that
    episode is still open, a reasoning model thinking away: two findings,
    each naming the model that ran away.  A second runaway call on the
    reasoning model within the episode stays in its finding."""
    rng = random.Random(21)
    evs = traffic("mm", T0, T0 + 3600, 15.0, rng, model="gpt-4o", output_tokens=300)
    evs += traffic("mm", T0, T0 + 3600, 15.0, rng, model="o3-mini", tag="r",
                   reasoning_tokens=500, output_tokens=700)
    evs.sort(key=lambda d: d["ts"])
    t = T0 + 3700
    evs += [event(9_001, t, "mm", "gpt-4o", output_tokens=16_000, latency_ms=150_000,
                  request_hash="long"),
            event(9_002, t + 600, "mm", "o3-mini", reasoning_tokens=20_000,
                  output_tokens=20_300, latency_ms=200_000, request_hash="think"),
            event(9_003, t + 900, "mm", "o3-mini", reasoning_tokens=21_000,
                  output_tokens=21_300, latency_ms=210_000, request_hash="think2")]
    fs = [f for f in run(evs) if f.kind == "runaway_reasoning" and f.status == "firing"]
    models = {f.finding_id: f.model for f in fs}
    assert sorted(models.values()) == ["gpt-4o", "o3-mini"], [f.summary for f in fs]
    [o3] = [fid for fid, m in models.items() if m == "o3-mini"]
    assert min(f.detected_at.timestamp() for f in fs if f.finding_id == o3) == pytest.approx(
        t + 600)
    # the third call is a revision of the o3-mini finding: the consumer's
    # third runaway call in 30 minutes (on either model) escalates it
    last = [f for f in fs if f.finding_id == o3][-1]
    assert last.severity == "critical" and last.evidence["runaway_calls_in_window"] == 3


def test_runaway_far_beyond_a_capped_wide_spread_is_caught():
    # thinking spread over two orders of magnitude but capped by a 4k budget:
    # the log z-score alone would accept 50k, the recent maximum does not
    rng = random.Random(10)
    evs = []
    for k in range(1500):
        rsn = min(4096, int(rng.lognormvariate(6.0, 1.45)))
        evs.append(event(k, T0 + 5 * k, "wide", "deepseek-reasoner", reasoning_tokens=rsn,
                         output_tokens=rsn + 200, latency_ms=1000 + 20 * rsn,
                         request_hash=f"w{k}"))
    t = T0 + 5 * 1500 + 3
    evs.append(event(9_999, t, "wide", "deepseek-reasoner", reasoning_tokens=50_000,
                     output_tokens=50_500, latency_ms=400_000, request_hash="big"))
    [f] = first(run(evs), "runaway_reasoning")
    assert f.evidence["rule"] == "tokens" and f.detected_at.timestamp() == pytest.approx(t)


def test_capped_thinking_six_and_a_half_times_its_budget_is_caught_output_is_not():
    # 80 calls of budgeted thinking (never past 4,096), then one of 27k
    # reasoning tokens in under 600 s: runaway.  A model that reports no
    # reasoning has long answers in its normal tail: the same jump of its
    # output tokens needs extreme_max_ratio_output (8x)
    rng = random.Random(15)

    def calls(model: str, reasoning: bool) -> list[dict]:
        out = []
        for k in range(80):
            n = min(4096, int(rng.lognormvariate(7.0, 0.9)))
            kw = dict(reasoning_tokens=n, output_tokens=n + 300) if reasoning else dict(
                output_tokens=n)
            out.append(event(k, T0 + 200 * k, "cap", model, latency_ms=2000 + 10 * n,
                             request_hash=f"c{k}", **kw))
        return out

    t = T0 + 200 * 80
    big = event(9_999, t, "cap", "deepseek-reasoner", reasoning_tokens=26_900,
                output_tokens=28_000, latency_ms=344_000, request_hash="big")
    [f] = first(run([*calls("deepseek-reasoner", True), big]), "runaway_reasoning")
    assert f.evidence["rule"] == "tokens" and f.detected_at.timestamp() == pytest.approx(t)
    plain = event(9_999, t, "cap", "gpt-4o", output_tokens=26_900, latency_ms=344_000,
                  request_hash="big")
    assert not first(run([*calls("gpt-4o", False), plain]), "runaway_reasoning")


def test_a_call_between_the_learning_and_the_reporting_bar_is_neither():
    # a consumer thinking a log-normal ~800 tokens (sd 0.35 in log space);
    # a call between its 5 sd and 6 sd limits (and past every other bar) is
    # not reported at the default z = 6, and is kept out of the baselines
    # (learn_z = 5) as a reported one would be; with z = 5 it is reported
    evs = thinking_calls(random.Random(21), "mid", "o3-mini", 800, 300, 20, 200, 10,
                         base_ms=1000, tag="m")
    eng = Engine()
    run(evs, eng)
    b = eng._consumers["mid"].model_baseline("o3-mini")
    lo, hi = b.t_limit(5.0), b.t_limit(6.0)
    think = int((max(lo, 6000.0, 1.5 * b.t_rmax, 6.0 * b.t_geomean()) + hi) / 2)
    assert lo < think < hi < 6.0 * b.t_rmax
    mid = event(9_999, T0 + 20 * 300, "mid", "o3-mini", reasoning_tokens=think,
                output_tokens=think + 200, latency_ms=1000 + 10 * think, request_hash="mid")
    before = (b.t_n, b.t_rmax, b.t_m)
    assert not first(run([mid], eng), "runaway_reasoning")
    assert (b.t_n, b.t_rmax, b.t_m) == before  # learnt nothing
    at5 = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"z": 5.0}}))
    [f] = first(run([*evs, mid], at5), "runaway_reasoning")
    assert f.evidence["rule"] == "tokens" and f.observed == think
    # learn_z at or above z: every call not reported teaches the baselines
    learns = Engine(DetectorConfig.from_dict({"runaway_reasoning": {"learn_z": 6.0}}))
    run(evs, learns)
    b2 = learns._consumers["mid"].model_baseline("o3-mini")
    assert not first(run([mid], learns), "runaway_reasoning")
    assert b2.t_rmax == think  # the recent maximum sees every call it learns
