#include "shim/real.h"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace rxio::shim {
namespace {

Real table;
std::atomic<bool> resolved{false};

template <typename F>
void find(F& slot, const char* name) {
  void* symbol = dlsym(RTLD_NEXT, name);
  if (!symbol) {
    // No allocation and no stdio here: the shim may be half-loaded.
    const char* parts[] = {"rxio-preload: the C library has no ", name, "; cannot run under the shim\n"};
    for (const char* p : parts) (void)!::write(STDERR_FILENO, p, std::strlen(p));
    std::abort();
  }
  slot = reinterpret_cast<F>(symbol);
}

void resolve() noexcept {
  find(table.socket, "socket");
  find(table.bind, "bind");
  find(table.listen, "listen");
  find(table.accept, "accept");
  find(table.accept4, "accept4");
  find(table.connect, "connect");
  find(table.read, "read");
  find(table.readv, "readv");
  find(table.write, "write");
  find(table.writev, "writev");
  find(table.send, "send");
  find(table.sendto, "sendto");
  find(table.sendmsg, "sendmsg");
  find(table.recv, "recv");
  find(table.recvfrom, "recvfrom");
  find(table.recvmsg, "recvmsg");
  find(table.sendfile, "sendfile");
  find(table.shutdown, "shutdown");
  find(table.close, "close");
  find(table.getsockopt, "getsockopt");
  find(table.setsockopt, "setsockopt");
  find(table.fcntl, "fcntl");
  find(table.ioctl, "ioctl");
  find(table.dup, "dup");
  find(table.dup2, "dup2");
  find(table.dup3, "dup3");
  find(table.poll, "poll");
  find(table.ppoll, "ppoll");
  find(table.select, "select");
  find(table.pselect, "pselect");
  find(table.epoll_create, "epoll_create");
  find(table.epoll_create1, "epoll_create1");
  find(table.epoll_ctl, "epoll_ctl");
  find(table.epoll_wait, "epoll_wait");
  find(table.epoll_pwait, "epoll_pwait");
  find(table.execve, "execve");
  find(table.execvpe, "execvpe");
  find(table.fexecve, "fexecve");
  resolved.store(true, std::memory_order_release);
}

// Before main, while the process has one thread.
[[gnu::constructor]] void resolve_at_load() { resolve(); }

}  // namespace

const Real& real() noexcept {
  // Another library's constructor may call in before ours ran; resolving twice writes
  // the same values.
  if (!resolved.load(std::memory_order_acquire)) resolve();
  return table;
}

}  // namespace rxio::shim
