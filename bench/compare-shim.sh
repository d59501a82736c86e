#!/bin/bash
# Runs unmodified programs plain and under rxio-run on this host, side by side in one
# run, and prints rxio / plain against the targets:
#   sockperf ping-pong, 64 B, TCP: average latency, both sides shimmed or both plain
#   iperf3, one stream: the receiver's bitrate
#   redis-benchmark GET and SET (50 clients, kept connections): requests per second
#   redis-benchmark PING with -k 0: a connection per request (connect, one request,
#     close), 8 clients: requests per second
#   rxio-connect-cost against a server that runs without the shim: the mean time of a
#     blocking connect(), client plain and shimmed; the difference in microseconds
# Every round runs each measurement once per variant, who goes first alternating, each
# on a fresh port; the table holds the median of the rounds per variant. After each
# shimmed run the server's counters (rxio-stat -f) show whether its connections moved
# or why they stayed on TCP; runs that kept some on TCP are listed under the table.
#
# usage: bench/compare-shim.sh [BUILD_DIR]     (default: build)
# Environment: ROUNDS (default 3), T seconds per sockperf and iperf3 run (5),
# N redis GET/SET requests (100000), SHORT_N short-lived requests (20000),
# CONNECTS timed connects (20000), LIMIT seconds before a client counts as hung (300).
# Exit: 0 every target met, 1 a target missed or a run failed, 2 usage, 77 a tool is missing.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
T=${T:-5}
N=${N:-100000}
SHORT_N=${SHORT_N:-20000}
CONNECTS=${CONNECTS:-20000}
LIMIT=${LIMIT:-300}

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
	sed -n '2,20s/^# \{0,1\}//p' "$0"
	exit 0
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=$(realpath "${1:-$here/build}")
rxio_run=$build/shim/rxio-run
rxio_stat=$build/shim/rxio-stat
connect_cost=$build/bench/rxio-connect-cost
for f in "$rxio_run" "$rxio_stat" "$connect_cost"; do
	[[ -x $f ]] || { echo "compare-shim: no $f; build first (ninja -C ${1:-build})" >&2; exit 2; }
done
for tool in sockperf iperf3 redis-server redis-benchmark python3 ss timeout; do
	command -v $tool >/dev/null || { echo "compare-shim: $tool missing (scripts/install-deps.sh installs it)" >&2; exit 77; }
done

work=$(mktemp -d)
# Our own board directory: rxio-stat then sees only this script's processes.
export RXIO_STAT_DIR=$work/stat
mkdir "$RXIO_STAT_DIR" "$work/values"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM  # so that the EXIT trap stops the servers
# A fresh range below the ephemeral ports: the short-lived runs leave thousands of
# client ports in TIME_WAIT there, and a listener cannot bind over them.
read -r ephemeral _ </proc/sys/net/ipv4/ip_local_port_range
port=$((10000 + RANDOM % (ephemeral > 12000 ? ephemeral - 11000 : 20000)))

server=
note=

# start_server VARIANT LOG COMMAND...: COMMAND in the background, shimmed for rxio.
start_server() {
	local variant=$1 log=$2
	shift 2
	if [[ $variant == rxio ]]; then
		"$rxio_run" "$@" </dev/null >"$log" 2>&1 &
	else
		"$@" </dev/null >"$log" 2>&1 &
	fi
	server=$!
	for ((i = 0; i < 100; i++)); do
		[[ -n $(ss -Hltn "sport = :$port") ]] && return 0
		kill -0 $server 2>/dev/null || break
		sleep 0.1
	done
	echo "compare-shim: nothing listens on port $port ($*)" >&2
	return 1
}

stop_server() {
	[[ -n $server ]] || return 0
	kill $server 2>/dev/null || true
	for ((i = 0; i < 30; i++)); do
		kill -0 $server 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL $server 2>/dev/null || true
	wait $server 2>/dev/null || true
	server=
}

