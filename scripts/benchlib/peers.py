"""The consumers of the slot that the benchmark compares, each on its own
slot over the same outbox table, writing to the same Apache Kafka:

  walrelay-eo     walrelay run, exactly once (the default)
  walrelay-alo    walrelay run --delivery at-least-once
  debezium        Debezium's PostgreSQL connector with the Outbox Event
                  Router, on Kafka Connect in standalone mode
  pg_recvlogical  PostgreSQL's own client, pgoutput to /dev/null: the
                  physical limit (no broker)

A peer is started for one measure (`phase`) and writes to topics of its
own for it, so every count and timestamp belongs to one peer and one
measure.
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

from .util import CACHE, ROOT, free_port, log

DEBEZIUM_VERSION = "3.6.1.Final"
# What Debezium 3.6.1's pom is built against (connect-api 4.3.0). Connect
# 4.4.0 fails in the task's start: Debezium's metrics call
# org.apache.kafka.common.utils.Sanitizer, which 4.4 no longer has.
CONNECT_VERSION = "4.3.0"
# Debezium's container image documents HEAP_OPTS as recommended, with
# -Xms1G -Xmx1G as its value when unset; the rest is what Kafka's
# kafka-run-class.sh gives every Connect worker (KAFKA_JVM_PERFORMANCE_OPTS).
DEBEZIUM_JVM = [
    "-Xms1G", "-Xmx1G",
    "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent", "-XX:MaxInlineLevel=15", "-Djava.awt.headless=true",
]


def _cpu_seconds(stat):
    """User + system seconds from a /proc/.../stat line."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Process:
    """A started consumer process: its CPU time (every thread, from
    /proc/PID/stat) and peak resident set (VmHWM)."""

    def __init__(self, cmd, log_path, cwd=None):
        self.log_path = log_path
        self.t_start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log_path, "a"),
                                     cwd=cwd, start_new_session=True)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def cpu(self):
        with open(f"/proc/{self.pid}/stat") as f:
            return _cpu_seconds(f.read())

    def cpu_by_thread(self):
        """User + system seconds of each live thread, summed by thread name."""
        by_name = {}
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except FileNotFoundError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            by_name[name] = round(by_name.get(name, 0) + _cpu_seconds(stat), 2)
        return by_name

    def peak_rss(self):
        with open(f"/proc/{self.pid}/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024

    def threads(self):
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def kill9(self):
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout=60):
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class WalrelayProcess(Process):
    def __init__(self, cmd, log_path, http_port):
        super().__init__(cmd, log_path)
        self.http_port = http_port

    def status(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/status", timeout=5) as r:
            return json.load(r)

    def histogram_means_ms(self, *names):
        """The mean and count of each Prometheus histogram named, from /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for name in names:
            sums = re.findall(rf"^{name}_sum(?:{{[^}}]*}})? (\S+)$", text, re.M)
            counts = re.findall(rf"^{name}_count(?:{{[^}}]*}})? (\S+)$", text, re.M)
            total, count = sum(map(float, sums)), sum(map(float, counts))
            out[name] = {"mean_ms": round(total / count * 1000, 2) if count else None, "count": int(count)}
        return out

    def published(self):
        """Events published so far, 0 while the HTTP server is not up."""
        try:
            return self.status()["events_published"]
        except Exception:
            return 0

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2):
                    return
            except Exception:
                if not self.alive():
                    break
                time.sleep(0.1)
        raise SystemExit("walrelay did not become ready; log: " + self.log_path)


class Walrelay:
    def __init__(self, binary, stack, delivery, extra_args):
        self.binary = binary
        self.stack = stack
        self.delivery = delivery
        self.name = "walrelay-eo" if delivery == "exactly-once" else "walrelay-alo"
        self.label = "walrelay, exactly once" if delivery == "exactly-once" else "walrelay, at least once"
        self.slot = "bench_" + self.name.replace("-", "_")
        self.extra_args = extra_args
        self.starts = 0

    def settings(self):
        return {"command": [self.binary, "run", "--slot", self.slot, "--delivery", self.delivery,
                            "--heartbeat-interval", "0", "--topic-template", "bench.<measure>.<peer>.{aggregate_type}"]
                + self.extra_args,
                "publication": "walrelay (walrelay setup)"}

    def reset(self):
        self.stack.reset_slot(self.slot)

    def topic(self, phase, aggregate_type="order"):
        return f"bench.{phase}.{self.name}.{aggregate_type}"

    def start(self, phase, args=None, slot=None):
        self.starts += 1
        http_port = free_port()
        cmd = [self.binary, "run", "--pg-url", self.stack.url, "--brokers", self.stack.brokers,
               "--slot", slot or self.slot, "--delivery", self.delivery, "--heartbeat-interval", "0",
               "--http-addr", f"127.0.0.1:{http_port}",
               "--topic-template", f"bench.{phase}.{self.name}.{{aggregate_type}}"] + self.extra_args + (args or [])
        return WalrelayProcess(cmd, self.stack.path(f"{self.name}-{phase}-{self.starts}.log"), http_port)

    def start_poll(self, phase):
        """walrelay run --source poll (its own defaults: exactly once)."""
        self.starts += 1
        http_port = free_port()
        cmd = [self.binary, "run", "--source", "poll", "--pg-url", self.stack.url, "--brokers", self.stack.brokers,
               "--http-addr", f"127.0.0.1:{http_port}",
               "--topic-template", f"bench.{phase}.walrelay-poll.{{aggregate_type}}"] + self.extra_args
        return WalrelayProcess(cmd, self.stack.path(f"walrelay-poll-{phase}-{self.starts}.log"), http_port)


def fetch_debezium():
    """Debezium's connector and Kafka Connect from Maven Central, once."""
    libs = os.path.join(CACHE, f"debezium-{DEBEZIUM_VERSION}-connect-{CONNECT_VERSION}", "libs")
    if os.path.exists(os.path.join(libs, ".complete")):
        return libs
    log(f"fetching Debezium {DEBEZIUM_VERSION} and Kafka Connect {CONNECT_VERSION} from Maven Central into {libs} (once)")
    work = os.path.join(os.path.dirname(libs), "pom")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(ROOT, "scripts/debezium.pom.xml")) as f:
        pom = f.read().replace("@DEBEZIUM_VERSION@", DEBEZIUM_VERSION).replace("@CONNECT_VERSION@", CONNECT_VERSION)
    with open(os.path.join(work, "pom.xml"), "w") as f:
        f.write(pom)
    out = subprocess.run(["mvn", "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={libs}"],
                         cwd=work, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"could not fetch Debezium with Maven:\n{out.stdout}{out.stderr}")
    open(os.path.join(libs, ".complete"), "w").close()
    return libs


