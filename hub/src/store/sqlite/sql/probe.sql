-- The readiness probe: the file answers a query.
--
-- Concurrency contract: a read on the store's one connection, which runs
-- operations one at a time in the order they were called and holds the file in
-- exclusive locking mode, so no other writer exists; it sees every committed
-- write and never another operation's half-done transaction.
SELECT count(*)
FROM shards
