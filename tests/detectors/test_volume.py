"""token_spike / cost_spike rate windows, agent_loop and context_bloat rules."""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from detectors import DetectorConfig, Engine
from detectors.engine import source_digest
from detectors.volume import Volume

from .drive import first, run
from .synth import T0, event

ROOT = Path(__file__).resolve().parents[2]


def bursty(consumer: str, minutes: int, seed: int = 1, rate: float = 6.0, size: int = 2000,
           i0: int = 0, **kw) -> list[dict]:
    """Gamma-modulated minutes (some empty, some 5x), heavy-tailed call sizes."""
    rng = random.Random(seed)
    evs = []
    i = i0
    for m in range(minutes):
        n = 0 if rng.random() < 0.15 else int(rng.gammavariate(0.8, rate / 0.8) + 0.5)
        for _ in range(n):
            inp = int(rng.lognormvariate(0, 1.0) * size)
            evs.append(event(i, T0 + 60 * m + rng.random() * 60, consumer, input_tokens=inp,
                             output_tokens=inp // 8, request_hash=f"h{i}", **kw))
            i += 1
    return evs


def test_window_trims_the_largest_call_and_tracks_sources():
    v = Volume(0.0)
    for k in range(4):
        v.add(1000, 0.0, source_digest(f"s{k}"))
    v.add(1_000_000, 0.0, source_digest("giant"))
    mt, _ = v.largest1()
    assert v.wt - mt == 4000 and v.wn == 5
    assert v.dominated1()  # the giant call is most of the window
    w = Volume(0.0)
    for k in range(20):
        w.add(1000, 0.0, source_digest(f"s{k}"))
    assert not w.dominated1()
    # one source in many small calls (an agent run): its id arrives as a new
    # string object with each event
    u = Volume(0.0)
    for k in range(20):
        u.add(1000, 0.0, source_digest("".join(("run-", "ö", str(k % 1)))))
    u.add(1000, 0.0, source_digest("other"))
    assert u.dominated1()


def test_source_digests_are_the_same_in_every_process():
    """The heavy-hitter counter keeps a digest of each source id: a snapshot
    restored in another process must still match it (``hash()`` of a string
    is salted per process), ids in any script included."""
    ids = ["trace-0001", "sessão-ü", "会话-7", "h" * 64, "emoji-\U0001F600", ""]
    here = [source_digest(i) for i in ids]
    assert len(set(here)) == len(ids) and all(d >= 0 for d in here)
    code = ("import json, sys; from detectors.engine import source_digest; "
            "print(json.dumps([source_digest(i) for i in json.loads(sys.argv[1])]))")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        r = subprocess.run([sys.executable, "-c", code, json.dumps(ids)], env=env,
                           capture_output=True, text=True, check=True, cwd=ROOT)
        assert json.loads(r.stdout) == here


def test_bursty_normal_traffic_is_quiet():
    evs = []
    for c in range(6):
        evs += bursty(f"b{c}", 360, seed=c, i0=c * 100_000)
    fs = run(evs)
    assert first(fs, "token_spike") == [] and first(fs, "cost_spike") == []


def test_step_is_seen_within_a_minute():
    evs = bursty("s", 180, rate=6.0)
    t = T0 + 180 * 60
    # 40x the mean rate (its normal 60 s windows reach 7x the mean: gamma bursts)
    evs += [event(900_000 + k, t + k * 0.25, "s", input_tokens=2000, output_tokens=250,
                  request_hash=f"x{k}") for k in range(1200)]
    fs = first(run(evs), "token_spike")
    assert fs and fs[0].consumer == "s"
    assert fs[0].detected_at.timestamp() - t <= 60


def test_a_step_under_the_60s_bar_is_seen_after_two_whole_minutes():
    # the bursty consumer's normal 60 s windows reach 7x its mean, so the 60 s
    # bar is over 20x; a step to 19x its mean (2.7x its recent normal high)
    # lasts: two whole minutes above twice the recent high are no burst
    evs = bursty("s", 180, rate=6.0)
    t = T0 + 180 * 60
    evs += [event(900_000 + k, t + k * 0.45, "s", input_tokens=2000, output_tokens=250,
                  request_hash=f"x{k}") for k in range(1300)]
    [f] = first(run(evs), "token_spike")
    assert f.evidence["rule"] == "minutes_2" and f.detected_at.timestamp() - t <= 130
    # without that rule the 5 min window sees it two minutes later
    off = Engine(DetectorConfig.from_dict({"token_spike": {"pair_ratio_to_recent_max": 0}}))
    [g] = first(run(evs, off), "token_spike")
    assert g.detected_at.timestamp() - t >= 200


def test_a_spike_whose_consumer_falls_silent_is_judged_as_its_minutes_end():
    # steady calls for 3 h, then three minutes of prompts 15x bigger (six calls
    # a minute: under the 60 s window's 8, so only the 5 min window can see
    # it, two windows in a row), then silence for 3 h while another
    # consumer's calls move the clock.  The spike's last window is tested as
    # its minute ends, not when the consumer calls again: its minute used to
    # close at its next call, and the finding came 3 h late, at that call
    evs = [event(k, T0 + 10.0 * k, "c", input_tokens=2000, output_tokens=250,
                 request_hash=f"n{k}") for k in range(6 * 180)]
    t = T0 + 180 * 60
    evs += [event(10_000 + k, t + 10.0 * k + 1.0, "c", input_tokens=30_000, output_tokens=250,
                  request_hash=f"s{k}") for k in range(18)]
    back = t + 3 * 3600
    evs += [event(20_000 + k, back + 10.0 * k, "c", input_tokens=2000, output_tokens=250,
                  request_hash=f"b{k}") for k in range(60)]
    evs += [event(30_000 + k, T0 + 10.0 * k + 5.0, "clock", input_tokens=100, output_tokens=10,
                  request_hash=f"k{k}") for k in range(int((back - T0) / 10) + 60)]
    fs = [f for f in run(evs) if f.consumer == "c"]
    [f] = first(fs, "token_spike")
    assert f.evidence["rule"] == "window_5m"
    assert f.detected_at.timestamp() == t + 180  # the end of the spike's third minute
    assert all(g.detected_at.timestamp() < back for g in fs)


def test_one_giant_call_or_one_agent_run_is_not_a_token_spike():
    evs = bursty("g", 180)
    t = T0 + 180 * 60
    evs.append(event(900_000, t, "g", input_tokens=900_000, request_hash="big"))
    # a burst of 60 calls from one trace: agent_loop's, not token_spike's
    evs += [event(900_001 + k, t + 120 + k, "g", input_tokens=20_000, trace_id="loop",
                  request_hash=f"l{k}") for k in range(60)]
    fs = run(evs)
    assert first(fs, "token_spike") == []
    assert [f.subject for f in first(fs, "agent_loop")] == ["loop"]


def test_model_switch_is_a_cost_spike_not_a_token_spike():
    evs = bursty("m", 180, rate=20.0, cost=0.0025)
    t = T0 + 180 * 60
    rng = random.Random(5)
    evs += [event(900_000 + k, t + rng.random() * 600, "m", input_tokens=2000,
                  output_tokens=250, cost=0.05, request_hash=f"o{k}")  # 20x the price
            for k in range(200)]
    fs = run(evs)
    assert first(fs, "token_spike") == []
    cost = first(fs, "cost_spike")
    assert cost and cost[0].detected_at.timestamp() - t <= 120


def test_a_consumer_mixing_a_cheap_and_a_dear_model_is_no_cost_spike_until_it_switches():
    # ten calls a minute on a cheap model; every tenth minute four of them on
    # a model 40x the price (a report job): those minutes cost 5x the mean
    # price per token, past the price-jump bar (4x), and used to be a cost
    # spike each.  The consumer's recent high price of a minute knows them.
    # A switch of every call to the dear model is still a cost spike
    def call(k: int, dear: bool) -> dict:
        return event(k, T0 + 6.0 * k, "mix", model="o1" if dear else "gpt-4o-mini",
                     input_tokens=2000, output_tokens=250, cost=0.2 if dear else 0.005,
                     request_hash=f"m{k}")
    evs = [call(k, (k // 10) % 10 == 9 and k % 10 in (0, 3, 6, 9)) for k in range(10 * 240)]
    assert first(run(evs), "cost_spike") == []
    t = T0 + 6.0 * 10 * 240
    evs += [call(10 * 240 + k, True) for k in range(60)]
    [f] = first(run(evs), "cost_spike")
    assert 0 <= f.detected_at.timestamp() - t <= 60
    # without the consumer's recent high price, its dear minutes were spikes
    off = Engine(DetectorConfig.from_dict({"cost_spike": {"price_high_ratio": 0}}))
    assert len(first(run(evs[:10 * 240], off), "cost_spike")) >= 1


def test_a_dear_minute_teaches_the_price_high_once_the_price_is_back_a_climb_never():
    # (cost_spike off: no episode keeps the baselines from learning)
    cfg = DetectorConfig.from_dict({"cost_spike": {"enabled": False}})

    def call(c: str, k: int, dear: bool) -> dict:
        return event(k, T0 + 6.0 * k, c, input_tokens=2000, output_tokens=250,
                     cost=0.2 if dear else 0.005, request_hash=f"{c}{k}")
    mixed = [call("mix", k, 60 <= k // 10 < 61) for k in range(10 * 70)]
    climb = [call("up", k, k // 10 >= 60 and k % 10 < k // 10 - 59) for k in range(10 * 70)]
    eng = Engine(cfg)
    run(mixed + climb, eng)
    per_call = 2250.0
    # the dear minute (every call at 0.2), then cheap minutes again: learnt
    assert eng._consumers["mix"].pr_hi * per_call > 0.1
    # dearer calls minute after minute (1 of 10, 2 of 10, ... 9 of 10): the
    # price never came back, and the high is still the cheap minutes' price
    assert eng._consumers["up"].pr_hi * per_call < 0.01


def test_a_dearer_model_at_a_little_more_volume_is_no_token_spike():
    # steady calls, then half as many again on a model 20x the price: the
    # cost windows pass their bars, the tokens (1.5x) pass none of theirs and
    # must not be reported as a lasting token spike (the 5 min window reaches
    # its token tests on its cost alone)
    rng = random.Random(7)
    evs = [event(k, T0 + 6.0 * k + rng.random(), "p", input_tokens=900, output_tokens=100,
                 cost=0.001, request_hash=f"c{k}") for k in range(1800)]
    t = T0 + 1800 * 6.0
    evs += [event(10_000 + k, t + 4.0 * k + rng.random(), "p", "claude-opus-4",
                  input_tokens=900, output_tokens=100, cost=0.02, request_hash=f"o{k}")
            for k in range(450)]
    fs = run(evs)
    assert first(fs, "cost_spike")
    assert first(fs, "token_spike") == [], [f.summary for f in first(fs, "token_spike")]


def test_switch_to_a_dearer_model_with_more_calls_is_a_cost_and_a_token_spike():
    # one call a minute, then 15 a minute on a model 5x the price: the rise in
    # volume must not teach the baseline price before the 60 s window is tested
    rng = random.Random(3)
    evs = [event(k, T0 + 60 * k + rng.random() * 30, "d", input_tokens=2000,
                 output_tokens=250, cost=0.005, request_hash=f"c{k}") for k in range(180)]
    t = T0 + 180 * 60
    evs += [event(1000 + k, t + 4 * k + rng.random(), "d", "claude-opus-4", input_tokens=2000,
                  output_tokens=250, cost=0.025, request_hash=f"o{k}") for k in range(150)]
    fs = run(evs)
    cost = first(fs, "cost_spike")
    assert cost and cost[0].detected_at.timestamp() - t <= 60
    # the baseline price is the one before the switch (2.22 per Mtok), not
    # already pulled up by the first dear calls
    assert cost[0].evidence["baseline_cost_per_mtok"] == pytest.approx(2.222, abs=0.01)
    # 15x the tokens is a token spike too, at whatever price
    assert first(fs, "token_spike")


def test_huge_outputs_on_the_same_model_are_a_cost_spike():
    # a chat consumer on gpt-4o (input 2.5, output 10 per Mtok): 1,000 tokens
    # in and 500 out a call, 5 per Mtok; then the same calls answer with 8,000
    # tokens (max_tokens raised, a prompt asking for everything): 9.2 per Mtok,
    # 1.8x the price, and 11x the cost a minute
    def cost(i: int, o: int) -> float:
        return i * 2.5e-6 + o * 10e-6

    rng = random.Random(4)
    evs = [event(k, T0 + 6.0 * k + rng.random() * 3, "chat", input_tokens=1000,
                 output_tokens=500, cost=cost(1000, 500), request_hash=f"c{k}")
           for k in range(1800)]
    t = T0 + 1800 * 6.0
    evs += [event(10_000 + k, t + 6.0 * k + rng.random() * 3, "chat", input_tokens=1000,
                  output_tokens=8000, cost=cost(1000, 8000), request_hash=f"h{k}")
            for k in range(150)]
    [f] = first(run(evs), "cost_spike")
    assert f.detected_at.timestamp() - t <= 120
    assert f.evidence["cost_per_mtok"] / f.evidence["baseline_cost_per_mtok"] < 2.0
    # at the price bar it had (2.5x), the rise was a token_spike (and the
    # first 16x answer a runaway output), never a cost_spike
    old = Engine(DetectorConfig.from_dict({"cost_spike": {"price_ratio": 2.5}}))
    fs_old = run(evs, old)
    assert first(fs_old, "cost_spike") == []
    assert first(fs_old, "token_spike")


def test_tiny_consumer_never_pages():
    evs = [event(k, T0 + 120 * k, "tiny", input_tokens=300, request_hash=f"t{k}")
           for k in range(200)]
    t = T0 + 120 * 200
    evs += [event(1000 + k, t + 6 * k, "tiny", input_tokens=300, request_hash=f"u{k}")
            for k in range(100)]  # 20x its rate, but 3k tokens a minute
    assert first(run(evs), "token_spike") == []


def test_a_lasting_rise_under_the_5min_floor_pages_nobody():
    # a small consumer (a call of ~1.5k tokens a minute) goes to 12 calls a
    # minute for 20 minutes: 12x its mean and far above its recent high, but
    # 18k tokens a minute, under the 5 min window's floor (25k a minute) and
    # the 60 s window's (20k); the same step at twice the size is a spike
    def step(size: int) -> list[dict]:
        rng = random.Random(11)
        evs = [event(k, T0 + 60 * k + rng.random() * 50, "small", input_tokens=1300,
                     output_tokens=200, request_hash=f"b{k}") for k in range(180)]
        t = T0 + 180 * 60
        evs += [event(1000 + k, t + 5 * k + rng.random(), "small", input_tokens=size,
                      output_tokens=size // 8, request_hash=f"s{k}") for k in range(240)]
        return evs

    assert first(run(step(1330)), "token_spike") == []
    assert len(first(run(step(2660)), "token_spike")) == 1
    # the floor it was (10k a minute) let the smaller step page
    low = Engine(DetectorConfig.from_dict({"token_spike": {"sustained_min_tokens_per_min": 10000}}))
    assert first(run(step(1330), low), "token_spike")


def test_long_conversation_is_not_an_agent_loop():
    evs = [event(k, T0 + 30 * k, "chat", session_id="conv", input_tokens=1000 + 10 * k,
                 request_hash=f"c{k}") for k in range(60)]
    assert first(run(evs), "agent_loop") == []
    evs = [event(k, T0 + 3 * k, "ag", trace_id="tr", input_tokens=3000,
                 request_hash=f"a{k}") for k in range(45)]
    assert [f.subject for f in first(run(evs), "agent_loop")] == ["tr"]


def test_context_bloat_needs_steady_growth():
    grow = [event(k, T0 + 30 * k, "cb", session_id="s1", input_tokens=3000 + 7000 * k,
                  request_hash=f"g{k}") for k in range(15)]
    assert len(first(run(grow), "context_bloat")) == 1
    # a history served from the prompt cache is still resent (reported by
    # default), unless the operator asks for mostly uncached sessions only
    cached = [dict(d, cached_input_tokens=int(d["input_tokens"] * 0.9)) for d in grow]
    [f] = first(run(cached), "context_bloat")
    assert f.evidence["cached_input_tokens"] > 0
    strict = DetectorConfig.from_dict({"context_bloat": {"max_cached_share": 0.5}})
    assert first(run(cached, Engine(strict)), "context_bloat") == []
    # prompts that suddenly grow much faster than one turn at a time (bigger
    # prompts: a token spike) restart the streak: not a history being resent
    inp = [1000 + 400 * k for k in range(6)]
    while len(inp) < 14:
        inp.append(int(inp[-1] * 1.5) + 3000)
    ramp = [event(k, T0 + 30 * k, "cm", session_id="s3", input_tokens=x, request_hash=f"m{k}")
            for k, x in enumerate(inp)]
    assert inp[-1] > 80_000 and first(run(ramp), "context_bloat") == []
    # a jump (bigger prompts) then a little growth is not bloat
    jump = [event(k, T0 + 30 * k, "cj", session_id="s2",
                  input_tokens=(1000 + 200 * k) * (1 if k < 3 else 40), request_hash=f"j{k}")
            for k in range(15)]
    assert first(run(jump), "context_bloat") == []


def test_context_bloat_survives_failed_turns():
    # the history keeps growing while some turns fail (their input unknown, 0)
    evs = []
    inp = 1500
    for k in range(40):
        d = event(k, T0 + 40 * k, "cf", session_id="s4", input_tokens=inp, request_hash=f"f{k}")
        if 8 <= k < 20 and k % 3:
            d.update(status=503, error="upstream_5xx", input_tokens=0, output_tokens=0,
                     finish_reason="error")
        evs.append(d)
        inp += 3200
    [f] = first(run(evs), "context_bloat")
    assert f.subject == "s4" and f.evidence["first_input_tokens"] < 20_000


def test_context_bloat_tolerates_turns_of_varying_size():
    # a resent history whose turns vary: now and then a call's input dips a
    # little below the one before (a shorter turn replaced, a trim); the
    # streak waits instead of restarting
    rng = random.Random(8)
    hist, inp = 4000, []
    for k in range(45):
        hist += rng.randint(1000, 4000)
        inp.append(int(hist * (0.85 if k % 4 == 3 else 1.0)))
    evs = [event(k, T0 + 40 * k, "cv", session_id="s5", input_tokens=x, request_hash=f"v{k}")
           for k, x in enumerate(inp)]
    assert any(b < a for a, b in itertools.pairwise(inp)) and inp[-1] > 80_000
    [f] = first(run(evs), "context_bloat")
    assert f.subject == "s5"
    # deep drops (the client summarising its history every few turns)
    # restart the streak: no history is resent for long
    deep = [dict(d, input_tokens=int(x / 0.85 * 0.55) if k % 4 == 3 else x)
            for k, (d, x) in enumerate(zip(evs, inp, strict=True))]
    assert first(run(deep), "context_bloat") == []


def test_two_big_calls_in_a_burst_are_no_rate_change():
    # a consumer of 1-2 small calls a minute; then a minute of 9 calls
    def quiet(consumer: str) -> list[dict]:
        rng = random.Random(3)
        return [event(m * 10 + k, T0 + 60 * m + 20 * k + rng.random() * 10, consumer,
                      input_tokens=int(rng.lognormvariate(0, 0.5) * 1200), output_tokens=100,
                      request_hash=f"{consumer}{m}-{k}")
                for m in range(150) for k in range(rng.randint(1, 2))]

    t = T0 + 150 * 60
    # two big calls (different 10 s buckets) and seven small ones: the window
    # without its largest call is over the floor, but only by the second one
    two = quiet("two") + [
        event(90_000 + k, t + 6 * k, "two", output_tokens=100, request_hash=f"t{k}",
              input_tokens=(40_000 if k == 0 else 30_000 if k == 3 else 800))
        for k in range(9)]
    assert first(run(two), "token_spike") == []
    # the same with both big calls in one 10 s bucket
    two = quiet("two") + [
        event(90_000 + k, t + (1 + k if k < 2 else 6 * k), "two", output_tokens=100,
              request_hash=f"t{k}", input_tokens=(40_000 if k == 0 else 30_000 if k == 1
                                                  else 800))
        for k in range(9)]
    assert first(run(two), "token_spike") == []
    # nine calls all five times the usual size: the excess is spread over them
    spread = quiet("spread") + [
        event(90_000 + k, t + 6 * k, "spread", output_tokens=100, request_hash=f"s{k}",
              input_tokens=6000) for k in range(9)]
    fs = first(run(spread), "token_spike")
    assert fs and fs[0].detected_at.timestamp() - t <= 60
    with pytest.raises(ValueError, match="spread_share"):
        DetectorConfig.from_dict({"token_spike": {"spread_share": 1.5}})


def test_lasting_step_of_many_small_calls_is_caught_a_short_one_is_not():
    # a consumer whose normal 5 min windows reach ~3x its mean (a 3-minute
    # batch every 40 minutes), then 30x the calls, each smaller than usual: the
    # token rate rises ~8x, below the recent-high bar, but it lasts
    evs = bursty("p", 240, rate=6.0)
    rng = random.Random(7)
    for b in range(6):
        for k in range(90):
            inp = int(rng.lognormvariate(0, 1.0) * 2000)
            evs.append(event(500_000 + 100 * b + k, T0 + 2400 * b + 600 + 2 * k, "p",
                             input_tokens=inp, output_tokens=inp // 8, request_hash=f"z{b}-{k}"))
    t = T0 + 240 * 60

    def step(minutes: float) -> list[dict]:
        return [event(900_000 + k, t + k * 0.3, "p", input_tokens=1020, output_tokens=128,
                      request_hash=f"y{k}") for k in range(int(minutes * 200))]

    fs = first(run(evs + step(15)), "token_spike")
    assert fs and fs[0].evidence["rule"] == "window_5m"
    assert fs[0].detected_at.timestamp() - t <= 600
    assert fs[0].evidence["minutes_in_a_row"] >= 4 and "minutes in a row" in fs[0].summary
    assert not first(run(evs + step(3)), "token_spike")  # three minutes: a burst
    strict = Engine(DetectorConfig.from_dict({"token_spike": {"persist_windows": 60}}))
    assert not first(run(evs + step(15), strict), "token_spike")  # the path is what caught it


def test_a_burst_that_comes_back_reopens_its_finding_a_bigger_one_is_new():
    base = T0 + 180 * 60

    def with_steps(reopen_s: float) -> list:
        evs = bursty("r", 300, rate=6.0)  # its normal traffic goes on throughout
        for i0, start, gap in ((900_000, base, 0.25),  # 40x the mean rate for 5 min
                               (910_000, base + 45 * 60, 0.25),  # the same, 45 min later
                               (920_000, base + 90 * 60, 0.05)):  # 5x that, 45 min later
            evs += [event(i0 + k, start + k * gap, "r", input_tokens=2000, output_tokens=250,
                          request_hash=f"x{i0 + k}") for k in range(int(300 / gap))]
        cfg = DetectorConfig.from_dict({"token_spike": {"reopen_s": reopen_s}})
        return [f for f in run(evs, Engine(cfg)) if f.kind == "token_spike"]

    fs = with_steps(7200.0)
    opened = [f.detected_at.timestamp() - base for f in first(fs, "token_spike")]
    assert len(opened) == 2 and opened[0] <= 60 and 90 * 60 <= opened[1] <= 91 * 60
    again = [f for f in fs if f.status == "firing" and f.evidence.get("recurrences") == 1]
    assert again and again[0].finding_id == first(fs, "token_spike")[0].finding_id
    # detected_at stays the first detection; updated_at is when it came back
    assert again[0].revision > 0 and 45 * 60 <= again[0].updated_at.timestamp() - base <= 46 * 60
    # without reopening, the burst that came back is a finding of its own
    assert len(first(with_steps(0.0), "token_spike")) == 3


def test_a_burst_at_the_same_hour_every_day_is_that_hours_normal():
    day = 86400.0

    def days(daily_decay: float) -> list[float]:
        """Opening times (s after T0) of token_spike findings: three days of
        bursty traffic, 40x its mean rate for 5 min at 09:00 each day and, on
        the third day, at 21:00 too."""
        evs = bursty("d", 3 * 1440, rate=6.0)
        bursts = [d * day + 9 * 3600 for d in range(3)] + [2 * day + 21 * 3600]
        for j, start in enumerate(bursts):
            i0 = 900_000 + 10_000 * j
            evs += [event(i0 + k, T0 + start + k * 0.25, "d", input_tokens=2000,
                          output_tokens=250, request_hash=f"x{i0 + k}") for k in range(1200)]
        evs.sort(key=lambda e: e["ts"])
        cfg = DetectorConfig.from_dict({"token_spike": {"daily_decay": daily_decay}})
        return [f.detected_at.timestamp() - T0
                for f in first(run(evs, Engine(cfg)), "token_spike")]

    def at(t: float) -> bool:
        return any(0 <= o - t <= 120 for o in opened)

    opened = days(0.5)
    # the first day's burst is news; the next days' at 09:00 are not, the
    # same burst at 21:00, an hour it never came, is (the recent high, which
    # the 09:00 burst taught, has decayed to an eighth by then)
    assert at(9 * 3600) and at(2 * day + 21 * 3600)
    assert not at(day + 9 * 3600) and not at(2 * day + 9 * 3600)
    # without the time-of-day profile every 09:00 burst is a finding
    opened = days(0.0)
    assert at(9 * 3600) and at(day + 9 * 3600) and at(2 * day + 9 * 3600)


def test_time_of_day_profile_codes_round_up_and_decay_per_day():
    v = Volume(0.0)
    v.enter_hour(9 * 3600.0, 0.5)
    v.prof = v.prof[:9] + bytes((80,)) + v.prof[10:]  # a 60 s high of ~1000 tokens at 09:00
    v.enter_hour(10 * 3600.0, 0.5)
    assert v.dh1 == 0.0  # nothing known for 10:00 / 11:00
    v.enter_hour(86400.0 + 8 * 3600.0, 0.5)  # next day, 08:00: 09:00 is the next hour
    assert 450 <= v.dh1 <= 550  # halved
    v.enter_hour(86400.0 + 9 * 3600.0, 0.5)
    assert v.prof[9] == 72 and 450 <= v.dh1 <= 550  # decayed once, not twice


def _quiet() -> DetectorConfig:
    # read as the service reads --detectors-file
    from api.service import read_toml

    path = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "detectors.quiet.toml")
    return DetectorConfig.from_dict(read_toml(path, "detectors"))


def test_the_quiet_preset_trades_moderate_steps_for_fewer_findings():
    cfg = _quiet()
    tc = cfg.settings.token_spike
    assert tc.persist_windows > 63 and tc.pair_ratio_to_recent_max == 3.0
    assert cfg.settings.retry_storm == DetectorConfig.from_dict({}).settings.retry_storm
    # the lasting step at 2.7x the recent normal high: the default finds it
    # after two whole minutes, the preset only when the 5 min windows see it
    evs = bursty("s", 180, rate=6.0)
    t = T0 + 180 * 60
    evs += [event(900_000 + k, t + k * 0.45, "s", input_tokens=2000, output_tokens=250,
                  request_hash=f"x{k}") for k in range(1300)]
    [f] = first(run(evs), "token_spike")
    assert f.detected_at.timestamp() - t <= 130
    [g] = first(run(evs, Engine(cfg)), "token_spike")
    assert g.evidence["rule"] == "window_5m" and g.detected_at.timestamp() - t >= 300
    # a step to 30x the mean: the default's 60 s window within a minute, the
    # preset's two-minute rule a minute later
    big = bursty("s", 180, rate=6.0)
    big += [event(900_000 + k, t + k * 1.0, "s", input_tokens=6000, output_tokens=750,
                  request_hash=f"y{k}") for k in range(600)]
    [f] = first(run(big), "token_spike")
    assert f.detected_at.timestamp() - t <= 60
    [g] = first(run(big, Engine(cfg)), "token_spike")
    assert g.detected_at.timestamp() - t <= 130


def test_a_far_bigger_spike_inside_a_long_episode_is_a_finding_of_its_own():
    # a lasting step to 20x the mean opens an episode that stays open (its
    # baselines do not learn while it is); 50 minutes on, 10x that new level
    # for 5 minutes is news (the defaults), not a revision of the old finding
    base = T0 + 180 * 60
    evs = bursty("g", 300, rate=6.0)
    evs += [event(900_000 + k, base + k * 0.5, "g", input_tokens=2000, output_tokens=250,
                  request_hash=f"x{k}") for k in range(int(100 * 60 / 0.5))]
    evs += [event(950_000 + k, base + 50 * 60 + k * 0.05, "g", input_tokens=2000,
                  output_tokens=250, request_hash=f"y{k}") for k in range(int(300 / 0.05))]

    def opened(regrow_ratio: float) -> list[float]:
        cfg = DetectorConfig.from_dict({"token_spike": {"regrow_ratio": regrow_ratio}})
        return [f.detected_at.timestamp() - base
                for f in first(run(evs, Engine(cfg)), "token_spike")]

    at = opened(DetectorConfig().settings.token_spike.regrow_ratio)
    assert len(at) == 2 and at[0] <= 180 and 50 * 60 <= at[1] <= 51 * 60
    # the old finding ended where the new one began
    fs = [f for f in run(evs) if f.kind == "token_spike"]
    ended = [f for f in fs if f.status == "resolved" and f.finding_id == fs[0].finding_id]
    assert ended and ended[0].resolved_at.timestamp() - base == pytest.approx(at[1])
    assert opened(0.0) == at[:1]  # off: the spike is only a revision of the first
