package proxy

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/orca"
	"google.golang.org/grpc/status"

	"github.com/cells-proxy/cells-proxy/internal/testport"
)

// gRPC through the proxy (issue 2, point 8, and the gRPC parts of points 3,
// 4 and 9). Every behaviour is checked in both topologies of
// docs/cells-behaviour.md and on both ports of the proxy:
//
//   - topology A: Cells keeps TLS and splits gRPC from HTTP by content type
//     on its one port (CELLS_GRPC_UPSTREAM defaults to CELLS_UPSTREAM);
//   - topology B: Cells speaks plain HTTP on its main port and cleartext
//     HTTP/2 (h2c, prior knowledge) on its gRPC port;
//   - the main port (TLS, cmux, gRPC split by content type) and the
//     dedicated gRPC port (PYDIO_GRPC_EXTERNAL, TLS, every call is gRPC).

// grpcTopology is how the test Cells serves gRPC.
type grpcTopology string

const (
	topoTLS grpcTopology = "tls-upstream" // A: one TLS port, split by content type
	topoH2C grpcTopology = "h2c-upstream" // B: plain HTTP port + h2c gRPC port
)

var grpcTopologies = []grpcTopology{topoTLS, topoH2C}

// grpcPort names a listener of the proxy.
type grpcPort string

const (
	portMain      grpcPort = "main-port"
	portDedicated grpcPort = "dedicated-port"
)

var grpcPorts = []grpcPort{portMain, portDedicated}

// grpcEnv is a proxy in front of a test Cells that serves gRPC.
type grpcEnv struct {
	tp  *testProxy
	svc *probeService
	// rec records the requests that reached Cells' HTTP side.
	rec *recorder
	// grpcReqs counts the requests that reached the gRPC side of a
	// topology A upstream.
	grpcReqs atomic.Int64
	// kill drops every upstream connection and listener at once, as a
	// crash of Cells does.
	kill func()
}

// startGRPC starts a test Cells in topology topo and a proxy in front of
// it, with the dedicated gRPC port on. configure, if not nil, adjusts the
// proxy's configuration before it starts; setup is startProxy's.
func startGRPC(t *testing.T, topo grpcTopology, configure func(*Config), setup ...func(*Server)) *grpcEnv {
	t.Helper()
	e := &grpcEnv{svc: newProbeService(), rec: &recorder{}}
	// The interop server's own options: per-call ORCA metrics in trailers.
	gs := grpc.NewServer(orca.CallMetricsServerOption(nil))
	testgrpc.RegisterTestServiceServer(gs, e.svc)

	var cfg *Config
	switch topo {
	case topoTLS:
		// As Cells' common/server/caddy/mux: HTTP/2 with a gRPC content
		// type goes to the gRPC server, the rest to the HTTP handlers.
		up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
				e.grpcReqs.Add(1)
				gs.ServeHTTP(w, r)
				return
			}
			e.rec.ServeHTTP(w, r)
		}))
		t.Cleanup(gs.Stop)
		cfg = testConfig(up)
		e.kill = up.Close
	case topoH2C:
		up := newUpstream(t, upPlain, e.rec)
		ln := newCrashListener(t)
		serveGRPC(t, gs, ln)
		cfg = testConfig(up)
		cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
		e.kill = ln.crash
	}
	cfg.GRPCAddr = "127.0.0.1:0"
	if configure != nil {
		configure(cfg)
	}
	e.tp = startProxy(t, cfg, setup...)
	return e
}

// addr is the proxy's address for port.
func (e *grpcEnv) addr(port grpcPort) string {
	if port == portDedicated {
		return e.tp.GRPCAddr().String()
	}
	return e.tp.Addr().String()
}

// dial is a grpc-go client of the proxy's port, over TLS that trusts the
// proxy, as Cells Sync connects. It is closed when the test ends.
func (e *grpcEnv) dial(t testing.TB, port grpcPort, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	return dialProxy(t, e.tp, e.addr(port), opts...)
}

// wantMetadata checks that Cells got each key of kv (key, value, ...)
// once, with its value.
func wantMetadata(t *testing.T, md metadata.MD, kv ...string) {
	t.Helper()
	for i := 0; i+1 < len(kv); i += 2 {
		if got := md.Get(kv[i]); !slices.Equal(got, []string{kv[i+1]}) {
			t.Errorf("Cells' %s = %q, want [%q]", kv[i], got, kv[i+1])
		}
	}
}

func dialProxy(t testing.TB, tp *testProxy, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	cc := newGRPCClient(t, tp, addr, opts...)
	t.Cleanup(func() { cc.Close() })
	return cc
}

// newGRPCClient is dialProxy for a caller that closes the connection itself.
func newGRPCClient(t testing.TB, tp *testProxy, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	t.Helper()
	// No ServerName: grpc-go then verifies the name in the authority and
	// sends host:port as :authority, as Cells Sync does.
	tlsConf := tp.TLSConfig()
	tlsConf.ServerName = ""
	opts = append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsConf))}, opts...)
	cc, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", addr, err)
	}
	return cc
}