# client VARIANT LOG COMMAND...: COMMAND to its end, shimmed for rxio; a client that
# hangs (a shim bug, say) fails the run instead of the whole script. Waited for in the
# background, so that a signal stops the script at once rather than after the client.
client() {
	local variant=$1 log=$2
	shift 2
	local shim=()
	[[ $variant == rxio ]] && shim=("$rxio_run")
	timeout -k 5 "$LIMIT" "${shim[@]}" "$@" </dev/null >"$log" 2>&1 &
	wait $!
}

# The shimmed server's counters, such as "moved:shm=51": a ratio near 1 with
# fallback:... means the connections stayed on TCP.
read_board() {
	note=
	[[ $1 == rxio ]] || return 0
	note=$("$rxio_stat" -f -p $server 2>&1 | awk -v pid=$server '$1 == pid { printf "%s%s=%s", sep, $(NF - 1), $NF; sep = " " }') || true
	note="[${note:-no counters}]"
}

# record NAME VARIANT VALUE: one figure of this round.
record() {
	[[ $3 =~ ^[0-9.]+$ ]] || { echo "compare-shim: $1 ($2): no figure in the output" >&2; return 1; }
	echo "$3" >>"$work/values/$1.$2"
	[[ $note == *fallback:* ]] && echo "  $1, round $round: $note" >>"$work/fallbacks"
	printf 'round %d  %-9s %-5s %12s  %s\n' "$round" "$1" "$2" "$3" "$note"
}

# Each runs one measurement for VARIANT (plain or rxio) on $port and records it; a
# failure returns non-zero with the outputs in $work/NAME.*.
run_sockperf() {
	start_server "$1" "$work/sockperf.server" sockperf sr --tcp -p $port || return 1
	# --mps: sockperf sizes its table of send times for 600,000 messages/s unless told
	# more, and stops with "_seqN > m_maxSequenceNo" when a faster run outgrows it.
	client "$1" "$work/sockperf.client" sockperf pp --tcp -i 127.0.0.1 -p $port -t "$T" -m 64 --mps 2000000 || return 1
	read_board "$1"
	stop_server
	# Newer sockperf prints avg-latency=X; older ones "Summary: Latency is X usec".
	record sockperf "$1" "$(awk '
		match($0, /avg-latency=[0-9.]+/) { v = substr($0, RSTART + 12, RLENGTH - 12) }
		/Summary: Latency is/ && v == "" { v = $(NF - 1) }
		END { print v }' "$work/sockperf.client")"
}

run_iperf3() {
	# No -1: the server stays up until its counters are read.
	start_server "$1" "$work/iperf3.server" iperf3 -s -p $port || return 1
	client "$1" "$work/iperf3.client" iperf3 -c 127.0.0.1 -p $port -t "$T" -J || return 1
	read_board "$1"
	stop_server
	record iperf3 "$1" "$(python3 -c 'import json,sys; print("%.2f" % (json.load(open(sys.argv[1]))["end"]["sum_received"]["bits_per_second"] / 1e9))' \
		"$work/iperf3.client")"
}

# requests NAME LOG: redis-benchmark -q's "NAME: X requests per second" (progress
# lines end in \r).
requests() { tr '\r' '\n' <"$2" | awk -v n="$1:" '$1 == n && $3 == "requests" { print $2 }' | tail -1; }

run_redis() {
	start_server "$1" "$work/redis.server" redis-server --port $port --save '' --appendonly no || return 1
	client "$1" "$work/redis.client" redis-benchmark -p $port -t get,set -n "$N" -q || return 1
	read_board "$1"
	stop_server
	record redis_set "$1" "$(requests SET "$work/redis.client")" &&
		record redis_get "$1" "$(requests GET "$work/redis.client")"
}

run_short() {
	start_server "$1" "$work/short.server" redis-server --port $port --save '' --appendonly no || return 1
	client "$1" "$work/short.client" redis-benchmark -p $port -t ping_inline -k 0 -c 8 -n "$SHORT_N" -q || return 1
	read_board "$1"
	stop_server
	record short "$1" "$(requests PING_INLINE "$work/short.client")"
}

