#!/usr/bin/env bash
# Runs the scenarios behind RESULTS.md, one after another, from the repository root.
# Each run is bounded by its scenario's time limit; results land in loadtest/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p tokenfan -p tokenfan-loadtest
LT=target/release/tokenfan-loadtest
OUT=loadtest/results
mkdir -p "$OUT"
run() { # name, args...
  local name=$1; shift
  echo "== $name: $LT run $*" >&2
  "$LT" run "$@" --out "$OUT/$name.json" > "$OUT/$name.md" || echo "!! $name reported a failed check" >&2
}
run idle-5k       idle -n 5000
run idle-10k      idle -n 10000
run idle-max      idle -n 20000 --cap
run chat-5k       chat --subscribers 1 --interval-ms 50 --tokens 400
run chat-1k       chat -g 1000 --subscribers 1 --interval-ms 50 --tokens 400
# The chat path against the same mock read directly, with the relay floor in the same run.
run chatpath-100  chatpath -g 100
run chatpath-1k   chatpath -g 1000
run broadcast-10k broadcast -n 10000
run broadcast-19k broadcast -n 19500 --cap
run slow-5pct     slow
run burst         burst
run rtt           rtt
run drain-10k     drain -n 10000
run drain-19k     drain -n 19400 -g 200 --cap
run soak          soak --seed 1
run soak-3-rounds soak --seed 1 --rounds 3 --churn-s 12 -n 500 -g 80
run soak-jemalloc-defaults soak --seed 1 --gateway-env=_RJEM_MALLOC_CONF=
# The shared store (needs redis-server): 3 instances vs one in-memory instance, moves, and
# 100,000 idle viewers over 6 instances.
run cluster-1k        cluster
run cluster-1k-memory cluster --no-store
run cluster-1k-moves  cluster --move-fraction 0.2
run cluster-idle-100k cluster -n 100000 -g 600 --instances 6 --tokens 1000 --interval-ms 10000 --hold-s 30
for n in 5000 9000; do
  echo "== floor-$((n / 1000))k: $LT floor -n $n" >&2
  "$LT" floor -n "$n" > "$OUT/floor-$((n / 1000))k.txt"
done
for n in 1000 4900; do
  echo "== relay-floor: $LT floor --relay -n $n" >&2
  "$LT" floor --relay -n "$n" > "$OUT/relay-floor-$n.txt"
done
