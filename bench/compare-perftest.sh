#!/bin/bash
# Holds rxio-perf against perftest on Soft-RoCE: ib_write_bw vs rxio-perf write_bw,
# ib_write_lat vs rxio-perf write_lat, and rxio-perf msg_bw (the transport's Connection
# API) vs rxio-perf write_bw, server and client in one guest boot
# (tests/rxe/guest.sh), the runs of each pair interleaved so drift hits both alike,
# and which goes first alternating round by round.
# Prints every table, then the ratios of the medians over the rounds against their
# targets. Under TCG only the ratios mean something; see docs/benchmarks.md.
#
# usage: bench/compare-perftest.sh [BUILD_DIR]     (default: build)
# Environment: BW_ROUNDS (default 9), LAT_ROUNDS (15), ROUNDS (sets both), BW_ITERS
# (2000), LAT_ITERS (2000).
# Run to run, the guest's figures spread widely for either tool (bandwidth by a third,
# latency bimodal at about 20 or 33 usec; docs/benchmarks.md): hence the rounds.
# Exit: 0 every target met, 1 a target missed, 2 usage, 77 no guest possible.
set -euo pipefail

BW_ROUNDS=${BW_ROUNDS:-${ROUNDS:-9}}
LAT_ROUNDS=${LAT_ROUNDS:-${ROUNDS:-15}}
BW_ITERS=${BW_ITERS:-2000}
LAT_ITERS=${LAT_ITERS:-2000}

if [[ ${1:-} != --in-guest ]]; then
	if [[ ${1:-} == -h || ${1:-} == --help ]]; then
		sed -n '2,14s/^# \{0,1\}//p' "$0"
		exit 0
	fi
	here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
	build=$(realpath "${1:-$here/build}")
	if [[ ! -x $build/bench/rxio-perf ]]; then
		echo "compare-perftest: no $build/bench/rxio-perf; build first (ninja -C ${1:-build})" >&2
		exit 2
	fi
	for tool in ib_write_bw ib_write_lat; do
		command -v $tool >/dev/null || { echo "compare-perftest: $tool missing (package perftest)" >&2; exit 77; }
	done
	exec "$here/tests/rxe/guest.sh" --timeout 1800 \
		--env BW_ROUNDS="$BW_ROUNDS" --env LAT_ROUNDS="$LAT_ROUNDS" \
		--env BW_ITERS="$BW_ITERS" --env LAT_ITERS="$LAT_ITERS" \
		-- bash "$here/bench/compare-perftest.sh" --in-guest "$build/bench/rxio-perf"
fi

rxio_perf=$2
dev=${RXIO_RXE_DEV:-rxe0}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=18600

# run_pair NAME CMD...: the server, then (once it listens) the client at 127.0.0.1.
# The client's table goes to stdout; the data row is left in $work/NAME.row.
run_pair() {
	local name=$1 server_pid i
	shift
	port=$((port + 1))
	"$@" -p $port >"$work/$name.server" 2>&1 &
	server_pid=$!
	# perftest prints "Waiting for client" before it listens: watch the socket.
	for ((i = 0; i < 300; i++)); do
		[[ -n $(ss -Hltn "sport = :$port") ]] && break
		sleep 0.1
	done
	if ! timeout 600 "$@" -p $port 127.0.0.1 >"$work/$name.client" 2>&1; then
		cat "$work/$name.client" "$work/$name.server"
		echo "compare-perftest: '$*' failed" >&2
		exit 1
	fi
	wait "$server_pid" || true
	sed -n '/#bytes/,/^-/p' "$work/$name.client" | sed '$d'
	awk '/#bytes/ { getline; print; exit }' "$work/$name.client" >"$work/$name.row"
}

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