# The server never runs shimmed: this is what a shimmed client pays when the peer
# has no shim.
run_connect() {
	start_server plain "$work/connect.server" "$connect_cost" --server $port || return 1
	client "$1" "$work/connect.client" "$connect_cost" --client $port --count "$CONNECTS" || return 1
	note=
	stop_server
	record connect "$1" "$(sed -n 's/^connect_us=//p' "$work/connect.client")"
}

echo "date: $(date -R)"
echo "kernel: $(uname -r), cpus: $(nproc)"
echo "rxio: $(git -C "$here" describe --always --dirty 2>/dev/null || echo unknown)"
echo "ROUNDS=$ROUNDS T=$T N=$N SHORT_N=$SHORT_N CONNECTS=$CONNECTS"
echo "units: sockperf usec (avg), iperf3 Gb/s, redis requests/s, connect usec (mean)"

failed=0
measures=(sockperf iperf3 redis short connect)
for ((round = 1; round <= ROUNDS; round++)); do
	variants=(plain rxio)
	((round % 2 == 0)) && variants=(rxio plain)
	for m in "${measures[@]}"; do
		for v in "${variants[@]}"; do
			port=$((port + 1))
			# A port in any use: a listener would pass for ours, a TIME_WAIT fails the bind.
			while [[ -n $(ss -Htan "sport = :$port") ]]; do port=$((port + 1)); done
			note=
			if ! run_$m $v; then
				stop_server
				failed=1
				printf 'round %d  %-9s %-5s %12s\n' "$round" "$m" "$v" FAILED
				for f in "$work/$m".*; do
					[[ -f $f ]] || continue
					echo "--- ${f##*/} (last lines)" >&2
					tail -n 15 "$f" >&2
				done
			fi
			rm -f "$work/$m".server "$work/$m".client
		done
	done
done

# median NAME VARIANT: "-" when no run gave a figure.
median() {
	[[ -f $work/values/$1.$2 ]] || { echo -; return; }
	sort -g "$work/values/$1.$2" | awk '{ v[NR] = $1 } END {
		m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
		printf (m >= 1000) ? "%.0f\n" : "%.3f\n", m }'
}

# row WHAT NAME KIND TARGET: KIND is le or ge (the ratio rxio / plain against TARGET)
# or diff (rxio - plain, at most TARGET).
row() {
	local p r cmp verdict target
	p=$(median "$2" plain)
	r=$(median "$2" rxio)
	case $3 in
		le) target="≤ $4" ;;
		ge) target="≥ $4" ;;
		diff) target="≤ +$4 µs" ;;
	esac
	if [[ $p == - || $r == - ]]; then
		cmp=-
		verdict=FAILED
		failed=1
	else
		read -r cmp verdict < <(awk -v p="$p" -v r="$r" -v k="$3" -v t="$4" 'BEGIN {
			if (k == "diff") { d = r - p; printf "%+.1f %s\n", d, d <= t ? "met" : "missed"; exit }
			q = r / p
			printf "%.3f %s\n", q, (k == "le" ? q <= t : q >= t) ? "met" : "missed" }')
		[[ $3 == diff ]] && cmp="$cmp µs"
		[[ $verdict == met ]] || failed=1
	fi
	printf '| %s | %s | %s | %s | %s | %s |\n' "$1" "$p" "$r" "$cmp" "$target" "$verdict"
}

echo
echo "| what | plain | rxio | ratio | target | verdict |"
echo "|---|---|---|---|---|---|"
row "sockperf ping-pong 64 B, avg latency (usec)" sockperf le 0.3
row "iperf3 one stream, receiver (Gb/s)" iperf3 ge 2.0
row "redis-benchmark GET (requests/s)" redis_get ge 1.5
row "redis-benchmark SET (requests/s)" redis_set ge 1.5
row "short-lived connections, PING -k 0 (requests/s)" short ge 0.9
row "connect() to a server without the shim (usec)" connect diff 50
if [[ -f $work/fallbacks ]]; then
	echo
	echo "shimmed runs whose server kept connections on TCP (rxio-stat --help says why):"
	sort -u "$work/fallbacks"
fi
exit $failed
