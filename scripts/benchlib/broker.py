"""The broker side of a benchmark: topics made for one peer and one
measure, and reading them back. Every topic stamps its records with the
broker's clock (message.timestamp.type = LogAppendTime), so a record's
timestamp is when Apache Kafka appended it, whoever produced it: the same
clock for walrelay and Debezium."""

import gc

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


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

    def _consumer(self):
        return Consumer({
            "bootstrap.servers": self.brokers,
            "group.id": "walrelay-bench",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
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

    def count(self, topic):
        """Records in the topic (the sum of its partitions' high watermarks:
        the relays here write no transactions, so every offset is a record)."""
        total = 0
        for p in self.partitions(topic):
            _, high = self.meta.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            total += high
        return total

    def records(self, topic, headers=False):
        """Every record of the topic, read under read_committed."""
        consumer = self._consumer()
        ends = {}
        for p in self.partitions(topic):
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            if high > 0:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out = []
        while ends:
            for m in consumer.consume(num_messages=10000, timeout=1.0):
                if m.error():
                    continue
                p, offset = m.partition(), m.offset()
                hs = m.headers() or []
                event_id = next((v.decode() for k, v in hs if k == "id"), None)
                out.append(Record(event_id, m.timestamp()[1], p, offset, dict(hs) if headers else None))
                if p in ends and offset + 1 >= ends[p]:
                    del ends[p]
        consumer.close()
        return out

    def record_at(self, topic, partition, offset):
        consumer = self._consumer()
        consumer.assign([TopicPartition(topic, partition, offset)])
        try:
            while True:
                for m in consumer.consume(num_messages=1, timeout=1.0):
                    if not m.error():
                        return Record(None, m.timestamp()[1], m.partition(), m.offset(), None)
        finally:
            consumer.close()

    def edges(self, topic):
        """Append times (ms) of the topic's first and last records."""
        first = last = None
        for p in self.partitions(topic):
            _, high = self.meta.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)
            if high == 0:
                continue
            a = self.record_at(topic, p, 0).timestamp_ms
            b = self.record_at(topic, p, high - 1).timestamp_ms
            first = a if first is None else min(first, a)
            last = b if last is None else max(last, b)
        return first, last

    def close(self):
        """Before the broker stops: a client left open logs every failed reconnect."""
        self.meta.close()
        self.admin = None
        gc.collect()
