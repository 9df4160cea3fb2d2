package proxy

import (
	"context"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// pacedConn is a client on a slow but steady link: it takes at most chunk
// bytes from its socket every so often, under its TLS.
type pacedConn struct {
	net.Conn
	chunk int
	every time.Duration
	next  time.Time
}

func (c *pacedConn) Read(p []byte) (int, error) {
	time.Sleep(time.Until(c.next))
	if len(p) > c.chunk {
		p = p[:c.chunk]
	}
	n, err := c.Conn.Read(p)
	c.next = time.Now().Add(c.every)
	return n, err
}

// TestH2StallSteadySlowReader: the HTTP/2 write stall bound closes a
// connection whose client takes no byte for PROXY_IDLE_TIMEOUT (here 1.5 s),
// not one whose client takes bytes all the time, only too slowly to finish a
// 32 KiB write within the bound. A gRPC stream (no idle watchdog) to a
// client that grants large windows and takes 1 KiB every 200 ms must keep
// going for 4.5 s. A 32 KiB write to it takes over 6 s: when each write had
// to end within the bound, the proxy closed the connection. The margins
// are wide for a busy machine: the client's TCP takes bytes about every
// 300 ms, the proxy looks every 375 ms and cuts after 1.9 s without any.
func TestH2StallSteadySlowReader(t *testing.T) {
	t.Parallel()
	const idle = 1500 * time.Millisecond
	e := startGRPC(t, topoH2C, func(c *Config) { c.IdleTimeout = idle; c.AccessLog = true })
	for _, port := range grpcPorts {
		t.Run(string(port), func(t *testing.T) {
			from := len(strings.Split(e.tp.Log.String(), "\n"))
			dialer := &net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
				// An Ethernet MSS, not loopback's 64 KiB, and a small
				// receive buffer: the client's TCP then opens its
				// window a segment at a time as it reads, as on a real
				// link, and the proxy's socket sees bytes taken at
				// least every 250 ms or so (measured), not half a
				// large buffer at once after seconds.
				rc.Control(func(fd uintptr) {
					syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 1460)
					syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4<<10)
				})
				return nil
			}}
			cc := e.dial(t, port,
				grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
					c, err := dialer.DialContext(ctx, "tcp", addr)
					if err != nil {
						return nil, err
					}
					// 1 KiB every 200 ms: 5 KiB/s.
					return &pacedConn{Conn: c, chunk: 1 << 10, every: 200 * time.Millisecond}, nil
				}),
				// Large windows, as browsers and grpc-go's BDP estimator
				// grant: the client's socket is what holds the data back.
				grpc.WithInitialWindowSize(32<<20), grpc.WithInitialConnWindowSize(64<<20))
			tc := testgrpc.NewTestServiceClient(cc)
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			// 16 MiB, far more than the socket buffers hold.
			stream := streamingCall(t, ctx, tc, 4096, 4<<10)
			start := time.Now()
			got := 0
			for time.Since(start) < 3*idle {
				res, err := stream.Recv()
				if err != nil {
					t.Fatalf("Recv after %v (%d KiB): %v", time.Since(start).Round(time.Millisecond), got>>10, err)
				}
				got += len(res.GetPayload().GetBody())
			}
			t.Logf("received %d KiB in %v", got>>10, time.Since(start).Round(time.Millisecond))
			// The proxy's handler of the call ends (and writes its access
			// line) only when the call does: it must still be running.
			ended := func() string {
				for _, l := range strings.Split(e.tp.Log.String(), "\n")[from-1:] {
					if isAccess(t, "/grpc.testing.TestService/StreamingOutputCall")(l) {
						return l
					}
				}
				return ""
			}
			if l := ended(); l != "" {
				t.Fatalf("the proxy ended the call while its client was reading: %s", l)
			}
			// The client gives up: the call ends, and its access line is
			// written before the next port's subtest counts the lines it
			// must not see.
			cancel()
			waitFor(t, 10*time.Second, func() bool { return ended() != "" }, func() string {
				return "no access line for the call 10 s after its client cancelled it"
			})
		})
	}
}