// eachGRPC runs f for every topology and port, each a subtest with its own
// test Cells and proxy per topology.
func eachGRPC(t *testing.T, configure func(*Config), f func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient)) {
	t.Helper()
	for _, topo := range grpcTopologies {
		t.Run(string(topo), func(t *testing.T) {
			e := startGRPC(t, topo, configure)
			for _, port := range grpcPorts {
				t.Run(string(port), func(t *testing.T) {
					tc := testgrpc.NewTestServiceClient(e.dial(t, port))
					// Connect first, so that a short deadline in f is
					// not spent on the TLS handshake.
					if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}); err != nil {
						t.Fatalf("first call: %v", err)
					}
					f(t, e, port, tc)
				})
			}
		})
	}
}

// crashListener is a real TCP listener that remembers its connections so
// that crash can drop them all, as a dying Cells process would.
type crashListener struct {
	net.Listener
	mu    sync.Mutex
	conns []net.Conn
}

func newCrashListener(t testing.TB) *crashListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return &crashListener{Listener: ln}
}

func (l *crashListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.conns = append(l.conns, c)
	l.mu.Unlock()
	return c, nil
}

func (l *crashListener) crash() {
	l.Listener.Close()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.Close()
	}
}

// probeService is the upstream gRPC service: the interop TestService, plus
// what a test asks for in the x-probe request metadata, plus a record of
// the metadata each call arrived with.
//
//	x-probe: hold  the handler waits until its context ends and reports how
//	               it ended on the held channel
//	x-probe: echo  FullDuplexCall sends every request payload back as is
//
// In hold and echo modes, request metadata x-echo-* comes back as response
// headers and x-trail-* as trailers.
type probeService struct {
	testgrpc.TestServiceServer

	mu sync.Mutex
	md []metadata.MD

	held chan *heldCall
}

// heldCall is a call in hold mode, seen from the upstream handler.
type heldCall struct {
	hasDeadline bool
	ended       chan error // the handler context's error, once it ends
}

func newProbeService() *probeService {
	return &probeService{
		TestServiceServer: interop.NewTestServer(interop.NewTestServerOptions{MetricsRecorder: orca.NewServerMetricsRecorder()}),
		held:              make(chan *heldCall, 16),
	}
}

// newProbeServer is a grpc-go server of a new probeService, stopped when
// the test ends.
func newProbeServer(t testing.TB) (*probeService, *grpc.Server) {
	svc := newProbeService()
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, svc)
	t.Cleanup(gs.Stop)
	return svc, gs
}

func (s *probeService) record(ctx context.Context) metadata.MD {
	md, _ := metadata.FromIncomingContext(ctx)
	s.mu.Lock()
	s.md = append(s.md, md.Copy())
	s.mu.Unlock()
	return md
}

// lastMD is the metadata of the last call that reached the upstream.
func (s *probeService) lastMD(t testing.TB) metadata.MD {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.md) == 0 {
		t.Fatal("upstream saw no gRPC call")
	}
	return s.md[len(s.md)-1]
}

func (s *probeService) calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.md)
}

// echoed splits the x-echo-* and x-trail-* request metadata.
func echoed(md metadata.MD) (header, trailer metadata.MD) {
	header, trailer = metadata.MD{}, metadata.MD{}
	for k, v := range md {
		switch {
		case strings.HasPrefix(k, "x-echo-"):
			header[k] = v
		case strings.HasPrefix(k, "x-trail-"):
			trailer[k] = v
		}
	}
	return header, trailer
}

func (s *probeService) hold(ctx context.Context) error {
	_, ok := ctx.Deadline()
	h := &heldCall{hasDeadline: ok, ended: make(chan error, 1)}
	s.held <- h
	<-ctx.Done()
	h.ended <- ctx.Err()
	return status.FromContextError(ctx.Err()).Err()
}

func (s *probeService) EmptyCall(ctx context.Context, in *testgrpc.Empty) (*testgrpc.Empty, error) {
	s.record(ctx)
	return s.TestServiceServer.EmptyCall(ctx, in)
}

func (s *probeService) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	md := s.record(ctx)
	switch mode := md.Get("x-probe"); {
	case slices.Contains(mode, "hold"):
		h, tr := echoed(md)
		grpc.SetHeader(ctx, h)
		grpc.SetTrailer(ctx, tr)
		return nil, s.hold(ctx)
	case slices.Contains(mode, "echo"):
		h, tr := echoed(md)
		grpc.SetHeader(ctx, h)
		grpc.SetTrailer(ctx, tr)
		return &testgrpc.SimpleResponse{Payload: in.GetPayload()}, nil
	}
	return s.TestServiceServer.UnaryCall(ctx, in)
}

func (s *probeService) StreamingInputCall(stream testgrpc.TestService_StreamingInputCallServer) error {
	s.record(stream.Context())
	return s.TestServiceServer.StreamingInputCall(stream)
}

func (s *probeService) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	s.record(stream.Context())
	return s.TestServiceServer.StreamingOutputCall(in, stream)
}

func (s *probeService) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	md := s.record(stream.Context())
	mode := md.Get("x-probe")
	if !slices.Contains(mode, "hold") && !slices.Contains(mode, "echo") {
		return s.TestServiceServer.FullDuplexCall(stream)
	}
	h, tr := echoed(md)
	if err := stream.SendHeader(h); err != nil {
		return err
	}
	stream.SetTrailer(tr)
	if slices.Contains(mode, "hold") {
		return s.hold(stream.Context())
	}
	return echoDuplex(stream)
}

// probe returns ctx carrying x-probe: mode and the extra metadata pairs.
func probe(ctx context.Context, mode string, kv ...string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, append([]string{"x-probe", mode}, kv...)...)
}

