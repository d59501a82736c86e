// memcached under the shim: four worker threads serving eight connections at once, which
// exercises the shim's locking on both sides, with values up to 512 KiB of random bytes.
#include <fstream>

#include "apps.h"

namespace rxio::apps {
namespace {

// A client of memcached's text protocol: eight connections from as many threads, each
// storing values of many sizes and reading them back one by one and all at once, then
// counting with incr. It holds its connections open until stdin ends, so that the test
// sees them on the boards.
constexpr const char* kClient = R"(
import os, socket, sys, threading

port = int(sys.argv[1])
SIZES = [0, 1, 100, 1400, 4096, 65536, 200000, 512 * 1024]
CONNECTIONS = 8
failures = []
sockets = []

def expect(f, line):
    got = f.readline()
    if got != line:
        raise AssertionError("expected %r, got %r" % (line, got[:200]))

def expect_value(f, key, value):
    expect(f, b"VALUE %s 0 %d\r\n" % (key, len(value)))
    if f.read(len(value) + 2) != value + b"\r\n":
        raise AssertionError("the value of %s came back changed" % key.decode())

def session(n):
    try:
        s = socket.create_connection(("127.0.0.1", port))
        sockets.append(s)
        f = s.makefile("rb")
        values = {}
        for size in SIZES:
            key = b"c%d-%d" % (n, size)
            values[key] = os.urandom(size)
            s.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key, size, values[key]))
            expect(f, b"STORED\r\n")
        for key, value in values.items():
            s.sendall(b"get %s\r\n" % key)
            expect_value(f, key, value)
            expect(f, b"END\r\n")
        s.sendall(b"get %s\r\n" % b" ".join(values))
        for key, value in values.items():
            expect_value(f, key, value)
        expect(f, b"END\r\n")
        counter = b"n%d" % n
        s.sendall(b"set %s 0 0 1\r\n0\r\n" % counter)
        expect(f, b"STORED\r\n")
        for i in range(1, 101):
            s.sendall(b"incr %s 1\r\n" % counter)
            expect(f, b"%d\r\n" % i)
    except Exception as e:
        failures.append("connection %d: %s" % (n, e))

threads = [threading.Thread(target=session, args=(n,)) for n in range(CONNECTIONS)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    print("\n".join(failures), flush=True)
    sys.exit(1)
print("checked %d connections" % CONNECTIONS, flush=True)
sys.stdin.read()
for s in sockets:
    s.close()
)";

class Memcached : public AppTest {
 protected:
  Memcached() : AppTest({"memcached", "python3"}) {}
};

TEST_P(Memcached, ServesThreadedClients) {
  const std::string port = std::to_string(free_port());
  Process server = start(server_prefix() + "memcached -p " + port + " -U 0 -t 4 -u root -l 127.0.0.1");
  ASSERT_TRUE(wait_listening(server, std::stoi(port)));
  std::ofstream(path("client.py")) << kClient;

  Process client = start(client_prefix() + quote(python()) + " " + quote(path("client.py")) + " " + port, true);
  expect_backends(server, client);
  client.close_stdin();
  Result done = finish(client);
  EXPECT_TRUE(done.exited_0 && done.output.find("checked 8 connections") != std::string::npos) << done.output;

  expect_server_totals(server, 8);
  EXPECT_TRUE(server.stop()) << "memcached did not end on SIGTERM:\n" << server.output();
}

INSTANTIATE_TEST_SUITE_P(Apps, Memcached, testing::Values(Shimmed::both, Shimmed::server, Shimmed::client),
                         test_name);

}  // namespace
}  // namespace rxio::apps
