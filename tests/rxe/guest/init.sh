#!/bin/bash
# PID 1 inside the rxio guest, chrooted into the host root (see initramfs-init).
# Sets up Soft-RoCE, runs $RUN/cmd.sh (written by tests/rxe/guest.sh), writes its
# exit status to $RUN/status and powers off. No `set -e`: if PID 1 exits the kernel
# panics, and the host would only see "no status".
#
# Files in the run directory $1:
#   mode          "cmd" or "shell"
#   cmd.sh        the command (exports, cd, exec)
#   out.log       set-up failures and the command's stdout+stderr (cmd mode)
#   setup-failed  name of the set-up step that failed
#   status        exit status of the command
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
run=$1
mode=$(cat "$run/mode" 2>/dev/null || echo cmd)
if [[ $mode == shell ]]; then
	log=/dev/console
else
	log=$run/out.log
fi

finish() {
	echo "$1" >"$run/status"
	sync
	busybox poweroff -f
	# Not reached unless busybox is missing.
	echo o >/proc/sysrq-trigger
	sleep 10
}

step() {
	local name=$1 out up
	shift
	# Progress with guest uptime on the serial console (shown when something fails).
	read -r up _ </proc/uptime
	echo "rxio-guest: [$up] $name" >/dev/console
	if ! out=$("$@" 2>&1); then
		echo "$name" >"$run/setup-failed"
		printf 'rxio-guest: set-up step failed: %s\n  command: %s\n%s\n' \
			"$name" "$*" "$out" >>"$log"
		finish 125
	fi
}

# Bounded: TCG is slow, but an rxe port that is not ACTIVE after this is broken.
wait_active() {
	local dev i state
	for dev in "$@"; do
		for ((i = 0; i < 300; i++)); do
			state=$(cat "/sys/class/infiniband/$dev/ports/1/state" 2>/dev/null)
			[[ $state == *ACTIVE* ]] && break
			sleep 0.1
		done
		if [[ $state != *ACTIVE* ]]; then
			echo "port 1 of $dev is not ACTIVE after 30 s (state: ${state:-none})"
			rdma link show 2>&1
			return 1
		fi
	done
}

hostname rxio-guest 2>/dev/null
step "load the RDMA modules" modprobe -a rdma_rxe ib_uverbs rdma_ucm
ulimit -l unlimited
step "bring lo up" ip link set lo up
step "add rxe0 on lo" rdma link add rxe0 type rxe netdev lo
# rdma_cm needs a real netdev; both veth ends stay in the initial namespace because
# this kernel's rxe keeps its UDP socket there (separate namespaces lose traffic).
step "create the veth pair v1/v2" ip link add v1 type veth peer name v2
step "address v1" ip addr add 192.0.2.1/24 dev v1
step "address v2" ip addr add 198.51.100.1/24 dev v2
step "bring v1 up" ip link set v1 up
step "bring v2 up" ip link set v2 up
# Both addresses are local, so by default traffic between them goes through lo and
# rdma_cm keeps both ends on one device, or (client bound to the other address)
# fails: ARP drops local sources (ADDR_ERROR -110) and the passive side's route
# check (oif v1 back to 198.51.100.1) finds no route (REJ, consumer defined). Route
# device-bound lookups between the two addresses over the veth, accept the local
# sources, and leave unbound traffic (TCP) on lo.
veth_routes() {
	sysctl -qw net.ipv4.conf.all.accept_local=1 &&
		ip rule add pref 1000 lookup local &&
		ip rule del pref 0 &&
		ip rule add pref 100 from 192.0.2.1 to 198.51.100.1 oif v1 lookup 100 &&
		ip rule add pref 101 from 198.51.100.1 to 192.0.2.1 oif v2 lookup 100 &&
		"$run/link-up.sh" v1 && "$run/link-up.sh" v2
}
step "route between the veth addresses over the veth" veth_routes
step "add rxe1 on v1" rdma link add rxe1 type rxe netdev v1
step "add rxe2 on v2" rdma link add rxe2 type rxe netdev v2
step "wait for the rxe ports to be ACTIVE" wait_active rxe0 rxe1 rxe2

export RXIO_IN_GUEST=1
export RXIO_RXE_DEV=rxe0
export RXIO_RXE_CM_DEV_A=rxe1 RXIO_RXE_CM_ADDR_A=192.0.2.1
export RXIO_RXE_CM_DEV_B=rxe2 RXIO_RXE_CM_ADDR_B=198.51.100.1
export RXIO_GUEST_LINK_UP=$run/link-up.sh

read -r up _ </proc/uptime
echo "rxio-guest: [$up] set-up done, running the command" >/dev/console
if [[ $mode == shell ]]; then
	# A real tty (not /dev/console) so that the shell gets job control and ^C.
	setsid -c -w bash "$run/cmd.sh" <>/dev/ttyS0 >&0 2>&0
	rc=$?
else
	bash "$run/cmd.sh" </dev/null >>"$log" 2>&1
	rc=$?
fi
finish "$rc"