// waitHeld waits for the upstream handler of a held call to start.
func waitHeld(t testing.TB, s *probeService) *heldCall {
	t.Helper()
	select {
	case h := <-s.held:
		return h
	case <-time.After(20 * time.Second):
		t.Fatal("the held call never reached the upstream handler")
		return nil
	}
}

// waitEnded waits for a held handler's context to end and returns its error.
func waitEnded(t testing.TB, h *heldCall) error {
	t.Helper()
	select {
	case err := <-h.ended:
		return err
	case <-time.After(20 * time.Second):
		t.Fatal("the upstream handler's context never ended")
		return nil
	}
}

// testCtx is a context for one call or stream: a generous bound so that
// a hang fails the test rather than the whole run.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func payload(n int, seed uint64) *testgrpc.Payload {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{byte(seed), byte(seed >> 8)}).Read(b)
	return &testgrpc.Payload{Type: testgrpc.PayloadType_COMPRESSABLE, Body: b}
}

// TestGRPCCalls: the four kinds of call, with their message contents and
// sizes, reach the upstream and come back intact.
func TestGRPCCalls(t *testing.T) {
	t.Parallel()
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		t.Run("unary", func(t *testing.T) {
			for _, n := range []int{0, 1, 16 << 10, 1 << 20} {
				in := payload(n, uint64(n))
				res, err := tc.UnaryCall(probe(testCtx(t), "echo"), &testgrpc.SimpleRequest{Payload: in})
				if err != nil {
					t.Fatalf("UnaryCall(%d bytes): %v", n, err)
				}
				if got, want := res.GetPayload().GetBody(), in.Body; !bytes.Equal(got, want) {
					t.Errorf("UnaryCall(%d bytes): reply has %d bytes, not the ones sent", n, len(got))
				}
			}
		})
		t.Run("client-streaming", func(t *testing.T) {
			stream, err := tc.StreamingInputCall(testCtx(t))
			if err != nil {
				t.Fatal(err)
			}
			sum := 0
			for i, n := range []int{1, 27182, 8, 1828, 45904, 1 << 20} {
				if err := stream.Send(&testgrpc.StreamingInputCallRequest{Payload: payload(n, uint64(i))}); err != nil {
					t.Fatalf("Send %d: %v", i, err)
				}
				sum += n
			}
			res, err := stream.CloseAndRecv()
			if err != nil {
				t.Fatalf("CloseAndRecv: %v", err)
			}
			if got, want := int(res.GetAggregatedPayloadSize()), sum; got != want {
				t.Errorf("upstream received %d bytes, want %d", got, want)
			}
		})
		t.Run("server-streaming", func(t *testing.T) {
			sizes := []int32{31415, 9, 2653, 58979, 0, 1 << 20}
			var params []*testgrpc.ResponseParameters
			for _, n := range sizes {
				params = append(params, &testgrpc.ResponseParameters{Size: n})
			}
			stream, err := tc.StreamingOutputCall(testCtx(t), &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
			if err != nil {
				t.Fatal(err)
			}
			var got []int32
			for {
				res, err := stream.Recv()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("Recv after %d messages: %v", len(got), err)
				}
				got = append(got, int32(len(res.GetPayload().GetBody())))
			}
			if !slices.Equal(got, sizes) {
				t.Errorf("message sizes = %v, want %v", got, sizes)
			}
		})
		t.Run("bidi-streaming", func(t *testing.T) {
			stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"))
			if err != nil {
				t.Fatal(err)
			}
			for i, n := range []int{5, 0, 64 << 10, 1 << 20, 3} {
				in := payload(n, uint64(i))
				if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: in}); err != nil {
					t.Fatalf("Send %d: %v", i, err)
				}
				res, err := stream.Recv()
				if err != nil {
					t.Fatalf("Recv %d: %v", i, err)
				}
				if !bytes.Equal(res.GetPayload().GetBody(), in.Body) {
					t.Errorf("message %d: echo differs from what was sent", i)
				}
			}
			if err := stream.CloseSend(); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); err != io.EOF {
				t.Errorf("Recv after CloseSend = %v, want io.EOF (status OK in the trailers)", err)
			}
		})
	})
}

// TestGRPCStatus: a status set by the upstream reaches the client exactly,
// code and message, for a unary call (trailers-only response) and at the
// end of a stream that already carried messages (status in trailers).
func TestGRPCStatus(t *testing.T) {
	t.Parallel()
	messages := []string{
		"plain message",
		"",
		"100% done, not %41 decoded",
		"\t\ntest with whitespace\r\nand Unicode BMP ☺ and non-BMP 😈\t\n",
		"quotes \" ' and <html>not a page</html>",
		strings.Repeat("long ", 2000),
	}
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		for code := codes.Canceled; code <= codes.Unauthenticated; code++ {
			t.Run(code.String(), func(t *testing.T) {
				for _, msg := range messages {
					want := &testgrpc.EchoStatus{Code: int32(code), Message: msg}
					_, err := tc.UnaryCall(testCtx(t), &testgrpc.SimpleRequest{ResponseStatus: want})
					if got := status.Convert(err); got.Code() != code || got.Message() != msg {
						t.Errorf("unary: status = %v %q, want %v %q", got.Code(), got.Message(), code, msg)
					}

					stream, err := tc.FullDuplexCall(testCtx(t))
					if err != nil {
						t.Fatal(err)
					}
					ok := &testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 10}}}
					if err := stream.Send(ok); err != nil {
						t.Fatal(err)
					}
					if _, err := stream.Recv(); err != nil {
						t.Fatalf("stream: first Recv: %v", err)
					}
					if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseStatus: want}); err != nil {
						t.Fatal(err)
					}
					_, err = stream.Recv()
					if got := status.Convert(err); got.Code() != code || got.Message() != msg {
						t.Errorf("stream: status = %v %q, want %v %q", got.Code(), got.Message(), code, msg)
					}
				}
			})
		}
	})
}

