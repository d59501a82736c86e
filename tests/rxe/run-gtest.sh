#!/bin/bash
# Run a GoogleTest binary inside the Soft-RoCE guest (tests/rxe/guest.sh) and judge
# the run by its XML report, not only its exit status: at least one test must have
# run, none may fail, and a skipped test fails the run when CI=true (there the rxe
# tier must really run) and is listed with a warning otherwise.
#
# usage: tests/rxe/run-gtest.sh BINARY [GTEST_ARGS...]
# A --gtest_output=xml:PATH among the arguments still gets the report.
# Exit: 0 fine, 1 not fine, 77 guest prerequisites missing (outside CI), 2 usage.
# The last line is always "rxe: N passed, M failed, K skipped".
# GTEST_*, RXIO_* (but the guest's own), *SAN_OPTIONS, LD_LIBRARY_PATH and
# MALLOC_PERTURB_ are passed into the guest; RXIO_GUEST_TIMEOUT sets its timeout.
set -euo pipefail

if (($# < 1)) || [[ $1 == -h || $1 == --help ]]; then
	sed -n '2,13s/^# \{0,1\}//p' "$0" >&2
	exit 2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=$1
shift
if [[ ! -x $bin || -d $bin ]]; then
	echo "rxe: $bin is not an executable file" >&2
	echo "rxe: 0 passed, 0 failed, 0 skipped"
	exit 1
fi
bin=$(realpath "$bin") # the guest exec's it: no PATH lookup for a bare name

# The report is written by the guest, so it must live where the guest sees the
# host's files (not under the guest's own /run, /dev, /proc, /sys).
tmpbase=$(realpath -m "${TMPDIR:-/tmp}")
case $tmpbase in
/proc | /proc/* | /sys | /sys/* | /dev | /dev/* | /run | /run/*) tmpbase=/tmp ;;
esac
tmp=$(mktemp -d "$tmpbase/rxio-gtest.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
xml=$tmp/report.xml

# A --gtest_output=xml:PATH from the caller (Meson's protocol: 'gtest' passes one)
# is honoured by copying our report there; ours must be the one gtest writes.
args=() want_xml=
for a in "$@"; do
	case $a in
	--gtest_output=xml:*) want_xml=${a#--gtest_output=xml:} ;;
	*) args+=("$a") ;;
	esac
done
if [[ $want_xml == */ ]]; then want_xml=$want_xml${bin##*/}.xml; fi

envs=()
while read -r name; do
	case $name in
	RXIO_RXE_* | RXIO_IN_GUEST | RXIO_GUEST_*) ;;
	GTEST_* | RXIO_* | ?SAN_OPTIONS | LD_LIBRARY_PATH | MALLOC_PERTURB_)
		envs+=(--env "$name=${!name}")
		;;
	esac
done < <(compgen -e)

rc=0
"$here/guest.sh" "${envs[@]}" -- "$bin" "${args[@]}" "--gtest_output=xml:$xml" || rc=$?
if [[ -n $want_xml && -s $xml ]]; then
	cp "$xml" "$want_xml" || echo "rxe: could not copy the XML report to $want_xml" >&2
fi
if ((rc == 77)); then
	echo "rxe: 0 passed, 0 failed, 0 skipped"
	exit 77
fi

passed=0 failed=0 skipped=0
failed_names=() skipped_lines=()
if [[ -s $xml ]]; then
	# gtest writes one element per line: <testcase ... status="run|notrun"
	# result="completed|skipped|suppressed" ...> or .../>, with <failure> and
	# <skipped message="..."> children.
	while IFS=$'\t' read -r kind name msg; do
		case $kind in
		P) passed=$((passed + 1)) ;;
		F) failed=$((failed + 1)); failed_names+=("$name") ;;
		S) skipped=$((skipped + 1)); skipped_lines+=("$name${msg:+: $msg}") ;;
		esac
	done < <(awk '
		function attr(a,   m) {
			if (match($0, " " a "=\"[^\"]*\"")) {
				m = substr($0, RSTART + length(a) + 3, RLENGTH - length(a) - 4)
				return m
			}
			return ""
		}
		function unxml(s) {
			gsub(/&#x0A;|&#x0D;|&#x09;/, " ", s); gsub(/&quot;/, "\"", s); gsub(/&apos;/, "\047", s)
			gsub(/&lt;/, "<", s); gsub(/&gt;/, ">", s); gsub(/&amp;/, "\\&", s)
			return s
		}
		function finish() {
			if (!open) return
			open = 0
			if (status != "run") return # disabled / filtered: not executed
			if (fail) print "F\t" name "\t"
			else if (result == "skipped") print "S\t" name "\t" msg
			else print "P\t" name "\t"
		}
		/<testcase / {
			finish()
			name = attr("classname") "." attr("name")
			status = attr("status"); result = attr("result")
			fail = 0; msg = ""; open = 1
			if ($0 ~ /\/>[ \t\r]*$/) finish()
			next
		}
		/<failure/ { fail = 1 }
		/<skipped/ { msg = unxml(attr("message")) }
		/<\/testcase>/ { finish() }
		END { finish() }
	' "$xml")
else
	echo "rxe: no XML report from the test binary (it did not start, crashed or was killed)" >&2
fi

ok=1
for n in "${failed_names[@]}"; do
	echo "rxe: FAILED: $n" >&2
done
if ((skipped)); then
	for s in "${skipped_lines[@]}"; do
		echo "rxe: warning: skipped: $s" >&2
	done
	if [[ ${CI:-} == true ]]; then
		echo "rxe: CI=true: skipped tests are failures in the rxe tier" >&2
		ok=0
	fi
fi
if ((failed)); then ok=0; fi
if ((passed + failed + skipped == 0)); then
	echo "rxe: no test was executed" >&2
	ok=0
fi
if ((rc != 0)); then
	case $rc in
	124) echo "rxe: the guest timed out" >&2 ;;
	125) echo "rxe: the guest failed (see above)" >&2 ;;
	*) echo "rxe: the test binary exited with status $rc" >&2 ;;
	esac
	ok=0
fi
echo "rxe: $passed passed, $failed failed, $skipped skipped"
((ok)) || exit 1
exit 0
