"""scripts/bench's parts, one file per concern:

  stack.py      PostgreSQL and Apache Kafka as scripts/stack defines them; SQL and pgbench
  broker.py     topics stamped by the broker (LogAppendTime) and reading them back
  peers.py      the consumers compared: walrelay (both deliveries), Debezium on Kafka
                Connect, pg_recvlogical
  workloads.py  the measures, each run for every consumer in turn
  report.py     machine, versions, load, and the table walrelay against Debezium
"""