// TestGRPCMetadata: request metadata reaches the upstream untouched, and
// the upstream's initial metadata (headers) and trailing metadata
// (trailers), text and binary, several values per key, reach the client.
func TestGRPCMetadata(t *testing.T) {
	t.Parallel()
	allBytes := make([]byte, 256)
	for i := range allBytes {
		allBytes[i] = byte(i)
	}
	send := metadata.Pairs(
		"x-pydio-bearer", "eyJhbGciOi.secret.token",
		"x-echo-text", "first value",
		"x-echo-text", "second, value",
		"x-echo-bin", string(allBytes),
		"x-trail-text", "trailing value",
		"x-trail-bin", "\x00\x0a\x0b\xff",
	)
	wantHeader := metadata.MD{"x-echo-text": {"first value", "second, value"}, "x-echo-bin": {string(allBytes)}}
	wantTrailer := metadata.MD{"x-trail-text": {"trailing value"}, "x-trail-bin": {"\x00\x0a\x0b\xff"}}
	check := func(t *testing.T, what string, got, want metadata.MD) {
		t.Helper()
		for k, v := range want {
			if !slices.Equal(got[k], v) {
				t.Errorf("%s %s = %q, want %q", what, k, got[k], v)
			}
		}
	}
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		t.Run("unary", func(t *testing.T) {
			ctx := metadata.NewOutgoingContext(testCtx(t), send)
			ctx = metadata.AppendToOutgoingContext(ctx, "x-probe", "echo")
			var header, trailer metadata.MD
			if _, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
				t.Fatal(err)
			}
			check(t, "upstream request metadata", e.svc.lastMD(t), send)
			check(t, "header", header, wantHeader)
			check(t, "trailer", trailer, wantTrailer)
		})
		t.Run("unary-error", func(t *testing.T) {
			// Headers and trailers travel with an error status too: the
			// interop server echoes these two keys, then fails the call.
			ctx := metadata.AppendToOutgoingContext(testCtx(t),
				"x-grpc-test-echo-initial", "initial value",
				"x-grpc-test-echo-trailing-bin", "\x00\xfftrailing")
			var header, trailer metadata.MD
			echo := &testgrpc.EchoStatus{Code: int32(codes.FailedPrecondition), Message: "failed, with metadata"}
			_, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseStatus: echo}, grpc.Header(&header), grpc.Trailer(&trailer))
			if got := status.Convert(err); got.Code() != codes.FailedPrecondition || got.Message() != echo.Message {
				t.Errorf("status = %v %q, want %v %q", got.Code(), got.Message(), codes.FailedPrecondition, echo.Message)
			}
			check(t, "header", header, metadata.MD{"x-grpc-test-echo-initial": {"initial value"}})
			check(t, "trailer", trailer, metadata.MD{"x-grpc-test-echo-trailing-bin": {"\x00\xfftrailing"}})
		})
		t.Run("stream", func(t *testing.T) {
			ctx := metadata.NewOutgoingContext(testCtx(t), send)
			ctx = metadata.AppendToOutgoingContext(ctx, "x-probe", "echo")
			stream, err := tc.FullDuplexCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			header, err := stream.Header()
			if err != nil {
				t.Fatalf("Header: %v", err)
			}
			check(t, "upstream request metadata", e.svc.lastMD(t), send)
			check(t, "header", header, wantHeader)
			if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: payload(10, 1)}); err != nil {
				t.Fatal(err)
			}
			if _, err := stream.Recv(); err != nil {
				t.Fatal(err)
			}
			stream.CloseSend()
			if _, err := stream.Recv(); err != io.EOF {
				t.Fatalf("Recv after CloseSend = %v, want io.EOF", err)
			}
			check(t, "trailer", stream.Trailer(), wantTrailer)
		})
	})
}

