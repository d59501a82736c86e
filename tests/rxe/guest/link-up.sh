#!/bin/bash
# Brings an end of the guest's veth pair up with the route to the other end's address
# over it (table 100, which init.sh's rules send device-bound traffic to). A link that
# goes down loses that route: the tests that take one down run this to put it back.
# usage: link-up.sh v1|v2
set -euo pipefail
case ${1:-} in
v1) other=198.51.100.1 ;;
v2) other=192.0.2.1 ;;
*)
	echo "usage: link-up.sh v1|v2" >&2
	exit 2
	;;
esac
ip link set "$1" up
ip route replace "$other" dev "$1" table 100
