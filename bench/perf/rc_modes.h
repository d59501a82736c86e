// The verbs-level subcommands: one RC QP between the two processes, as perftest.
#pragma once

namespace rxio::perf {

struct Options;

void run_write_bw(const Options& options);
void run_write_lat(const Options& options);
void run_read_bw(const Options& options);
void run_read_lat(const Options& options);
void run_send_bw(const Options& options);
void run_send_lat(const Options& options);

}  // namespace rxio::perf