// TestGRPCDeadlineAndCancel: deadlines and cancellation cross the proxy in
// both directions.
func TestGRPCDeadlineAndCancel(t *testing.T) {
	t.Parallel()
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		t.Run("client-deadline-unary", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(testCtx(t), 2*time.Second)
			defer cancel()
			_, err := tc.UnaryCall(probe(ctx, "hold"), &testgrpc.SimpleRequest{})
			if got, want := status.Code(err), codes.DeadlineExceeded; got != want {
				t.Errorf("client status = %v, want %v", err, want)
			}
			h := waitHeld(t, e.svc)
			if !h.hasDeadline {
				t.Error("upstream handler had no deadline: grpc-timeout was not forwarded")
			}
			// The upstream's context ends by its own deadline or by the
			// proxy resetting the stream, whichever comes first.
			if err := waitEnded(t, h); !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
				t.Errorf("upstream handler context ended with %v", err)
			}
		})
		t.Run("client-deadline-stream", func(t *testing.T) {
			ctx, cancel := context.WithTimeout(testCtx(t), 2*time.Second)
			defer cancel()
			stream, err := tc.FullDuplexCall(probe(ctx, "hold"))
			if err != nil {
				t.Fatal(err)
			}
			h := waitHeld(t, e.svc)
			if !h.hasDeadline {
				t.Error("upstream handler had no deadline: grpc-timeout was not forwarded")
			}
			if _, err := stream.Recv(); status.Code(err) != codes.DeadlineExceeded {
				t.Errorf("client Recv = %v, want %v", err, codes.DeadlineExceeded)
			}
			waitEnded(t, h)
		})
		t.Run("client-cancels-unary", func(t *testing.T) {
			// No deadline: waitHeld and waitEnded bound the wait.
			ctx, cancel := context.WithCancel(t.Context())
			errc := make(chan error, 1)
			go func() {
				_, err := tc.UnaryCall(probe(ctx, "hold"), &testgrpc.SimpleRequest{})
				errc <- err
			}()
			h := waitHeld(t, e.svc)
			if h.hasDeadline {
				t.Error("upstream handler has a deadline the client never set")
			}
			cancel()
			if err := waitEnded(t, h); !errors.Is(err, context.Canceled) {
				t.Errorf("upstream handler context ended with %v, want %v", err, context.Canceled)
			}
			if got, want := status.Code(<-errc), codes.Canceled; got != want {
				t.Errorf("client status = %v, want %v", got, want)
			}
		})
		t.Run("client-cancels-stream", func(t *testing.T) {
			ctx, cancel := context.WithCancel(t.Context())
			stream, err := tc.FullDuplexCall(probe(ctx, "hold"))
			if err != nil {
				t.Fatal(err)
			}
			h := waitHeld(t, e.svc)
			if h.hasDeadline {
				t.Error("upstream handler has a deadline the client never set")
			}
			if _, err := stream.Header(); err != nil {
				t.Fatalf("Header: %v", err)
			}
			cancel()
			if err := waitEnded(t, h); !errors.Is(err, context.Canceled) {
				t.Errorf("upstream handler context ended with %v, want %v", err, context.Canceled)
			}
			if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
				t.Errorf("client Recv = %v, want %v", err, codes.Canceled)
			}
		})
		for _, code := range []codes.Code{codes.DeadlineExceeded, codes.Canceled} {
			t.Run("upstream-returns-"+code.String(), func(t *testing.T) {
				msg := "upstream says " + code.String()
				echo := &testgrpc.EchoStatus{Code: int32(code), Message: msg}
				_, err := tc.UnaryCall(testCtx(t), &testgrpc.SimpleRequest{ResponseStatus: echo})
				if got := status.Convert(err); got.Code() != code || got.Message() != msg {
					t.Errorf("unary: status = %v %q, want %v %q", got.Code(), got.Message(), code, msg)
				}
				stream, err := tc.FullDuplexCall(testCtx(t))
				if err != nil {
					t.Fatal(err)
				}
				stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}})
				if _, err := stream.Recv(); err != nil {
					t.Fatal(err)
				}
				stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseStatus: echo})
				_, err = stream.Recv()
				if got := status.Convert(err); got.Code() != code || got.Message() != msg {
					t.Errorf("stream: status = %v %q, want %v %q", got.Code(), got.Message(), code, msg)
				}
			})
		}
	})
}

// TestGRPCBulkStream: a bidirectional stream carries 100 MiB each way,
// every byte intact (SHA-256 of what was sent against what came back).
// Under the race detector, which makes gRPC's and TLS's byte loops about
// ten times slower (half a minute per port and topology), 25 MiB.
func TestGRPCBulkStream(t *testing.T) {
	t.Parallel()
	const chunk = 256 << 10
	total := 100 << 20
	if raceEnabled {
		total = 25 << 20
	}
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
		defer cancel()
		stream, err := tc.FullDuplexCall(probe(ctx, "echo"))
		if err != nil {
			t.Fatal(err)
		}
		sent := make(chan []byte, 1)
		go func() {
			h := sha256.New()
			src := rand.NewChaCha8([32]byte{'c', 'e', 'l', 'l', 's'})
			for n := 0; n < total; n += chunk {
				b := make([]byte, chunk)
				src.Read(b)
				h.Write(b)
				if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: b}}); err != nil {
					break // Recv reports the stream's status
				}
			}
			stream.CloseSend()
			sent <- h.Sum(nil)
		}()
		h := sha256.New()
		got := 0
		for {
			res, err := stream.Recv()
			if err == io.EOF {
				break
			}
			if err != nil {
				cancel()
				<-sent
				t.Fatalf("Recv after %d bytes: %v", got, err)
			}
			got += len(res.GetPayload().GetBody())
			h.Write(res.GetPayload().GetBody())
		}
		want := <-sent
		if got != total {
			t.Errorf("received %d bytes, want %d", got, total)
		}
		if !bytes.Equal(h.Sum(nil), want) {
			t.Error("SHA-256 of the bytes received differs from the bytes sent")
		}
	})
}

