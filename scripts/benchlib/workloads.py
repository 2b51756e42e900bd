"""The measures. Each runs every peer in turn on the same stack, from a
fresh slot and an empty outbox table, and returns plain dicts (the JSON).

Time is read from one clock for every peer: a row's created_at (now() in
its one-statement transaction, so its commit time to well under a
millisecond), the broker's LogAppendTime on the record, and this script's
time.time() around a process start, kill or restart: all CLOCK_REALTIME
on the same machine.
"""

import collections
import datetime
import os
import subprocess
import time

from .broker import Watcher
from .stack import CLIENTS, insert_script, lsn_to_int
from .util import log, percentile, wait_until

MIB = 2**20


def _round(x, digits=2):
    return None if x is None else round(x, digits)


def _latencies(values_ms):
    values = sorted(values_ms)
    return {"p50_ms": _round(percentile(values, 50)), "p99_ms": _round(percentile(values, 99)),
            "max_ms": _round(values[-1] if values else None), "samples": len(values)}


def _load():
    return [round(x, 2) for x in os.getloadavg()]


def _start_streaming(ctx, peer, phase):
    """A fresh slot and topic, the peer started and warmed: ctx.warmup
    events sent through it end to end (a JVM's JIT compiles while it runs;
    a relay in production has long been running), then the table emptied.
    Returns (process, topic, the Tail that read the warm-up)."""
    ctx.stack.truncate()
    peer.reset()
    topic = peer.topic(phase)
    ctx.broker.create_topic(topic, ctx.partitions)
    proc = peer.start(phase)
    warm = max(ctx.warmup // CLIENTS, 1)
    ctx.stack.pgbench(["-t", str(warm)])
    warm *= CLIENTS
    tail = ctx.broker.wait_records(topic, warm, 300, f"{peer.name} to deliver {warm} warm-up events", alive=proc.alive)
    # Every consumer here ignores TRUNCATE (walrelay by design, Debezium by
    # its default skipped.operations=t).
    ctx.stack.truncate()
    return proc, topic, tail


def _wait_delivered(ctx, peer, proc, topic, n, timeout, tail):
    return ctx.broker.wait_records(topic, n, timeout, f"{peer.name} to deliver {n} events", alive=proc.alive, tail=tail)


def drain(ctx, n):
    """A backlog of n events written before the consumer starts."""
    stack, broker = ctx.stack, ctx.broker
    stack.truncate()
    for peer in ctx.peers + [ctx.recvlogical]:
        peer.reset()
    log(f"drain: writing a backlog of {n:,} events")
    t = time.time()
    stack.pgbench(["-t", str(n // CLIENTS)])
    events = stack.outbox_count()
    end = stack.psql("SELECT pg_current_wal_lsn()::text")
    log(f"  {events:,} events in {time.time() - t:.1f} s")
    result = {"events": events, "load": _load(), "peers": {}}

    seconds, cpu, rss = ctx.recvlogical.drain(end)
    result["peers"]["pg_recvlogical"] = {
        "start_to_last_s": _round(seconds, 3), "events_per_second": round(events / seconds),
        "cpu_seconds_per_100k": _round(cpu / events * 100_000, 3), "peak_rss_mib": _round(rss / MIB, 1),
    }
    log(f"  pg_recvlogical: {seconds:.2f} s ({events / seconds:,.0f} events/s)")

    phase = f"drain{n}"
    for peer in ctx.peers:
        topic = peer.topic(phase)
        broker.create_topic(topic, ctx.partitions)
        proc = peer.start(phase)
        cpu_first = None
        deadline = time.time() + 300 + events / 1000
        while broker.offsets(topic) < 1:
            if not proc.alive() or time.time() > deadline:
                raise SystemExit(f"{peer.name} delivered nothing; log: {proc.log_path}")
            time.sleep(0.05)
        cpu_first = proc.cpu()
        # The offsets first, cheaply (exact for a producer without
        # transactions, a few commit markers early for one with them);
        # then every record is read back.
        wait_until(lambda: broker.offsets(topic) >= events, deadline - time.time(),
                   f"{peer.name} to drain {events} events", alive=proc.alive)
        cpu = proc.cpu()
        rss = proc.peak_rss()
        threads = proc.threads()
        tail = broker.wait_records(topic, events, 120, f"{peer.name} to drain {events} events", alive=proc.alive)
        proc.stop()
        first, last = tail.first_ms, tail.last_ms
        tail.advance()
        tail.close()
        total = last / 1000 - proc.t_start
        streaming = max((last - first) / 1000, 0.001)
        result["peers"][peer.name] = {
            "start_to_first_s": _round(first / 1000 - proc.t_start, 3),
            "start_to_last_s": _round(total, 3),
            "events_per_second": round(events / streaming),
            "records": tail.count,
            "cpu_seconds_total": _round(cpu, 2),
            "cpu_seconds_per_100k": _round((cpu - cpu_first) / events * 100_000, 3),
            "peak_rss_mib": _round(rss / MIB, 1),
            "threads": threads,
        }
        log(f"  {peer.name}: {total:.2f} s from start ({events / streaming:,.0f} events/s once streaming), "
            f"CPU {cpu:.1f} s, peak RSS {rss / MIB:.0f} MiB")
    return result


def steady(ctx, rate, seconds):
    """pgbench commits `rate` events/s for `seconds`; each event's latency is
    its broker append time minus its created_at."""
    stack, broker = ctx.stack, ctx.broker
    result = {"rate": rate, "seconds": seconds, "load": _load(), "peers": {}}
    phase = f"steady{rate}"
    for peer in ctx.peers:
        log(f"steady {rate:,} events/s for {seconds} s: {peer.name}")
        proc, topic, tail = _start_streaming(ctx, peer, phase)
        watcher = Watcher(broker, topic)
        watcher.start()
        watcher.caught_up(tail.count)
        cpu0 = proc.cpu()
        stack.pgbench(["-R", str(rate), "-T", str(seconds)])
        written = stack.outbox_count()
        _wait_delivered(ctx, peer, proc, topic, tail.count + written, 600, tail)
        visible = watcher.stop()
        cpu = proc.cpu() - cpu0
        rss = proc.peak_rss()
        own = proc.status().get("commit_to_ack_since_start") if hasattr(proc, "status") else None
        # Exactly once: how long each Kafka commit call took (warm-up included).
        commits = proc.histogram_means_ms("walrelay_kafka_commit_seconds") if hasattr(proc, "status") else {}
        proc.stop()
        created = stack.created_at()
        seen = set()
        lat = []
        tail.close()
        for r in tail.records:
            if r.id in seen or r.id not in created:
                continue
            seen.add(r.id)
            lat.append(r.timestamp_ms - created[r.id] * 1000)
        # The same events as a consumer following the topic saw them: after
        # the commit of a transactional producer, plus the fetch's delay.
        seen = [(visible[i] - c) * 1000 for i, c in created.items() if i in visible]
        entry = {"events": written, "achieved_rate": round(written / seconds), **_latencies(lat),
                 "visible_to_consumer": _latencies(seen),
                 "cpu_seconds_per_100k": _round(cpu / written * 100_000, 3), "peak_rss_mib": _round(rss / MIB, 1)}
        if own:
            entry["walrelay_commit_to_ack"] = {k: _round(v) for k, v in own.items() if k.endswith("_ms")}
        commit = commits.get("walrelay_kafka_commit_seconds", {})
        if commit.get("count"):
            entry["kafka_commit_call"] = commit
        result["peers"][peer.name] = entry
        readable = entry["visible_to_consumer"]
        log(f"  readable p50 {readable['p50_ms']} ms, p99 {readable['p99_ms']} ms; appended p50 {entry['p50_ms']} ms, "
            f"p99 {entry['p99_ms']} ms; CPU {entry['cpu_seconds_per_100k']} s per 100k"
            + (f"; {commit['count']} commits, {commit['mean_ms']} ms each" if commit.get("count") else ""))
    return result


def saturated(ctx, seconds):
    """pgbench as fast as it goes (4 clients, one event per commit) while
    each consumer streams: the commit rate the primary keeps, and the
    consumer's CPU per event (from the first commit until it has
    delivered the last)."""
    stack = ctx.stack
    result = {"seconds": seconds, "clients": CLIENTS, "load": _load(), "peers": {}}
    stack.truncate()
    log(f"saturated: pgbench alone for {seconds} s")
    result["no_consumer_tps"] = round(stack.tps(stack.pgbench(["-T", str(seconds)])))
    log(f"  {result['no_consumer_tps']:,} commits/s")
    for peer in [ctx.recvlogical] + ctx.peers:
        log(f"saturated: pgbench for {seconds} s while {peer.name} streams")
        if peer is ctx.recvlogical:
            stack.truncate()
            peer.reset()
            proc = peer.start("saturated")
            time.sleep(1)
        else:
            proc, topic, tail = _start_streaming(ctx, peer, "saturated")
        cpu0 = proc.cpu()
        t_begin = time.time()
        tps = stack.tps(stack.pgbench(["-T", str(seconds)]))
        t_end = time.time()
        written = stack.outbox_count()
        if peer is ctx.recvlogical:
            end = stack.lsn()
            # pg_recvlogical confirms what it wrote each second; WAL written
            # after the last commit (a running-xacts record) may never be
            # confirmed, so a position that stays put counts as done.
            last, still = 0, time.time()
            while True:
                pos = stack.confirmed(peer.slot)
                if pos >= end or (pos == last and time.time() - still > 3):
                    break
                if pos != last:
                    last, still = pos, time.time()
                time.sleep(0.1)
            done = still if pos < end else time.time()
            cpu = proc.cpu() - cpu0
        else:
            # The offsets first (cheap; the CPU is read there, before this
            # script reads every record back), then the records, whose
            # append times say when the last one landed.
            wait_until(lambda: ctx.broker.offsets(topic) >= tail.count + written, 600,
                       f"{peer.name} to deliver {written} events", alive=proc.alive)
            cpu = proc.cpu() - cpu0
            tail = _wait_delivered(ctx, peer, proc, topic, tail.count + written, 600, tail)
            done = tail.last_ms / 1000
            tail.close()
        catch_up = max(0.0, done - t_end)
        delivered = written / (done - t_begin)
        rss = proc.peak_rss()
        threads = proc.threads()
        proc.stop()
        result["peers"][peer.name] = {
            "commits_per_second": round(tps), "events": written,
            "commits_vs_no_consumer": _round(tps / result["no_consumer_tps"], 3),
            "cpu_seconds_per_100k": _round(cpu / written * 100_000, 3),
            "peak_rss_mib": _round(rss / MIB, 1), "threads": threads,
            "catch_up_s": _round(catch_up, 1), "delivered_per_second": round(delivered),
        }
        log(f"  {tps:,.0f} commits/s, CPU {cpu / written * 100_000:.2f} s per 100k, peak RSS {rss / MIB:.0f} MiB, "
            f"caught up {catch_up:.1f} s after the writer stopped")
    return result


def startup(ctx, runs):
    """From the process's start to its first event in Kafka (one event waits
    in the slot)."""
    stack, broker = ctx.stack, ctx.broker
    result = {"runs": runs, "load": _load(), "peers": {}}
    for peer in ctx.peers:
        times = []
        for i in range(runs):
            stack.truncate()
            peer.reset()
            phase = f"startup{i}"
            topic = peer.topic(phase)
            broker.create_topic(topic, ctx.partitions)
            stack.psql(insert_script().split("\n", 1)[1].replace(":agg", "0"))
            proc = peer.start(phase)
            tail = broker.wait_records(topic, 1, 300, f"{peer.name}'s first event", alive=proc.alive)
            rss = proc.peak_rss()
            proc.stop()
            first = tail.first_ms
            tail.close()
            times.append(first / 1000 - proc.t_start)
        times.sort()
        result["peers"][peer.name] = {"first_event_ms": round(times[len(times) // 2] * 1000),
                                      "all_ms": [round(t * 1000) for t in times], "idle_rss_mib": _round(rss / MIB, 1)}
        log(f"startup: {peer.name} first event after {times[len(times) // 2] * 1000:.0f} ms (median of {runs})")
    return result


def crash(ctx, rate, seconds):
    """kill -9 halfway through a steady write, restart at once: the time
    from the restart to the first event committed after the kill in Kafka
    (resumed), to every event committed before the kill in Kafka (caught
    up), and the duplicates (ids in Kafka, read_committed, against rows)."""
    stack, broker = ctx.stack, ctx.broker
    result = {"rate": rate, "seconds": seconds, "load": _load(), "peers": {}}
    for peer in ctx.peers:
        log(f"kill -9 under {rate:,} events/s: {peer.name}")
        proc, topic, tail = _start_streaming(ctx, peer, "crash")
        writer = stack.pgbench(["-R", str(rate), "-T", str(seconds)], background=True)
        time.sleep(seconds / 2)
        t_kill = time.time()
        proc.kill9()
        proc = peer.start("crash")
        t_restart = proc.t_start
        out, err = writer.communicate()
        if writer.returncode != 0:
            raise SystemExit(f"pgbench failed: {err}")
        created = stack.created_at()
        rows = len(created)
        deadline = time.time() + 600
        while True:
            if broker.offsets(topic) >= tail.count + rows:
                tail.advance()
                records = tail.records
                ids = collections.Counter(r.id for r in records if r.id in created)
                if all(i in ids for i in created):
                    break
            if time.time() > deadline:
                raise SystemExit(f"{peer.name} did not deliver every event after the restart; log: {proc.log_path}")
            if not proc.alive():
                raise SystemExit(f"{peer.name} exited after the restart; log: {proc.log_path}")
            time.sleep(0.5)
        proc.stop()
        tail.close()
        first_seen = {}
        for r in records:
            if r.id in created and (r.id not in first_seen or r.timestamp_ms < first_seen[r.id]):
                first_seen[r.id] = r.timestamp_ms
        # Only the restarted process can deliver a row committed after the
        # kill (a request the killed one had sent may still be appended
        # after the restart).
        after = [first_seen[i] for i, c in created.items() if c > t_kill]
        before_kill = [first_seen[i] for i, c in created.items() if c < t_kill]
        duplicates = sum(c - 1 for c in ids.values())
        entry = {
            "rows": rows, "records": sum(ids.values()), "duplicates": duplicates,
            "missing": sum(1 for i in created if i not in ids),
            "resume_ms": round((min(after) / 1000 - t_restart) * 1000) if after else None,
            "caught_up_ms": round(max(0.0, max(before_kill) / 1000 - t_restart) * 1000) if before_kill else None,
            "restart_after_kill_ms": round((t_restart - t_kill) * 1000),
        }
        result["peers"][peer.name] = entry
        log(f"  resumed {entry['resume_ms']} ms after the restart, every earlier event in Kafka after "
            f"{entry['caught_up_ms']} ms; {duplicates} duplicates, {entry['missing']} missing of {rows}")
    return result


def recovery(ctx, relay, partitions, earlier=20_000):
    """walrelay exactly once: a restart's cost of reading partition tails.

    A relay publishes `earlier` events to `partitions` partitions (topics
    of 8 partitions each, as many as it takes: 800 is 100 topics x 8) and
    is killed (kill -9); events for every partition are written; a new
    relay starts: the time to its first event published (one tail read)
    and to all of them (every partition's tail read)."""
    stack = ctx.stack
    stack.truncate()
    relay.reset()
    topics = -(-partitions // 8)
    if partitions % topics:
        raise SystemExit(f"--recovery-partitions: {partitions} is not a multiple of 8 (or at most 8)")
    script = insert_script(f"p{partitions}-", topics=topics)
    args = ["--topic-partitions", str(partitions // topics)]
    log(f"recovery with {partitions} partitions ({topics} topics x {partitions // topics}): {earlier:,} earlier events")
    proc = relay.start("recovery", args)
    proc.wait_ready()
    stack.pgbench(["-t", str(earlier // CLIENTS)], script)
    target = stack.lsn()
    wait_until(lambda: stack.confirmed(relay.slot) >= target, 300, "the earlier events to be confirmed", alive=proc.alive)
    proc.kill9()
    # 1,000 aggregates over the partitions: every partition gets events.
    new = max(2_000, 8 * partitions)
    stack.pgbench(["-t", str(new // CLIENTS)], script)
    proc = relay.start("recovery", args)
    first = None
    while True:
        published = proc.published()
        if published >= 1 and first is None:
            first = time.time() - proc.t_start
        if published >= new:
            break
        if not proc.alive():
            raise SystemExit("walrelay exited; log: " + proc.log_path)
        time.sleep(0.005)
    every = time.time() - proc.t_start
    status = proc.status()
    proc.stop()
    log(f"  first new event after {first * 1000:.0f} ms, {new} events in every partition after {every * 1000:.0f} ms")
    return {"partitions": partitions, "topics": topics, "earlier_events": earlier, "new_events": new,
            "first_event_ms": round(first * 1000), "all_partitions_ms": round(every * 1000),
            "skipped": status.get("events_skipped", 0)}


def poll_source(ctx, relay, binary, events, rate, seconds):
    """walrelay run --source poll on the same table: drain a backlog, then
    a steady rate (latency: the record's ce_time, the row's created_at,
    against its append time). Last: its setup adds to the table."""
    stack, broker = ctx.stack, ctx.broker
    for peer in ctx.peers + [ctx.recvlogical, relay]:
        stack.drop_slot(peer.slot)
    stack.truncate()
    subprocess.run([binary, "setup", "--source", "poll", "--pg-url", stack.url], check=True, stdout=subprocess.DEVNULL)
    log(f"polling source: writing a backlog of {events:,} rows")
    stack.pgbench(["-t", str(events // CLIENTS)])
    backlog = stack.outbox_count()
    topic = "bench.polldrain.walrelay-poll.order"
    broker.create_topic(topic, ctx.partitions)
    proc = relay.start_poll("polldrain")
    # The topic's offsets first (cheap; exact, the polling source sends no
    # transactions): a count(*) of the table every 100 ms took a core of the
    # two from the database the relay drains.
    wait_until(lambda: broker.offsets(topic) >= backlog, 600 + backlog / 500, "the polling source to publish the backlog",
               interval=0.1, alive=proc.alive)
    wait_until(lambda: stack.outbox_count() == 0, 60, "the polling source to settle the backlog",
               interval=0.5, alive=proc.alive)
    cpu, rss = proc.cpu(), proc.peak_rss()
    # Where a batch's time goes: the claim (one at a time) and the settle.
    phases = proc.histogram_means_ms("walrelay_poll_claim_seconds", "walrelay_poll_settle_seconds")
    proc.stop()
    tail = broker.tail(topic)
    tail.advance()
    tail.close()
    total = tail.last_ms / 1000 - proc.t_start
    result = {"drain": {"events": backlog, "start_to_last_s": _round(total, 3),
                        "events_per_second": round(backlog / total),
                        "cpu_seconds_per_100k": _round(cpu / backlog * 100_000, 3), "peak_rss_mib": _round(rss / MIB, 1),
                        "claim": phases["walrelay_poll_claim_seconds"], "settle": phases["walrelay_poll_settle_seconds"]}}
    log(f"  {total:.2f} s ({backlog / total:,.0f} rows/s); claim {phases['walrelay_poll_claim_seconds']}, "
        f"settle {phases['walrelay_poll_settle_seconds']}")
    if seconds > 0:
        log(f"polling source: steady {rate:,} events/s for {seconds} s")
        topic = "bench.pollsteady.walrelay-poll.order"
        broker.create_topic(topic, ctx.partitions)
        proc = relay.start_poll("pollsteady")
        proc.wait_ready()
        stack.pgbench(["-R", str(rate), "-T", str(seconds)])
        wait_until(lambda: stack.outbox_count() == 0, 120, "the polling source to catch up", interval=0.1, alive=proc.alive)
        own = proc.status().get("commit_to_ack_since_start", {})
        proc.stop()
        lat = []
        for r in broker.records(topic, headers=True):
            created = datetime.datetime.fromisoformat(r.headers["ce_time"].decode()).timestamp()
            lat.append(r.timestamp_ms - created * 1000)
        result["steady"] = {"rate": rate, "seconds": seconds, **_latencies(lat),
                            "walrelay_created_to_ack": {k: _round(v) for k, v in own.items() if k.endswith("_ms")}}
        log(f"  p50 {result['steady']['p50_ms']} ms, p99 {result['steady']['p99_ms']} ms")
    return result


def scale(ctx, relay, n):
    """The scale curve: walrelay exactly once drains a backlog of n events
    (written ten to a transaction, so the largest is written in a minute or
    two), against pg_recvlogical on the same WAL: time, events/s, CPU per
    event and peak RSS. Done is the slot confirmed at the end of the
    backlog (every event acknowledged, its transaction committed); the
    last event's time is its append time, read from each partition's end."""
    stack, broker = ctx.stack, ctx.broker
    stack.truncate()
    relay.reset()
    ctx.recvlogical.reset()
    log(f"scale: writing a backlog of {n:,} events (10 per transaction)")
    t = time.time()
    stack.pgbench(["-t", str(max(n // (CLIENTS * 10), 1))], insert_script(rows=10))
    events = stack.outbox_count()
    end_text = stack.psql("SELECT pg_current_wal_lsn()::text")
    end = lsn_to_int(end_text)
    log(f"  {events:,} events in {time.time() - t:.1f} s")
    result = {"events": events, "rows_per_transaction": 10, "load": _load(), "peers": {}}
    seconds, cpu, rss = ctx.recvlogical.drain(end_text)
    result["peers"]["pg_recvlogical"] = {
        "start_to_last_s": _round(seconds, 3), "events_per_second": round(events / seconds),
        "cpu_seconds_per_100k": _round(cpu / events * 100_000, 3), "peak_rss_mib": _round(rss / MIB, 1)}
    log(f"  pg_recvlogical: {seconds:.2f} s ({events / seconds:,.0f} events/s)")
    phase = f"scale{n}"
    topic = relay.topic(phase)
    broker.create_topic(topic, ctx.partitions)
    proc = relay.start(phase)
    wait_until(lambda: stack.confirmed(relay.slot) >= end, 600 + events / 2_000,
               f"{relay.name} to drain {events:,} events", interval=0.2, alive=proc.alive)
    cpu, rss = proc.cpu(), proc.peak_rss()
    published = proc.status().get("events_published")
    proc.stop()
    total = broker.last_append_ms(topic) / 1000 - proc.t_start
    result["peers"][relay.name] = {
        "start_to_last_s": _round(total, 3), "events_per_second": round(events / total),
        "cpu_seconds_per_100k": _round(cpu / events * 100_000, 3), "peak_rss_mib": _round(rss / MIB, 1),
        "events_published": published}
    log(f"  {relay.name}: {total:.2f} s ({events / total:,.0f} events/s), CPU {cpu:.1f} s, peak RSS {rss / MIB:.0f} MiB")
    return result
