#!/bin/bash
# Holds rxio's shm and tcp backends against kernel TCP loopback on this host:
# rxio-perf msg_lat (64 B) against sockperf ping-pong over TCP, rxio-perf msg_bw
# (128 KiB messages, iperf3's default block) against one iperf3 stream, and the shm
# bandwidth against this machine's memcpy, all in one run, rounds interleaved and who
# goes first alternating. iperf3 sends from one buffer and receives into one, so
# msg_bw keeps 8 messages in flight (-t 8: 1 MiB of receive buffers) and memcpy copies
# 128 KiB blocks over the same 1 MiB (rxio-memcpy-bw). Prints every figure, then the
# medians and their ratios against the targets.
#
# usage: bench/compare-local.sh [BUILD_DIR]     (default: build)
# Environment: ROUNDS (default 5), SECONDS_PER_RUN (5), LAT_ITERS (200000),
# BW_ITERS (40000).
# Exit: 0 every target met, 1 a target missed, 2 usage, 77 a tool is missing.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}
LAT_ITERS=${LAT_ITERS:-200000}
BW_ITERS=${BW_ITERS:-40000}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
	sed -n '2,13s/^# \{0,1\}//p' "$0"
	exit 0
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$(realpath "${1:-$here/build}")
perf=$build/bench/rxio-perf
memcpy_bw=$build/bench/rxio-memcpy-bw
for f in "$perf" "$memcpy_bw"; do
	[[ -x $f ]] || { echo "compare-local: no $f; build first (ninja -C ${1:-build})" >&2; exit 2; }
done
for tool in sockperf iperf3 ss; do
	command -v $tool >/dev/null || { echo "compare-local: $tool missing (scripts/install-deps.sh installs it)" >&2; exit 77; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"; kill $(jobs -p) 2>/dev/null || true' EXIT
port=$((20000 + RANDOM % 20000))  # a fresh range: sockperf cannot bind over TIME_WAIT

wait_port() {
	for ((i = 0; i < 100; i++)); do
		[[ -n $(ss -Hltn "sport = :$1") ]] && return 0
		sleep 0.1
	done
	echo "compare-local: nothing listens on port $1" >&2
	cat "$work"/*.server >&2 2>/dev/null || true
	exit 1
}

# Each prints one number: the figure compared.
# Each runs in $(...): $port is set by the caller, one per run.
run_sockperf() {
	sockperf server --tcp -i 127.0.0.1 -p $port </dev/null >"$work/sockperf.server" 2>&1 &
	local server=$!
	wait_port $port
	sockperf ping-pong --tcp -i 127.0.0.1 -p $port -m 64 -t "$SECONDS_PER_RUN" >"$work/sockperf.client" 2>&1
	kill $server 2>/dev/null || true
	wait $server 2>/dev/null || true
	# sockperf reports half the round trip, as msg_lat does; the median is t_typical's kin.
	awk '/percentile 50.000/ { print $NF }' "$work/sockperf.client"
}

run_iperf3() {
	iperf3 -s -1 -p $port >/dev/null 2>&1 &
	local server=$!
	wait_port $port
	iperf3 -c 127.0.0.1 -p $port -t "$SECONDS_PER_RUN" -J >"$work/iperf3.json"
	wait $server 2>/dev/null || true
	python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e9))' \
		"$work/iperf3.json"
}

# run_perf COLUMN ARGS...: rxio-perf server and client; COLUMN of the client's data row.
run_perf() {
	local column=$1
	shift
	"$perf" "$@" -p $port >"$work/perf.server" 2>&1 &
	local server=$!
	wait_port $port
	if ! "$perf" "$@" -p $port 127.0.0.1 >"$work/perf.client" 2>&1; then
		cat "$work/perf.client" "$work/perf.server" >&2
		echo "compare-local: rxio-perf $* failed" >&2
		exit 1
	fi
	wait $server || true
	awk -v c="$column" '/#bytes/ { getline; print $c; exit }' "$work/perf.client"
}

run_memcpy() { "$memcpy_bw" 131072 $((1 << 20)) | awk '{ printf "%.2f\n", $3 * 8 }'; }  # Gb/s

declare -A cmd=(
	[sockperf]=run_sockperf
	[shm_lat]="run_perf 5 msg_lat --backend shm -s 64 -n $LAT_ITERS"
	[tcp_lat]="run_perf 5 msg_lat --backend tcp -s 64 -n $LAT_ITERS"
	[iperf3]=run_iperf3
	[shm_bw]="run_perf 4 msg_bw --backend shm -s 131072 -t 8 -n $BW_ITERS --report_gbits"
	[tcp_bw]="run_perf 4 msg_bw --backend tcp -s 131072 -t 8 -n $BW_ITERS --report_gbits"
	[memcpy]=run_memcpy
)
order=(sockperf shm_lat tcp_lat iperf3 shm_bw tcp_bw memcpy)

echo "latency: 64 B, half the round trip, median (usec); bandwidth: Gb/s; $ROUNDS rounds"
for ((round = 1; round <= ROUNDS; round++)); do
	names=("${order[@]}")
	if ((round % 2 == 0)); then
		names=()
		for ((i = ${#order[@]} - 1; i >= 0; i--)); do names+=("${order[i]}"); done
	fi
	for name in "${names[@]}"; do
		port=$((port + 1))
		value=$(${cmd[$name]})
		echo "$value" >>"$work/$name.values"
		printf 'round %d  %-9s %s\n' "$round" "$name" "$value"
	done
done

median() { sort -g "$work/$1.values" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
declare -A m
for name in "${order[@]}"; do m[$name]=$(median "$name"); done

failed=0
verdict() { # NAME VALUE SIGN TARGET
	local ok
	ok=$(awk -v r="$2" -v t="$4" -v s="$3" 'BEGIN { print ((s == ">=") ? r >= t : r <= t) ? "met" : "MISSED" }')
	printf '  %-34s %7.3f (target %s %s): %s\n' "$1" "$2" "$3" "$4" "$ok"
	[[ $ok == met ]] || failed=1
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.4f", a / b }'; }

echo
echo "medians: sockperf ${m[sockperf]} us, shm ${m[shm_lat]} us, tcp ${m[tcp_lat]} us;" \
	"iperf3 ${m[iperf3]} Gb/s, shm ${m[shm_bw]}, tcp ${m[tcp_bw]}, memcpy ${m[memcpy]}"
verdict "shm latency / sockperf" "$(ratio "${m[shm_lat]}" "${m[sockperf]}")" "<=" 0.2
verdict "shm bandwidth / iperf3" "$(ratio "${m[shm_bw]}" "${m[iperf3]}")" ">=" 3.0
verdict "memcpy / shm bandwidth" "$(ratio "${m[memcpy]}" "${m[shm_bw]}")" "<=" 2.0
verdict "tcp bandwidth / iperf3" "$(ratio "${m[tcp_bw]}" "${m[iperf3]}")" ">=" 0.9
printf '  %-34s %7.3f (no target)\n' "tcp latency / sockperf" "$(ratio "${m[tcp_lat]}" "${m[sockperf]}")"
exit $failed