// TestGRPCIdleStream: a gRPC stream with nothing moving for longer than
// PROXY_IDLE_TIMEOUT is not cut (Cells Sync's StreamChanges stays quiet for
// hours): idle before the first message and between messages.
func TestGRPCIdleStream(t *testing.T) {
	t.Parallel()
	const idle = 300 * time.Millisecond
	eachGRPC(t, func(c *Config) { c.IdleTimeout = idle }, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"))
		if err != nil {
			t.Fatal(err)
		}
		for i := range 3 {
			// Not a timed assertion: the stream must stay quiet for more
			// than three idle timeouts.
			time.Sleep(1 * time.Second)
			in := payload(100, uint64(i))
			if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: in}); err != nil {
				t.Fatalf("Send after %v idle: %v", time.Second, err)
			}
			res, err := stream.Recv()
			if err != nil {
				t.Fatalf("Recv after %v idle: %v", time.Second, err)
			}
			if !bytes.Equal(res.GetPayload().GetBody(), in.Body) {
				t.Fatalf("message %d: echo differs", i)
			}
		}
		stream.CloseSend()
		if _, err := stream.Recv(); err != io.EOF {
			t.Errorf("Recv after CloseSend = %v, want io.EOF", err)
		}
	})
}

// TestGRPCAuthorityAndForwardedFor: the upstream sees :authority exactly as
// the client sent it, and x-forwarded-for set to the client's address, a
// client-sent one replaced (Cells reads it as the client IP).
func TestGRPCAuthorityAndForwardedFor(t *testing.T) {
	t.Parallel()
	for _, topo := range grpcTopologies {
		t.Run(string(topo), func(t *testing.T) {
			// The proxy's certificate then names cells.example.com too.
			e := startGRPC(t, topo, func(c *Config) { c.ServerNames = []string{"127.0.0.1", "cells.example.com"} })
			for _, port := range grpcPorts {
				for _, authority := range []string{"", "cells.example.com:443", "Cells.Example.COM"} {
					name := string(port) + "/" + cmp.Or(authority, "default")
					t.Run(name, func(t *testing.T) {
						var opts []grpc.DialOption
						want := e.addr(port)
						if authority != "" {
							opts = append(opts, grpc.WithAuthority(authority))
							want = authority
						}
						tc := testgrpc.NewTestServiceClient(e.dial(t, port, opts...))
						ctx := metadata.AppendToOutgoingContext(testCtx(t),
							"x-forwarded-for", "203.0.113.9",
							"x-real-ip", "203.0.113.9",
							"x-forwarded-proto", "http")
						if _, err := tc.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
							t.Fatal(err)
						}
						wantMetadata(t, e.svc.lastMD(t),
							":authority", want,
							"x-forwarded-for", "127.0.0.1",
							"x-real-ip", "127.0.0.1",
							"x-forwarded-proto", "https")
					})
				}
			}
		})
	}
}

// TestGRPCErrors: what the proxy itself answers to a gRPC call is a gRPC
// status in the form grpc-go reads, never an HTTP error page.
func TestGRPCErrors(t *testing.T) {
	t.Parallel()
	// notPage fails if err carries an HTTP error page or an Internal or
	// Unknown status (what grpc-go makes of a non-gRPC response).
	notPage := func(t *testing.T, err error) {
		t.Helper()
		st := status.Convert(err)
		if st.Code() == codes.Internal || st.Code() == codes.Unknown || strings.Contains(st.Message(), "<") ||
			strings.Contains(st.Message(), "content-type") {
			t.Errorf("status = %v %q: not a gRPC status from the proxy", st.Code(), st.Message())
		}
	}
	for _, scheme := range []string{"h2c", "https"} {
		t.Run("upstream-down/"+scheme, func(t *testing.T) {
			t.Parallel()
			closed := testport.Reserve(t)
			e := startGRPC(t, topoH2C, func(c *Config) {
				c.GRPCUpstream = &url.URL{Scheme: scheme, Host: closed}
				c.UpstreamInsecure = true
			})
			for _, port := range grpcPorts {
				t.Run(string(port), func(t *testing.T) {
					tc := testgrpc.NewTestServiceClient(e.dial(t, port))
					// A refused connection is known at once: allow 20x
					// what a loaded machine needs, far less than a hang.
					ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
					defer cancel()
					start := time.Now()
					_, err := tc.EmptyCall(ctx, &testgrpc.Empty{})
					if got, want := status.Code(err), codes.Unavailable; got != want {
						t.Errorf("status = %v, want %v", err, want)
					}
					if d := time.Since(start); d > 5*time.Second {
						t.Errorf("UNAVAILABLE took %v", d)
					}
					notPage(t, err)
					stream, err := tc.FullDuplexCall(ctx)
					if err == nil {
						_, err = stream.Recv()
					}
					if got, want := status.Code(err), codes.Unavailable; got != want {
						t.Errorf("stream status = %v, want %v", err, want)
					}
				})
			}
		})
		t.Run("upstream-silent/"+scheme, func(t *testing.T) {
			t.Parallel()
			// Accepts TCP, then never reads nor writes a byte.
			ln := newCrashListener(t)
			accepted := make(chan struct{})
			go func() {
				defer close(accepted)
				for {
					if _, err := ln.Accept(); err != nil {
						return
					}
				}
			}()
			t.Cleanup(func() {
				ln.crash()
				<-accepted
			})
			e := startGRPC(t, topoH2C, func(c *Config) {
				c.GRPCUpstream = &url.URL{Scheme: scheme, Host: ln.Addr().String()}
				c.UpstreamInsecure = true
			})
			// The handshake's limit (10 s) shortened, for a call that
			// sets no deadline of its own.
			e.tp.fwd.grpcUp.handshakeTimeout = time.Second
			for _, port := range grpcPorts {
				t.Run(string(port), func(t *testing.T) {
					tc := testgrpc.NewTestServiceClient(e.dial(t, port))
					ctx, cancel := context.WithTimeout(testCtx(t), 500*time.Millisecond)
					defer cancel()
					_, err := tc.EmptyCall(ctx, &testgrpc.Empty{})
					if got, want := status.Code(err), codes.DeadlineExceeded; got != want {
						t.Errorf("status = %v, want %v", err, want)
					}
					notPage(t, err)
					// Without a deadline: UNAVAILABLE, which clients
					// retry and gRPC maps HTTP's 504 to, not the
					// DEADLINE_EXCEEDED of a deadline the call never had.
					_, err = tc.EmptyCall(testCtx(t), &testgrpc.Empty{})
					if got, want := status.Code(err), codes.Unavailable; got != want {
						t.Errorf("without a deadline: status = %v, want %v", err, want)
					}
				})
			}
		})
	}
	t.Run("no-grpc-upstream", func(t *testing.T) {
		t.Parallel()
		up := newUpstream(t, upPlain, &recorder{})
		cfg := testConfig(up)
		cfg.GRPCAddr = "127.0.0.1:0"
		if cfg.GRPCUpstream != nil {
			t.Fatalf("GRPCUpstream = %v, want none for a plain upstream", cfg.GRPCUpstream)
		}
		tp := startProxy(t, cfg)
		for _, port := range grpcPorts {
			t.Run(string(port), func(t *testing.T) {
				addr := tp.Addr().String()
				if port == portDedicated {
					addr = tp.GRPCAddr().String()
				}
				tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, addr))
				_, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{})
				st := status.Convert(err)
				if got, want := st.Code(), codes.Unavailable; got != want {
					t.Errorf("status = %v, want %v", err, want)
				}
				if !strings.Contains(st.Message(), "PYDIO_GRPC_EXTERNAL") {
					t.Errorf("message %q does not name PYDIO_GRPC_EXTERNAL", st.Message())
				}
				notPage(t, err)
			})
		}
	})
	for _, topo := range grpcTopologies {
		t.Run("upstream-dies-mid-stream/"+string(topo), func(t *testing.T) {
			t.Parallel()
			for _, port := range grpcPorts {
				t.Run(string(port), func(t *testing.T) {
					e := startGRPC(t, topo, nil)
					tc := testgrpc.NewTestServiceClient(e.dial(t, port))
					stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"))
					if err != nil {
						t.Fatal(err)
					}
					if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: payload(10, 1)}); err != nil {
						t.Fatal(err)
					}
					if _, err := stream.Recv(); err != nil {
						t.Fatal(err)
					}
					e.kill()
					// testCtx bounds a hang; a hang would end as
					// DEADLINE_EXCEEDED and fail here.
					_, err = stream.Recv()
					if got, want := status.Code(err), codes.Unavailable; got != want {
						t.Errorf("Recv after the upstream died = %v, want %v", err, want)
					}
					notPage(t, err)
				})
			}
		})
	}
}

