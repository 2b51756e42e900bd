"""The broker side of a benchmark: topics made for one peer and one
measure, and reading them back. Every topic stamps its records with the
broker's clock (message.timestamp.type = LogAppendTime), so a record's
timestamp is when Apache Kafka appended it, whoever produced it: the same
clock for walrelay and Debezium."""

import gc
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


# Errors a watermark query meets while a partition's leader is being chosen.
MOMENTARY = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._TIMED_OUT,
    KafkaError._TRANSPORT,
}


class Record:
    __slots__ = ("id", "timestamp_ms", "partition", "offset", "headers")

    def __init__(self, id, timestamp_ms, partition, offset, headers):
        self.id = id
        self.timestamp_ms = timestamp_ms
        self.partition = partition
        self.offset = offset
        self.headers = headers


class Broker:
    def __init__(self, brokers):
        self.brokers = brokers
        self.admin = AdminClient({"bootstrap.servers": brokers})
        self.meta = self._consumer()

    def _consumer(self, **settings):
        return Consumer({
            "bootstrap.servers": self.brokers,
            "group.id": "walrelay-bench",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            **settings,
        })

    def create_topic(self, name, partitions=1):
        futures = self.admin.create_topics([NewTopic(
            name, num_partitions=partitions, replication_factor=1,
            config={"message.timestamp.type": "LogAppendTime"},
        )])
        futures[name].result(timeout=30)

    def partitions(self, topic):
        meta = self.meta.list_topics(topic, timeout=10)
        return sorted(meta.topics[topic].partitions)

    def offsets(self, topic):
        """The sum of the partitions' stable end offsets (read_committed): an
        upper bound on the records a read_committed consumer can read now
        (a transactional producer's commit markers take offsets too)."""
        total = 0
        for p in self.partitions(topic):
            try:
                _, high = self.meta.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            except KafkaException as e:
                # A leader moving (or just elected for a new topic) answers
                # NOT_LEADER for a moment: count nothing yet, ask again.
                if e.args and (e.args[0].retriable() or e.args[0].code() in MOMENTARY):
                    return 0
                raise
            total += high
        return total

    def last_append_ms(self, topic):
        """The latest append time (LogAppendTime) among the last records of
        every partition, read under read_committed."""
        consumer = self._consumer()
        latest = None
        try:
            for p in self.partitions(topic):
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
                if high <= low:
                    continue
                # The last few offsets: a transaction's commit marker takes one.
                consumer.assign([TopicPartition(topic, p, max(low, high - 20))])
                # Read until the partition has nothing more for a second.
                deadline, read = time.time() + 30, False
                while time.time() < deadline:
                    m = consumer.poll(1.0)
                    if m is None:
                        if read:
                            break
                        continue
                    if m.error():
                        continue
                    ts, read = m.timestamp()[1], True
                    latest = ts if latest is None else max(latest, ts)
        finally:
            consumer.close()
        if latest is None:
            raise SystemExit(f"{topic} holds no record")
        return latest

    def tail(self, topic, headers=False):
        return Tail(self, topic, headers)

    def wait_records(self, topic, n, timeout, what, alive=None, tail=None):
        """Waits until a read_committed consumer has read n records of the
        topic; returns its Tail (every record read). Offsets are polled
        first, cheaply; records are read only once there can be n."""
        tail = tail or self.tail(topic)
        deadline = time.time() + timeout
        while True:
            if self.offsets(topic) >= n:
                tail.advance()
                if tail.count >= n:
                    return tail
            if alive is not None and not alive():
                raise SystemExit(f"gave up waiting for {what}: the process exited")
            if time.time() > deadline:
                raise SystemExit(f"gave up waiting for {what} after {timeout:.0f} s ({tail.count} records)")
            time.sleep(0.05)

    def records(self, topic, headers=False):
        """Every record of the topic, read under read_committed."""
        tail = self.tail(topic, headers)
        tail.advance()
        tail.close()
        return tail.records

    def close(self):
        """Before the broker stops: a client left open logs every failed reconnect."""
        self.meta.close()
        self.admin = None
        gc.collect()


