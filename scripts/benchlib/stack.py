"""The database side of a benchmark: the stack scripts/stack defines
(PostgreSQL with the benchmark's settings and one Apache Kafka node) in a
temporary directory, and the SQL and pgbench calls the workloads make."""

import glob
import os
import re
import shutil
import subprocess
import tempfile

from .util import ROOT, log

PAYLOAD = (
    '{"order_id": "order-:agg", "customer": {"id": :agg, "email": "customer-:agg@example.com", "tier": "gold"}, '
    '"items": [{"sku": "SKU-1001", "qty": 2, "price": 12.5}, {"sku": "SKU-2002", "qty": 1, "price": 99.0}], '
    '"currency": "EUR", "total": 124.0, "shipping": {"city": "Zurich", "country": "CH", "express": true}}'
)
AGGREGATES = 1000
CLIENTS = 4


def insert_script(aggregate_type="order", topics=1, rows=1):
    """One outbox row per transaction: about 310 bytes of JSON, 1,000
    aggregates. With `topics` above 1, each row's aggregate type (and so
    its topic) is `<aggregate_type>1` .. `<aggregate_type><topics>` at
    random; with `rows` above 1, each transaction inserts that many rows
    (a faster writer, for the largest backlogs)."""
    lines = [f"\\set agg random(1, {AGGREGATES})"]
    if topics > 1:
        lines.append(f"\\set t random(1, {topics})")
        kind = f"'{aggregate_type}' || :t"
    else:
        kind = f"'{aggregate_type}'"
    values = f"{kind}, 'order-' || :agg, 'OrderPlaced', '" + PAYLOAD + "'"
    if rows > 1:
        insert = ("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) "
                  f"SELECT {values} FROM generate_series(1, {rows});")
    else:
        insert = f"INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ({values});"
    return "\n".join(lines + [insert]) + "\n"


def lsn_to_int(text):
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


class Stack:
    """PostgreSQL and Apache Kafka under a temporary directory, removed at the end."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="walrelay-bench-")
        with open(os.path.join(self.dir, "stack.log"), "w") as out:
            subprocess.run([os.path.join(ROOT, "scripts/stack"), "up", self.dir, "--bench"],
                           check=True, stdout=out, stderr=subprocess.STDOUT)
        env = {}
        with open(os.path.join(self.dir, "stack.env")) as f:
            for line in f:
                key, _, value = line.strip().partition("=")
                env[key] = value
        self.bindir = env["PG_BINDIR"]
        # psql and pgbench: beside the server, else Debian's (a server from
        # scripts/fetch-postgres ships none; newer clients talk to it).
        self.client_bindir = self.bindir
        if not os.path.exists(os.path.join(self.bindir, "psql")):
            debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"), key=lambda p: int(p.split("/")[4]))
            self.client_bindir = os.path.dirname(debian[-1]) if debian else self.bindir
        self.pg_port = int(env["PG_PORT"])
        self.url = env["PG_URL"]
        self.brokers = env["BROKERS"]
        self.kafka_dir = env["KAFKA_DIR"]

    def path(self, name):
        return os.path.join(self.dir, name)

    def psql(self, sql):
        out = subprocess.run(
            [f"{self.client_bindir}/psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.url, "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    def rows(self, sql):
        """The rows of a query, each a list of text fields."""
        out = subprocess.run(
            [f"{self.client_bindir}/psql", "-X", "-A", "-t", "-q", "-F", "\t", "-v", "ON_ERROR_STOP=1", "-d", self.url, "-c", sql],
            check=True, capture_output=True, text=True,
        )
        return [line.split("\t") for line in out.stdout.splitlines() if line]

    def lsn(self):
        return lsn_to_int(self.psql("SELECT pg_current_wal_lsn()::text"))

    def confirmed(self, slot):
        text = self.psql(f"SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = '{slot}'")
        return lsn_to_int(text) if text else 0

    def outbox_count(self):
        return int(self.psql("SELECT count(*) FROM outbox"))

    def created_at(self):
        """Every outbox row's id and created_at (Unix seconds)."""
        return {r[0]: float(r[1]) for r in self.rows("SELECT id, extract(epoch FROM created_at) FROM outbox")}

    def truncate(self):
        self.psql("TRUNCATE outbox")

    def reset_slot(self, slot):
        """The slot, recreated at the current end of WAL: it holds nothing
        written before, so each measure streams only its own rows."""
        self.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")
        self.psql(f"SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')")

    def drop_slot(self, slot):
        self.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")

    def pgbench(self, args, script=None, background=False):
        """pgbench with 4 clients on 2 threads, one outbox row per
        transaction. Returns its output, or the process when in the background."""
        path = self.path("insert.sql")
        with open(path, "w") as f:
            f.write(script or insert_script())
        cmd = [f"{self.client_bindir}/pgbench", "-n", "-f", path, "-c", str(CLIENTS), "-j", "2"] + args + [self.url]
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

    @staticmethod
    def tps(output):
        m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", output)
        return float(m.group(1)) if m else None

    def close(self, keep=False):
        subprocess.run([os.path.join(ROOT, "scripts/stack"), "down", self.dir, "--immediate"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if keep:
            log(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
