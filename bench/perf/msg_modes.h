// The transport-level subcommands: rxio's Connection API (rings, credits, rendezvous)
// between the two processes, measured the way the verbs-level ones are.
#pragma once

namespace rxio::perf {

struct Options;

void run_msg_bw(const Options& options);
void run_msg_lat(const Options& options);

}  // namespace rxio::perf
