#!/usr/bin/env bash
# Interleaved A/B of two builds' brokers under one load generator (this build's bench).
#
#   scripts/bench-ab.sh BASE_EXE ROUNDS [BENCH_ARGS...]
#   DURABLE=1 scripts/bench-ab.sh ...     # each run on a fresh --data-dir
#
# Each round runs the base and the new broker once, alternating which goes first, and
# prints both rates; at the end, the medians and the median of the per-round ratios
# (new / base) of msg/s and of messages per broker CPU-second.
set -euo pipefail
base=$1; rounds=$2; shift 2
new=${NEW_EXE:-$(dirname "$0")/../target/release/ferry}
runs=$(mktemp)
errors=$(mktemp)
trap 'rm -f "$runs" "$errors"' EXIT
for round in $(seq 1 "$rounds"); do
  order=(base new)
  if (( round % 2 == 0 )); then order=(new base); fi
  for which in "${order[@]}"; do
    exe=$base; [[ $which == new ]] && exe=$new
    extra=()
    data_dir=
    if [[ ${DURABLE:-0} == 1 ]]; then
      data_dir=$(mktemp -d)
      extra=(--broker-arg="--data-dir=$data_dir")
    fi
    if ! report=$("$new" bench "$@" --broker-exe "$exe" "${extra[@]}" --json 2>"$errors"); then
      echo "round $round, $which: the bench failed:" >&2
      cat "$errors" >&2
      exit 1
    fi
    figures=$(python3 -c 'import json,sys; j=json.load(sys.stdin); print(round(j["msgs_per_sec"]), round(j["msgs_per_broker_cpu_second"]))' <<<"$report")
    [[ -n $data_dir ]] && rm -rf "$data_dir"
    echo "$round $which $figures" | tee -a "$runs"
  done
done
python3 - "$runs" <<'PY'
import statistics, sys
rounds = {}
for line in open(sys.argv[1]):
    round_, which, rate, per_cpu = line.split()
    rounds.setdefault(round_, {})[which] = (float(rate), float(per_cpu))
pairs = [r for r in rounds.values() if "base" in r and "new" in r]
for i, what in enumerate(["msg/s", "msgs per broker CPU-second"]):
    base = statistics.median(r["base"][i] for r in pairs)
    new = statistics.median(r["new"][i] for r in pairs)
    ratio = statistics.median(r["new"][i] / r["base"][i] for r in pairs)
    print(f"{what}: base median {base:,.0f}, new median {new:,.0f}, median ratio {ratio:.3f} ({len(pairs)} pairs)")
PY