failed=0
# compare NAME ROUNDS COLUMN better(higher|lower) TARGET -- REFERENCE... -- RXIO...
# COLUMN is the field of the data row compared: 4 = BW average, 5 = t_typical.
compare() {
	local name=$1 rounds=$2 column=$3 better=$4 target=$5 round ref_med rxio_med ratio paired ok
	shift 6
	local -a ref=() rxio=()
	while [[ $1 != -- ]]; do ref+=("$1"); shift; done
	shift
	rxio=("$@")
	: >"$work/$name.ref.values"
	: >"$work/$name.rxio.values"
	run_ref() {
		echo "== $name, round $round: ${ref[*]}"
		run_pair "$name.ref" "${ref[@]}"
		awk -v c="$column" '{ print $c }' "$work/$name.ref.row" >>"$work/$name.ref.values"
	}
	run_rxio() {
		echo "== $name, round $round: rxio-perf ${rxio[*]:1}"
		run_pair "$name.rxio" "${rxio[@]}"
		awk -v c="$column" '{ print $c }' "$work/$name.rxio.row" >>"$work/$name.rxio.values"
	}
	# Who goes first alternates: the second run of a pair may pay for the first
	# (a server still exiting, Soft-RoCE's timers), and that must not always be the
	# same tool.
	for ((round = 1; round <= rounds; round++)); do
		if ((round % 2)); then run_ref; run_rxio; else run_rxio; run_ref; fi
	done
	ref_med=$(median <"$work/$name.ref.values")
	rxio_med=$(median <"$work/$name.rxio.values")
	ratio=$(awk -v a="$rxio_med" -v b="$ref_med" 'BEGIN { printf "%.3f", a / b }')
	# The rounds' own ratios (each pair ran back to back): their spread shows how much
	# of the verdict is noise.
	paste "$work/$name.rxio.values" "$work/$name.ref.values" | awk '{ print $1 / $2 }' | sort -g >"$work/$name.ratios"
	paired=$(median <"$work/$name.ratios" | awk '{ printf "%.3f", $1 }')
	paired+=$(awk '{ v[NR] = $1 } END { printf ", from %.3f to %.3f", v[1], v[NR] }' "$work/$name.ratios")
	local sign='>='
	[[ $better == higher ]] || sign='<='
	ok=$(awk -v r="$ratio" -v t="$target" -v s="$sign" 'BEGIN { print ((s == ">=") ? r >= t : r <= t) ? "met" : "MISSED" }')
	summary+=("$(printf '%-10s %2d rounds: %8s vs reference %8s: ratio %s (target %s %s): %s' \
		"$name" "$rounds" "$rxio_med" "$ref_med" "$ratio" "$sign" "$target" "$ok")")
	summary+=("$(printf '%-10s round by round: median ratio %s' '' "$paired")")
	[[ $ok == met ]] || failed=1
}

summary=()
echo "write_bw and msg_bw: -s 65536 -n $BW_ITERS, $BW_ROUNDS rounds;" \
	"write_lat: -s 8 -n $LAT_ITERS, $LAT_ROUNDS rounds; device $dev, GID index 1"
compare write_bw "$BW_ROUNDS" 4 higher 1.0 -- \
	ib_write_bw -d "$dev" -x 1 -s 65536 -n "$BW_ITERS" -- \
	"$rxio_perf" write_bw -d "$dev" -x 1 -s 65536 -n "$BW_ITERS"
compare write_lat "$LAT_ROUNDS" 5 lower 1.1 -- \
	ib_write_lat -d "$dev" -x 1 -s 8 -n "$LAT_ITERS" -- \
	"$rxio_perf" write_lat -d "$dev" -x 1 -s 8 -n "$LAT_ITERS"
# The transport's Connection API against the raw RDMA WRITE it is built on.
compare msg_bw "$BW_ROUNDS" 4 higher 0.9 -- \
	"$rxio_perf" write_bw -d "$dev" -x 1 -s 65536 -n "$BW_ITERS" -- \
	"$rxio_perf" msg_bw --backend verbs -d "$dev" -s 65536 -n "$BW_ITERS"

echo
echo "medians over the rounds (MB/sec for *_bw: BW average; usec for *_lat: t_typical);"
echo "the reference is perftest, and rxio-perf write_bw for msg_bw:"
printf '  %s\n' "${summary[@]}"
exit $failed