class Tail:
    """A read_committed consumer of one topic from its beginning, read as
    far as the broker lets it each time advance() is called."""

    def __init__(self, broker, topic, headers=False):
        self.consumer = broker._consumer()
        self.partitions = [TopicPartition(topic, p) for p in broker.partitions(topic)]
        self.consumer.assign([TopicPartition(topic, p.partition, OFFSET_BEGINNING) for p in self.partitions])
        self.headers = headers
        self.records = []
        self.count = 0
        self.first_ms = None
        self.last_ms = None

    def advance(self, timeout=60):
        """Reads up to the stable end of every partition as it is now (its
        position passes commit markers too)."""
        ends = {}
        for tp in self.partitions:
            _, high = self.consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            ends[tp.partition] = high
        deadline = time.time() + timeout
        progress = time.time()
        while True:
            positions = {tp.partition: tp.offset for tp in self.consumer.position(self.partitions)}
            if all(ends[p] == 0 or positions.get(p, -1) >= ends[p] for p in ends):
                return
            # A position can stop just before a trailing commit marker.
            if time.time() - progress > 2 and all(ends[p] == 0 or positions.get(p, -1) >= ends[p] - 1 for p in ends):
                return
            if time.time() > deadline:
                raise SystemExit(f"reading {self.partitions[0].topic} back did not reach its end in {timeout} s")
            batch = self.consumer.consume(num_messages=10000, timeout=0.2)
            if batch:
                progress = time.time()
            for m in batch:
                if m.error():
                    continue
                hs = m.headers() or []
                event_id = next((v.decode() for k, v in hs if k == "id"), None)
                ts = m.timestamp()[1]
                self.records.append(Record(event_id, ts, m.partition(), m.offset(), dict(hs) if self.headers else None))
                self.count += 1
                self.first_ms = ts if self.first_ms is None else min(self.first_ms, ts)
                self.last_ms = ts if self.last_ms is None else max(self.last_ms, ts)

    def close(self):
        self.consumer.close()


class Watcher(threading.Thread):
    """A read_committed consumer that follows a topic as it is written and
    notes when each event id first became readable (this machine's clock):
    what a consumer sees, after a transactional producer's commit too.

    It fetches with fetch.wait.max.ms=2 (librdkafka's default is 500: an
    idle fetch would wait up to half a second and the figure would be the
    client's cadence, not the producer's) and fetch.min.bytes=1, so an
    event is read within a few milliseconds of becoming readable."""

    def __init__(self, broker, topic):
        super().__init__(daemon=True)
        self.consumer = broker._consumer(**{"fetch.wait.max.ms": 2, "fetch.min.bytes": 1,
                                            "fetch.error.backoff.ms": 5})
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in broker.partitions(topic)])
        self.seen = {}
        self.stopping = threading.Event()

    def run(self):
        # poll() returns as soon as one record is there (consume() would
        # wait out its timeout for a batch): each is stamped when it
        # arrives.
        while not self.stopping.is_set():
            m = self.consumer.poll(0.05)
            if m is None or m.error():
                continue
            now = time.time()
            event_id = next((v.decode() for k, v in (m.headers() or []) if k == "id"), None)
            if event_id is not None and event_id not in self.seen:
                self.seen[event_id] = now
        self.consumer.close()

    def caught_up(self, n, timeout=120):
        """Waits until it has read n events (what the topic already holds):
        from then on it is fetching as records arrive. A consumer's first
        second (metadata, offsets, the first fetches) would otherwise show
        as latency of the first events measured."""
        deadline = time.time() + timeout
        while len(self.seen) < n:
            if time.time() > deadline:
                raise SystemExit(f"the following consumer read {len(self.seen)} of {n} events in {timeout} s")
            time.sleep(0.05)
        time.sleep(0.5)

    def stop(self):
        self.stopping.set()
        self.join()
        return self.seen
