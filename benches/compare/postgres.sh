#!/usr/bin/env bash
# PostgreSQL logical replication next to repl's G4 database pair, same workload.
#
# Installs PostgreSQL from Debian's packages, starts two clusters on loopback (as the
# postgres user), replicates a table with a publication and a subscription, and runs
# the pair workload on both systems: WRITERS concurrent clients, each writing one
# record of SIZE bytes per durable transaction over a loopback connection, RECORDS in
# all; timed from the first write until every record is durable on the second
# server. Two modes:
#   async: PostgreSQL synchronous_commit=on at the publisher, the subscriber applies
#          when it can; repl's pair in asynchronous mode.
#   sync:  the subscription named in synchronous_standby_names (a commit waits for the
#          subscriber's flush); repl's pair in synchronous mode (fail closed).
# The subscription applies with synchronous_commit = on in both modes, so a row on the
# subscriber is durable there, as an entry applied on repl's second appliance is (the
# subscription's default, off, also makes synchronous mode wait for the subscriber's
# background WAL flush: about 25 rows/s with 8 clients here).
# Prints rows/s and MB/s of payload for each, and repl's figure as a ratio to
# PostgreSQL's.
#
# Usage: bash benches/compare/postgres.sh [RECORDS] [SIZES] [WRITERS]
#   defaults: 20000 records, sizes "256 2048", 8 writers; PAIR_LOAD=PATH uses that
#   pair_load binary instead of building it.
set -euo pipefail
cd "$(dirname "$0")/../.."

RECORDS=${1:-20000}
SIZES=${2:-"256 2048"}
WRITERS=${3:-8}

if ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql
fi
PGBIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")
echo "PostgreSQL: $("$PGBIN/postgres" --version)"

# PAIR_LOAD names an already built pair_load (CI builds every binary once).
if [ -z "${PAIR_LOAD:-}" ]; then
  cargo build --release -p repl-benches --bin pair_load
  PAIR_LOAD=target/release/pair_load
fi
PAIR_LOAD=$(realpath "$PAIR_LOAD")

WORK=$(mktemp -d /tmp/repl-pg-compare.XXXXXX)
chown postgres "$WORK"
as_pg() { runuser -u postgres -- "$@"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PUB_PORT=$(free_port)
SUB_PORT=$(free_port)

stop_all() {
  for c in pub sub; do
    [ -f "$WORK/$c/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$WORK/$c" -m fast stop >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}
trap stop_all EXIT

for c in pub sub; do
  as_pg "$PGBIN/initdb" -D "$WORK/$c" -U postgres --auth=trust >/dev/null
  # Loopback only; durable commits (fsync on, the default wal_sync_method).
  cat >> "$WORK/$c/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
wal_level = logical
fsync = on
synchronous_commit = on
max_wal_senders = 10
max_replication_slots = 10
shared_buffers = 512MB
max_wal_size = 4GB
CONF
done
as_pg "$PGBIN/pg_ctl" -D "$WORK/pub" -o "-p $PUB_PORT" -l "$WORK/pub.log" -w start >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$WORK/sub" -o "-p $SUB_PORT" -l "$WORK/sub.log" -w start >/dev/null

psql_at() { local port=$1; shift; as_pg "$PGBIN/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt "$@"; }

for port in $PUB_PORT $SUB_PORT; do
  psql_at "$port" -c "CREATE TABLE records (id bigserial PRIMARY KEY, payload text NOT NULL)"
done
psql_at "$PUB_PORT" -c "CREATE PUBLICATION pub FOR TABLE records"
psql_at "$SUB_PORT" -c "CREATE SUBSCRIPTION sub1 CONNECTION 'host=127.0.0.1 port=$PUB_PORT user=postgres dbname=postgres' PUBLICATION pub WITH (synchronous_commit = 'on')"

now_s() { date +%s.%N; }

# Runs the workload on PostgreSQL; prints "rows/s MB/s".
pg_run() {
  local size=$1
  psql_at "$PUB_PORT" -c "TRUNCATE records"
  # TRUNCATE replicates; wait until the subscriber is empty too.
  until [ "$(psql_at "$SUB_PORT" -c 'SELECT count(*) FROM records')" = 0 ]; do sleep 0.05; done
  printf "INSERT INTO records (payload) VALUES (repeat('x', %d));\n" "$size" > "$WORK/insert.sql"
  chown postgres "$WORK/insert.sql"
  local per=$((RECORDS / WRITERS)) total=$(( (RECORDS / WRITERS) * WRITERS ))
  local start end
  start=$(now_s)
  as_pg "$PGBIN/pgbench" -h 127.0.0.1 -p "$PUB_PORT" -U postgres -n -c "$WRITERS" -j 2 -t "$per" -f "$WORK/insert.sql" postgres >"$WORK/pgbench.log" 2>&1
  # Until the subscriber holds every row (its apply commits are durable: fsync on).
  until [ "$(psql_at "$SUB_PORT" -c 'SELECT count(*) FROM records')" -ge "$total" ]; do sleep 0.002; done
  end=$(now_s)
  python3 -c "import sys; n,s=int(sys.argv[1]),int(sys.argv[2]); d=float(sys.argv[4])-float(sys.argv[3]); print(f'{n/d:.0f} {n*s/d/1e6:.2f}')" "$total" "$size" "$start" "$end"
}

declare -A RESULT
for mode in async sync; do
  if [ "$mode" = sync ]; then
    psql_at "$PUB_PORT" -c "ALTER SYSTEM SET synchronous_standby_names = 'sub1'"
  else
    psql_at "$PUB_PORT" -c "ALTER SYSTEM SET synchronous_standby_names = ''"
  fi
  psql_at "$PUB_PORT" -c "SELECT pg_reload_conf()" >/dev/null
  for size in $SIZES; do
    RESULT[pg,$mode,$size]=$(pg_run "$size")
    RESULT[repl,$mode,$size]=$("$PAIR_LOAD" --mode "$mode" --size "$size" --writers "$WRITERS" --records "$RECORDS" | tail -n 1)
  done
done

echo
echo "pair workload: $RECORDS records, $WRITERS writers, one record per durable commit, end to end"
printf '%-6s %6s | %12s %9s | %12s %9s | %8s\n' mode size "pg rows/s" "pg MB/s" "repl rows/s" "repl MB/s" "ratio"
for mode in async sync; do
  for size in $SIZES; do
    read -r pg_rows pg_mb <<<"${RESULT[pg,$mode,$size]}"
    read -r repl_rows repl_mb <<<"${RESULT[repl,$mode,$size]}"
    ratio=$(python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}')" "$repl_rows" "$pg_rows")
    printf '%-6s %6s | %12s %9s | %12s %9s | %7sx\n' "$mode" "$size" "$pg_rows" "$pg_mb" "$repl_rows" "$repl_mb" "$ratio"
  done
done
