#!/usr/bin/env bash
# The server-side ceiling of a one-producer, one-batch-in-flight append:
# pgbench (C, no client overhead) runs the baseline INSERT, the hub's
# predicted transaction and the least any append of the hub's schema must
# write, interleaved, on a scratch database. See bench/README.md ("hub").
#
#   bench/pgbench-ceiling.sh [postgres-url-without-database] [rounds] [seconds]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
base="${1:-postgres://postgres@127.0.0.1:5432}"
rounds="${2:-3}"
seconds="${3:-5}"
pgbin="${PGBIN:-/usr/lib/postgresql/15/bin}"
db="omnirelay_pgbench_$$"

psql "$base/postgres" -qc "CREATE DATABASE $db"
trap 'psql "$base/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null' EXIT
psql "$base/$db" -q -v ON_ERROR_STOP=1 -f "$here/../migrations/V0001__log.sql"
psql "$base/$db" -q -v ON_ERROR_STOP=1 <<'SQL'
INSERT INTO shards (shard_id, epoch, owner, lease_expires_at) VALUES ('bench', 1, 'bench', now() + interval '1 day');
CREATE TABLE bench_events (LIKE events INCLUDING ALL);
CREATE SEQUENCE bench_sequence;
SQL
psql "$base/$db" -Atc "SELECT 'fsync=' || current_setting('fsync') || ' synchronous_commit=' || current_setting('synchronous_commit')"
for round in $(seq "$rounds"); do
    for script in insert hub-pipelined hub-one-statement; do
        tps=$("$pgbin/pgbench" -n -M prepared -c 1 -T "$seconds" -f "$here/pgbench/$script.sql" "$base/$db" 2>/dev/null |
            sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        printf 'round %s  %-18s %8.0f tps\n' "$round" "$script" "$tps"
    done
done