class Debezium:
    """Debezium's PostgreSQL connector on Kafka Connect (standalone), with
    the Outbox Event Router routing as walrelay does: a topic per aggregate
    type, the aggregate id as the key, the payload's JSON text as the value,
    the event id in an `id` header (and event_type in one, as walrelay)."""

    name = "debezium"
    label = f"Debezium {DEBEZIUM_VERSION}"
    slot = "bench_debezium"
    publication = "bench_debezium"

    def __init__(self, stack, poll_interval_ms, offset_flush_ms):
        self.stack = stack
        self.libs = fetch_debezium()
        self.poll_interval_ms = poll_interval_ms
        self.offset_flush_ms = offset_flush_ms
        self.offsets = stack.path("debezium.offsets")
        self.starts = 0
        stack.psql(f"CREATE PUBLICATION {self.publication} FOR TABLE public.outbox")

    def worker(self, rest_port):
        return {
            "bootstrap.servers": self.stack.brokers,
            "key.converter": "org.apache.kafka.connect.storage.StringConverter",
            # The router's value is the payload column as text (jsonb is a
            # string to Debezium): StringConverter writes that JSON text
            # as is, the bytes walrelay writes.
            "value.converter": "org.apache.kafka.connect.storage.StringConverter",
            "offset.storage.file.filename": self.offsets,
            # Connect's default is 60 s: after a crash, up to a minute of
            # events again. 1 s is walrelay's status interval.
            "offset.flush.interval.ms": str(self.offset_flush_ms),
            "listeners": f"http://127.0.0.1:{rest_port}",
            # What Connect's own start-up warning advises: every plugin here
            # has a ServiceLoader manifest, so no classpath scan.
            "plugin.discovery": "service_load",
        }

    def connector(self, phase):
        return {
            "name": "outbox",
            "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
            "tasks.max": "1",
            "plugin.name": "pgoutput",
            "database.hostname": "127.0.0.1",
            "database.port": str(self.stack.pg_port),
            "database.user": "postgres",
            "database.password": "",
            "database.dbname": "postgres",
            "topic.prefix": "bench",
            "slot.name": self.slot,
            "publication.name": self.publication,
            "publication.autocreate.mode": "disabled",
            "table.include.list": "public.outbox",
            # The slot is made before the rows: stream it, snapshot nothing.
            "snapshot.mode": "no_data",
            "tombstones.on.delete": "false",
            # Default 500 ms: a batch waits that long to fill (2,048 events)
            # before it is handed to Connect, which puts up to half a second
            # on every event at 1,000 events/s. A user who wants latency
            # lowers it.
            "poll.interval.ms": str(self.poll_interval_ms),
            "transforms": "outbox",
            "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
            "transforms.outbox.table.field.event.id": "id",
            "transforms.outbox.table.field.event.key": "aggregate_id",
            "transforms.outbox.table.field.event.payload": "payload",
            "transforms.outbox.route.by.field": "aggregate_type",
            "transforms.outbox.route.topic.replacement": f"bench.{phase}.{self.name}.${{routedByValue}}",
            "transforms.outbox.table.fields.additional.placement": "event_type:header:event_type",
        }

    def settings(self):
        return {"jvm": DEBEZIUM_JVM, "main": "org.apache.kafka.connect.cli.ConnectStandalone",
                "worker": {k: v for k, v in self.worker(0).items() if k not in ("bootstrap.servers", "listeners", "offset.storage.file.filename")},
                "connector": {k: v for k, v in self.connector("<measure>").items() if not k.startswith("database.")},
                "versions": {"debezium": DEBEZIUM_VERSION, "kafka_connect": CONNECT_VERSION}}

    def reset(self):
        self.stack.reset_slot(self.slot)
        if os.path.exists(self.offsets):
            os.remove(self.offsets)

    def topic(self, phase, aggregate_type="order"):
        return f"bench.{phase}.{self.name}.{aggregate_type}"

    def start(self, phase):
        self.starts += 1
        conf = self.stack.path(f"debezium-{phase}-{self.starts}")
        os.makedirs(conf, exist_ok=True)
        for name, props in (("worker.properties", self.worker(free_port())), ("connector.properties", self.connector(phase))):
            with open(os.path.join(conf, name), "w") as f:
                f.writelines(f"{k}={v}\n" for k, v in props.items())
        with open(os.path.join(conf, "log4j2.properties"), "w") as f:
            f.write(
                "rootLogger.level=INFO\nrootLogger.appenderRef.file.ref=file\n"
                "appender.file.type=File\nappender.file.name=file\n"
                f"appender.file.fileName={conf}/connect.log\n"
                "appender.file.layout.type=PatternLayout\nappender.file.layout.pattern=[%d] %p %m (%c)%n\n"
            )
        cmd = ["java"] + DEBEZIUM_JVM + [f"-Dlog4j2.configurationFile={conf}/log4j2.properties",
                                         "-cp", os.path.join(self.libs, "*"),
                                         "org.apache.kafka.connect.cli.ConnectStandalone",
                                         os.path.join(conf, "worker.properties"), os.path.join(conf, "connector.properties")]
        return Process(cmd, os.path.join(conf, "stdout.log"))


class RecvLogical:
    """pg_recvlogical on a slot of its own, pgoutput to /dev/null."""

    name = "pg_recvlogical"
    label = "pg_recvlogical"
    slot = "bench_recvlogical"

    def __init__(self, stack):
        self.stack = stack

    def reset(self):
        self.stack.reset_slot(self.slot)

    def command(self, extra):
        return [f"{self.stack.bindir}/pg_recvlogical", "-d", self.stack.url, "--slot", self.slot, "--start",
                "-f", "/dev/null", "-o", "proto_version=3", "-o", "publication_names=walrelay",
                "-o", "messages=true"] + extra

    def drain(self, end_lsn_text):
        """Streams the slot to end_lsn: (seconds, CPU seconds) of the process."""
        t = time.time()
        proc = subprocess.Popen(self.command(["--endpos", end_lsn_text, "--no-loop"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.time() - t
        if proc.returncode != 0:
            raise SystemExit(f"pg_recvlogical failed: {proc.stderr.read().decode()}")
        return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024

    def start(self, phase):
        # Status every second: the slot's confirmed position shows when it
        # has read everything.
        return Process(self.command(["--no-loop", "-s", "1", "-F", "1"]), self.stack.path(f"recvlogical-{phase}.log"))