// TestGRPCSplitByContentType: on the main port, an HTTP/2 request without a
// gRPC content type (a browser's) goes to the HTTP upstream, even on a gRPC
// method's path; a gRPC call on the same connection goes to the gRPC one.
func TestGRPCSplitByContentType(t *testing.T) {
	t.Parallel()
	for _, topo := range grpcTopologies {
		t.Run(string(topo), func(t *testing.T) {
			e := startGRPC(t, topo, nil)
			tc := testgrpc.NewTestServiceClient(e.dial(t, portMain))
			if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}); err != nil {
				t.Fatal(err)
			}
			grpcBefore := e.grpcReqs.Load()
			callsBefore := e.svc.calls()
			for _, c := range []struct{ method, path, ctype string }{
				{"GET", "/a/frontend/bootconf", ""},
				{"POST", "/grpc.testing.TestService/EmptyCall", "application/json"},
				{"POST", "/grpc.testing.TestService/EmptyCall", "text/plain; charset=application/grpc"},
			} {
				req, err := http.NewRequestWithContext(testCtx(t), c.method, e.tp.URL+c.path, strings.NewReader("{}"))
				if err != nil {
					t.Fatal(err)
				}
				if c.ctype != "" {
					req.Header.Set("Content-Type", c.ctype)
				}
				res, err := e.tp.H2.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(res.Body)
				res.Body.Close()
				if res.ProtoMajor != 2 {
					t.Fatalf("client spoke %s, want HTTP/2", res.Proto)
				}
				if res.StatusCode != 200 || string(body) != "ok" {
					t.Errorf("%s %s (%s): got %d %q, want 200 \"ok\" from the HTTP upstream", c.method, c.path, c.ctype, res.StatusCode, body)
				}
				if got, want := e.rec.last(t).RequestURI, c.path; got != want {
					t.Errorf("HTTP upstream saw %q, want %q", got, want)
				}
			}
			if got, want := e.rec.count(), 3; got != want {
				t.Errorf("HTTP upstream saw %d requests, want %d", got, want)
			}
			if got := e.svc.calls() - callsBefore; got != 0 {
				t.Errorf("gRPC upstream saw %d calls for non-gRPC requests", got)
			}
			if topo == topoTLS {
				if got := e.grpcReqs.Load() - grpcBefore; got != 0 {
					t.Errorf("gRPC side of the upstream saw %d non-gRPC requests", got)
				}
			}
		})
	}
}

