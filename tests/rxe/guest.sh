#!/bin/bash
# Run one command inside a QEMU guest (Debian's kernel, TCG) that has Soft-RoCE
# (rdma_rxe) devices, with the host's root filesystem shared over 9p.
# See docs/testing.md (the guest and why it exists) and usage() below.
set -euo pipefail

usage() {
	cat <<'EOF'
usage: tests/rxe/guest.sh [--timeout SECS] [--env NAME=VALUE]... -- COMMAND [ARGS...]
       tests/rxe/guest.sh [--timeout SECS] [--env NAME=VALUE]... --shell

Boots a Soft-RoCE guest and runs COMMAND in it, in the current directory (the host
root is the guest's root). The command's stdout+stderr are streamed to stdout and
its exit status is returned. --shell gives an interactive shell on the serial
console instead (quit QEMU with Ctrl-A x).

Guest devices (exported to the command):
  RXIO_RXE_DEV=rxe0            Soft-RoCE on lo (verbs only; rdma_cm needs a real netdev)
  RXIO_RXE_CM_DEV_A=rxe1       on veth v1, RXIO_RXE_CM_ADDR_A=192.0.2.1
  RXIO_RXE_CM_DEV_B=rxe2       on veth v2, RXIO_RXE_CM_ADDR_B=198.51.100.1
  RXIO_GUEST_LINK_UP=PATH      brings v1 or v2 back up with its route (link-up.sh v1)
  RXIO_IN_GUEST=1, plus the host's PATH and HOME and every --env.

Options:
  --timeout SECS   kill the guest after SECS seconds (default $RXIO_GUEST_TIMEOUT
                   or 600; none for --shell unless given)
  --env NAME=VALUE export NAME=VALUE to the command (repeatable)

Exit status: the command's; 124 timeout; 125 the guest failed (boot, set-up, no
status); 77 prerequisites missing (1 instead when CI=true); 2 bad usage.
Environment: RXIO_GUEST_KERNEL=/boot/vmlinuz-VER picks the kernel.
EOF
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prog=rxio-guest

timeout_s=
shell=0
envs=()
while (($#)); do
	case $1 in
	--timeout)
		(($# >= 2)) || { usage >&2; exit 2; }
		timeout_s=$2
		shift 2
		;;
	--timeout=*) timeout_s=${1#*=}; shift ;;
	--env)
		(($# >= 2)) || { usage >&2; exit 2; }
		envs+=("$2")
		shift 2
		;;
	--env=*) envs+=("${1#*=}"); shift ;;
	--shell) shell=1; shift ;;
	-h | --help) usage; exit 0 ;;
	--) shift; break ;;
	*) echo "$prog: unknown argument: $1" >&2; usage >&2; exit 2 ;;
	esac