// TestGRPCConcurrentNoMixup: eight clients, each on its own connection,
// make unary calls, bidirectional streams and streams they cancel half-way,
// all at once, through one proxy and its connections to the upstream. Every
// answer must be its own call's, and no call may hang: a stream mixed up
// with another, or connection window lost with the cancelled ones, would.
func TestGRPCConcurrentNoMixup(t *testing.T) {
	t.Parallel()
	const workers, calls = 8, 30
	for _, topo := range grpcTopologies {
		t.Run(string(topo), func(t *testing.T) {
			e := startGRPC(t, topo, nil)
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				tc := testgrpc.NewTestServiceClient(e.dial(t, portMain))
				wg.Go(func() {
					for i := range calls {
						seed := uint64(w*1000 + i)
						if err := mixedCall(testCtx(t), tc, i%3, seed); err != nil {
							errs <- fmt.Errorf("worker %d, call %d: %w", w, i, err)
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// mixedCall is one call of TestGRPCConcurrentNoMixup: kind 0 a unary echo,
// 1 a stream of three echoes (one larger than a frame), 2 a stream
// cancelled after its first echo.
func mixedCall(ctx context.Context, tc testgrpc.TestServiceClient, kind int, seed uint64) error {
	if kind == 0 {
		in := payload(256+int(seed%512), seed)
		res, err := tc.UnaryCall(probe(ctx, "echo"), &testgrpc.SimpleRequest{Payload: in})
		if err != nil {
			return err
		}
		if !bytes.Equal(res.GetPayload().GetBody(), in.Body) {
			return errors.New("unary: the answer is not this call's payload")
		}
		return nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := tc.FullDuplexCall(probe(ctx, "echo"))
	if err != nil {
		return err
	}
	for j, size := range []int{100, 20000, 5} {
		in := payload(size, seed<<2|uint64(j))
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: in}); err != nil {
			return fmt.Errorf("send %d: %w", j, err)
		}
		res, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("recv %d: %w", j, err)
		}
		if !bytes.Equal(res.GetPayload().GetBody(), in.Body) {
			return fmt.Errorf("stream message %d is not this call's", j)
		}
		if kind == 2 {
			cancel()
			if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
				return fmt.Errorf("recv after cancel = %v, want Canceled", err)
			}
			return nil
		}
	}
	stream.CloseSend()
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("recv after CloseSend = %v, want io.EOF", err)
	}
	return nil
}

// TestGRPCTimeoutOverflow: grpc-timeout allows eight digits of any unit,
// and 2,562,048 hours and more pass what a time.Duration holds. grpc-go
// takes the longest duration, no deadline in practice, and so must the
// proxy on both its ports: the call succeeds, as against Cells directly.
// It failed at once with DEADLINE_EXCEEDED (the product wrapped around).
func TestGRPCTimeoutOverflow(t *testing.T) {
	t.Parallel()
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, newProbeService())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	cfg.GRPCAddr = "127.0.0.1:0"
	tp := startProxy(t, cfg)
	const path = "/grpc.testing.TestService/EmptyCall"
	for _, v := range []string{"2562047H", "2562048H", "99999999H", "99999999M", "99999999S"} {
		for _, base := range []string{tp.URL, "https://" + tp.GRPCAddr().String()} {
			res := callGRPC(testCtx(t), tp.H2, base+path, grpcMsg(nil), "grpc-timeout", v)
			if st := res.Trailer.Get("Grpc-Status") + res.Header.Get("Grpc-Status"); res.Err != nil || st != "0" {
				t.Errorf("grpc-timeout %s through %s: err %v, grpc-status %q %q, want 0", v, base, res.Err, st,
					res.Header.Get("Grpc-Message")+res.Trailer.Get("Grpc-Message"))
			}
		}
	}
}

// TestGRPCWebIsHTTP: gRPC-Web (application/grpc-web, -web-text) is HTTP for
// browsers, not gRPC: grpc-go and Envoy take application/grpc only alone or
// followed by '+' or ';'. Over HTTP/2 it goes to CELLS_UPSTREAM, as over
// HTTP/1.1, instead of the gRPC upstream (here none: it got UNAVAILABLE).
func TestGRPCWebIsHTTP(t *testing.T) {
	t.Parallel()
	rec := &recorder{}
	tp := startProxy(t, testConfig(newUpstream(t, upPlain, rec)))
	for _, ct := range []string{"application/grpc-web+proto", "application/grpc-web-text", "application/grpcx"} {
		for _, pc := range h1h2Clients(tp) {
			before := rec.count()
			req, _ := http.NewRequestWithContext(testCtx(t), "POST", tp.URL+"/grpc.testing.TestService/EmptyCall", strings.NewReader("AAAAAAA="))
			req.Header.Set("Content-Type", ct)
			res := doDrain(t, pc.c, req)
			if rec.count() == before {
				t.Errorf("%s %s: %s grpc-status %q, want it to reach CELLS_UPSTREAM", pc.name, ct, res.Status, res.Header.Get("Grpc-Status"))
			}
		}
	}
}

// echoDuplex sends each message of stream back until the client ends it.
func echoDuplex(stream testgrpc.TestService_FullDuplexCallServer) error {
	for {
		in, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
			return err
		}
	}
}

// serveGRPC serves gs on ln until the test ends, then stops it and waits
// for Serve to return.
func serveGRPC(tb testing.TB, gs *grpc.Server, ln net.Listener) {
	served := make(chan struct{})
	go func() {
		defer close(served)
		gs.Serve(ln)
	}()
	tb.Cleanup(func() {
		gs.Stop()
		<-served
	})
}