done
if ((shell)); then
	(($# == 0)) || { echo "$prog: --shell takes no command" >&2; exit 2; }
else
	(($# > 0)) || { usage >&2; exit 2; }
	timeout_s=${timeout_s:-${RXIO_GUEST_TIMEOUT:-600}}
fi
if [[ -n $timeout_s && ! $timeout_s =~ ^[1-9][0-9]*$ ]]; then
	echo "$prog: --timeout wants a positive number of seconds, not '$timeout_s'" >&2
	exit 2
fi
for e in "${envs[@]}"; do
	if [[ ! $e =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
		echo "$prog: --env wants NAME=VALUE, not '$e'" >&2
		exit 2
	fi
done

# --- prerequisites ----------------------------------------------------------------

# Newest /boot/vmlinuz-* whose modules include rdma_rxe (the host's running kernel
# may well have no InfiniBand at all: that is why there is a guest).
find_kernel() {
	local k ver
	if [[ -n ${RXIO_GUEST_KERNEL:-} ]]; then
		echo "$RXIO_GUEST_KERNEL"
		return
	fi
	for k in $(compgen -G '/boot/vmlinuz-*' | sort -rV); do
		ver=${k#/boot/vmlinuz-}
		if [[ -r $k ]] && grep -qE '(^|/)rdma_rxe\.ko(\.[a-z]+)?:' \
			"/lib/modules/$ver/modules.dep" 2>/dev/null; then
			echo "$k"
			return
		fi
	done
}

# A busybox that needs no shared libraries: it runs alone in the initramfs.
find_busybox() {
	local b out
	for b in /bin/busybox /usr/bin/busybox /usr/lib/initramfs-tools/bin/busybox; do
		[[ -x $b ]] || continue
		out=$(LC_ALL=C ldd "$b" 2>&1 || true)
		if [[ $out == *"not a dynamic executable"* ]]; then
			echo "$b"
			return
		fi
	done
}

missing=()
command -v qemu-system-x86_64 >/dev/null ||
	missing+=("qemu-system-x86_64 (package qemu-system-x86)")
kernel=$(find_kernel)
if [[ -z $kernel ]]; then
	missing+=("a kernel /boot/vmlinuz-VER whose /lib/modules/VER has rdma_rxe (package linux-image-amd64)")
elif [[ ! -r $kernel ]]; then
	missing+=("readable kernel $kernel")
fi
busybox=$(find_busybox)
[[ -n $busybox ]] || missing+=("a statically linked busybox (package busybox-static)")
for tool in cpio gzip rdma ip modprobe; do
	command -v "$tool" >/dev/null || missing+=("$tool (package for it: cpio/gzip/rdma-core, iproute2, kmod)")
done
# 9p with security_model=none writes files as QEMU's user; the guest runs as root.
((EUID == 0)) || missing+=("root: run as root (QEMU must own what the guest writes to the shared root)")
if ((${#missing[@]})); then
	{
		echo "$prog: cannot run the Soft-RoCE guest; missing:"
		printf '  - %s\n' "${missing[@]}"
		echo "fix (Debian, as root): apt-get install -y qemu-system-x86 linux-image-amd64 busybox-static" \
			"rdma-core ibverbs-providers ibverbs-utils rdmacm-utils perftest iproute2 kmod cpio"
	} >&2
	if [[ ${CI:-} == true ]]; then
		echo "$prog: CI=true, so this is an error, not a skip" >&2
		exit 1
	fi
	exit 77
fi
kver=${kernel##*/vmlinuz-}
moddir=/lib/modules/$kver

# --- initramfs (cached) -----------------------------------------------------------

# Module files, relative to $moddir, in load order: for each target, its
# modules.dep dependencies reversed (the order modprobe loads them), then itself.
# Targets built into the kernel (modules.builtin) need nothing.
initramfs_modules() {
	local target line path dep i
	local -a deps order=()
	local -A seen=()
	for target in virtio_pci 9pnet_virtio 9p; do
		line=$(grep -E "(^|/)${target}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" || true)
		if [[ -z $line ]]; then
			grep -qE "(^|/)${target}\.ko\$" "$moddir/modules.builtin" 2>/dev/null && continue
			echo "$prog: $moddir has no module $target (needed to mount the host root over 9p)" >&2
			return 1
		fi
		path=${line%%:*}
		read -r -a deps <<<"${line#*:}"
		for ((i = ${#deps[@]} - 1; i >= -1; i--)); do
			if ((i >= 0)); then dep=${deps[i]}; else dep=$path; fi
			[[ -n ${seen[$dep]:-} ]] && continue
			seen[$dep]=1
			order+=("$dep")
		done
	done
	printf '%s\n' "${order[@]}"
}

# busybox insmod cannot be relied on to read compressed modules: unpack on the host.
unpack_module() {
	case $1 in
	*.ko) cat "$1" ;;
	*.ko.xz) xz -dc "$1" ;;
	*.ko.zst) zstd -dcq "$1" ;;
	*.ko.gz) gzip -dc "$1" ;;
	*) echo "$prog: unknown module format: $1" >&2; return 1 ;;
	esac
}

mapfile -t modules < <(initramfs_modules)
((${#modules[@]})) || { echo "$prog: could not work out the initramfs modules" >&2; exit 125; }
key=$({
	echo "$kver"
	cat "$here/guest/initramfs-init"
	(cd "$moddir" && sha256sum "${modules[@]}")
	sha256sum "$busybox"
} | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/rxio
initrd=$cache/initramfs-$kver-$key.cpio.gz
if [[ ! -s $initrd ]]; then
	mkdir -p "$cache"
	stage=$(mktemp -d "$cache/stage.XXXXXX")
	tmp_initrd=$stage.cpio.gz
	build_ok=0
	(
		set -e
		mkdir -p "$stage"/{bin,dev,proc,sys,mnt,modules}
		cp "$busybox" "$stage/bin/busybox"
		for applet in sh mount mkdir cat insmod poweroff chroot; do
			ln -s busybox "$stage/bin/$applet"
		done
		cp "$here/guest/initramfs-init" "$stage/init"
		chmod 755 "$stage/init"
		for m in "${modules[@]}"; do
			name=${m##*/}
			name=${name%.ko*}.ko
			unpack_module "$moddir/$m" >"$stage/modules/$name"
			echo "$name" >>"$stage/modules/order"
		done
		cd "$stage"
		find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet | gzip -1 >"$tmp_initrd"
	) && build_ok=1
	rm -rf "$stage"
	if ((!build_ok)); then
		rm -f "$tmp_initrd"
		echo "$prog: building the initramfs failed" >&2
		exit 125
	fi
	# Atomic: concurrent runs each build their own and the last rename wins.
	mv -f "$tmp_initrd" "$initrd"
	# Prune builds for old inputs; only old ones, as a concurrent run may be about
	# to boot from one.
	find "$cache" -maxdepth 1 \( -name 'initramfs-*.cpio.gz' -o -name 'stage.*' \) \
		! -name "${initrd##*/}" -mmin +1440 -exec rm -rf {} + 2>/dev/null || true
fi

# --- run --------------------------------------------------------------------------

# The run directory must be visible at the same path in the guest: not under the
# guest's own /proc, /sys, /dev or /run mounts, and no blanks (kernel command line).
tmpbase=$(realpath -m "${TMPDIR:-/tmp}")
case $tmpbase in
/proc | /proc/* | /sys | /sys/* | /dev | /dev/* | /run | /run/* | *[[:space:]]*) tmpbase=/tmp ;;
esac
run=$(mktemp -d "$tmpbase/rxio-guest.XXXXXX")
qpid='' tpid='' spid=''
# shellcheck disable=SC2317 # invoked from the traps
cleanup() {
	local pid i
	trap - EXIT INT TERM HUP
	set +e
	if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
		kill -TERM "$qpid" 2>/dev/null
		for ((i = 0; i < 50; i++)); do
			kill -0 "$qpid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$qpid" 2>/dev/null
		wait "$qpid" 2>/dev/null
	fi
	for pid in $tpid $spid; do
		kill -TERM "$pid" 2>/dev/null
		wait "$pid" 2>/dev/null
	done
	rm -rf "$run"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

cp "$here/guest/init.sh" "$here/guest/link-up.sh" "$run/"
: >"$run/out.log"
{
	printf 'export %s=%q\n' PATH "$PATH" HOME "$HOME"
	for e in "${envs[@]}"; do
		printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"
	done
	printf 'cd -- %q || exit 125\n' "$PWD"
	if ((shell)); then
		size=$(stty size </dev/tty 2>/dev/null || true)
		[[ $size =~ ^[0-9]+\ [0-9]+$ ]] && printf 'stty rows %s cols %s\n' "${size% *}" "${size#* }"
		printf 'export TERM=%q\n' "${TERM:-vt100}"
		printf 'exec bash -i\n'
	else
		printf 'exec'
		printf ' %q' "$@"
		printf '\n'
	fi
} >"$run/cmd.sh"
if ((shell)); then echo shell >"$run/mode"; else echo cmd >"$run/mode"; fi

# shellcheck disable=SC2054 # the commas are QEMU's
qemu=(
	qemu-system-x86_64
	-accel tcg,thread=multi -cpu max -smp 2 -m 2G # KVM guests hang on these hosts
	-nographic -no-reboot -nic none
	-kernel "$kernel" -initrd "$initrd"
	-append "console=ttyS0 quiet panic=-1 rxio_run=$run"
	-virtfs local,path=/,mount_tag=host,security_model=none,multidevs=remap
)

print_console() {
	echo "$prog: ---- guest console ($1) ----" >&2
	# Without SeaBIOS's terminal resets and clears (ESC c, ESC [2J), and CRs.
	tail -n 200 "$run/console.log" 2>/dev/null |
		sed -e $'s/\e\\[[0-9;?]*[A-Za-z]//g' -e $'s/\ec//g' -e $'s/\r//g' >&2 || true
	echo "$prog: ---- end of guest console ----" >&2
}

start=$SECONDS
if ((shell)); then
	echo "$prog: booting the guest (Ctrl-A x quits QEMU) ..." >&2
	if [[ -n $timeout_s ]]; then
		sleep "$timeout_s" &
		spid=$!
		# Foreground-ish: QEMU needs the terminal, so it stays in our process group.
		"${qemu[@]}" <&0 &
		qpid=$!
		who=
		wait -n -p who "$qpid" "$spid" || true
		if [[ $who == "$spid" ]]; then
			echo "$prog: shell timed out after $timeout_s s" >&2
			exit 124
		fi
	else
		"${qemu[@]}" || true
	fi
	rc=$(cat "$run/status" 2>/dev/null || echo 125)
	exit "$rc"
fi

# QEMU runs in the background (same process group, so a process-group kill from a
# test harness reaches it too); its serial console goes to a file, and the command's
# output is streamed from out.log by tail.
"${qemu[@]}" </dev/null >"$run/console.log" 2>&1 &
qpid=$!
tail -n +1 -f --pid="$qpid" "$run/out.log" &
tpid=$!
sleep "$timeout_s" &
spid=$!
who=
qrc=0
wait -n -p who "$qpid" "$spid" || qrc=$?
if [[ $who != "$qpid" ]]; then
	kill -TERM "$qpid" 2>/dev/null || true
	wait "$tpid" 2>/dev/null || true
	tpid=
	echo "$prog: timed out after $timeout_s s; the guest was killed" >&2
	print_console "timeout"
	exit 124
fi
qpid=
kill "$spid" 2>/dev/null || true
wait "$spid" 2>/dev/null || true
spid=
wait "$tpid" 2>/dev/null || true # tail --pid ends after its last read
tpid=

if [[ -f $run/setup-failed ]]; then
	echo "$prog: guest set-up failed at: $(cat "$run/setup-failed")" >&2
	print_console "set-up failure"
	exit 125
fi
if [[ ! -s $run/status ]]; then
	echo "$prog: the guest reported no exit status (QEMU exited with $qrc after $((SECONDS - start)) s)" >&2
	print_console "no status"
	exit 125
fi
rc=$(<"$run/status")
[[ $rc =~ ^[0-9]+$ ]] || { echo "$prog: bad status '$rc' from the guest" >&2; exit 125; }
exit "$rc"
