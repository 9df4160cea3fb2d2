package proxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The gRPC upstream leg against what a Cells (grpc-go) server, or a broken
// one, does to a connection while calls are on it, seen from a real grpc-go
// client: a graceful stop, resets before the answer, an answer that ends
// without trailers, a GOAWAY with an error code, a stream limit lowered
// under open calls, HPACK table size changes both ways, empty DATA frames,
// a dropped connection before the answer. These complete what
// grpcupstream_test.go covers.

// reviewService echoes, and counts its calls.
type reviewService struct {
	testgrpc.UnimplementedTestServiceServer
	calls atomic.Int32
}

func (s *reviewService) UnaryCall(ctx context.Context, in *testgrpc.SimpleRequest) (*testgrpc.SimpleResponse, error) {
	s.calls.Add(1)
	return &testgrpc.SimpleResponse{Payload: in.GetPayload()}, nil
}

func (s *reviewService) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	s.calls.Add(1)
	return echoDuplex(stream)
}

// reviewListener is the listener one grpc-go server serves: it takes the
// connections a dispatcher hands it, and its Close (GracefulStop's) leaves
// the real listener open for the next server.
type reviewListener struct {
	addr net.Addr
	ch   chan net.Conn
	done chan struct{}
	once sync.Once
}

func newReviewListener(addr net.Addr) *reviewListener {
	return &reviewListener{addr: addr, ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *reviewListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *reviewListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *reviewListener) Addr() net.Addr { return l.addr }

// TestH2ReviewGracefulStop: Cells (a real grpc-go server) stops gracefully
// while a bidirectional stream is open through the proxy: grpc-go's two
// GOAWAYs (the first with the largest stream ID, a PING, then the real last
// stream ID). The open stream goes on to its end with status OK on the
// draining connection; a call made meanwhile goes to the Cells that took
// over, on a new connection, and does not fail; and the old connection
// closes, so that GracefulStop returns.
func TestH2ReviewGracefulStop(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	lnA, lnB := newReviewListener(ln.Addr()), newReviewListener(ln.Addr())
	var current atomic.Pointer[reviewListener]
	current.Store(lnA)
	dispatched := make(chan struct{})
	go func() {
		defer close(dispatched)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			l := current.Load()
			select {
			case l.ch <- c:
			case <-l.done:
				c.Close()
			}
		}
	}()
	svcA, svcB := &reviewService{}, &reviewService{}
	gsA, gsB := grpc.NewServer(), grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gsA, svcA)
	testgrpc.RegisterTestServiceServer(gsB, svcB)
	var served sync.WaitGroup
	served.Go(func() { gsA.Serve(lnA) })
	served.Go(func() { gsB.Serve(lnB) })
	t.Cleanup(func() {
		gsA.Stop()
		gsB.Stop()
		served.Wait()
		ln.Close()
		<-dispatched
	})

	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	tp := startProxy(t, cfg)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))

	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	stream, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	exchange := func(what string, seed uint64) {
		t.Helper()
		p := payload(64<<10, seed)
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: p}); err != nil {
			t.Fatalf("%s: Send: %v", what, err)
		}
		res, err := stream.Recv()
		if err != nil {
			t.Fatalf("%s: Recv: %v", what, err)
		}
		if !proto.Equal(res.GetPayload(), p) {
			t.Fatalf("%s: the message came back different", what)
		}
	}
	exchange("before the stop", 1)

	current.Store(lnB)
	stopped := make(chan struct{})
	go func() {
		gsA.GracefulStop()
		close(stopped)
	}()
	waitNoneTakes(t, tp.fwd.grpcUp)

	p := payload(1000, 2)
	res, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: p})
	if err != nil {
		t.Fatalf("a call made while Cells stops gracefully: %v", err)
	}
	if !proto.Equal(res.GetPayload(), p) {
		t.Error("the call's answer differs from its request")
	}
	if got, want := svcB.calls.Load(), int32(1); got != want {
		t.Errorf("the Cells that took over saw %d calls, want %d", got, want)
	}

	exchange("during the stop", 3)
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("the stream open during the stop ended with %v, want io.EOF (status OK)", err)
	}
	if got, want := svcA.calls.Load(), int32(1); got != want {
		t.Errorf("the stopping Cells saw %d calls, want %d (the stream)", got, want)
	}
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Error("GracefulStop did not return 10 s after the last stream ended: the proxy kept the drained connection open")
	}
}

// streamMsg is a StreamingOutputCallResponse carrying s, framed.
func streamMsg(s string) []byte {
	b, err := proto.Marshal(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: []byte(s)}})
	if err != nil {
		panic(err)
	}
	return grpcMsg(b)
}

// TestH2ReviewAnswerWithoutTrailers: Cells ends a server stream with
// END_STREAM on a DATA frame, without trailers (a crash between messages
// in a server that flushes its stream's end, or a non-gRPC server). The
// client gets every message, then an error status: never io.EOF, which
// would tell it the stream was complete.
func TestH2ReviewAnswerWithoutTrailers(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		s.writeData(append(streamMsg("one"), streamMsg("two")...), true)
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	stream := streamingRecv(t, ctx, tc, "one", "two")
	_, err := stream.Recv()
	if err == io.EOF || status.Code(err) == codes.OK {
		t.Fatalf("Recv after an answer without trailers = %v, want an error status", err)
	}
	t.Logf("status: %v", err)
}

// TestH2ReviewResetBeforeAnswer: Cells resets a unary call before its
// response header, with each error code. The client gets an error status at
// once, not a hang; only REFUSED_STREAM (the call was not processed, RFC
// 9113 §8.7) is sent again, as Cells may have acted on the others; and
// the connection serves the next call.
func TestH2ReviewResetBeforeAnswer(t *testing.T) {
	t.Parallel()
	codesSent := []http2.ErrCode{
		http2.ErrCodeNo, http2.ErrCodeProtocol, http2.ErrCodeInternal, http2.ErrCodeFlowControl,
		http2.ErrCodeStreamClosed, http2.ErrCodeCancel, http2.ErrCodeEnhanceYourCalm,
		http2.ErrCodeInadequateSecurity, http2.ErrCodeHTTP11Required, http2.ErrCode(0x77),
	}
	var mu sync.Mutex
	seen := map[string]int{}
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		code := s.Get("x-reset")
		mu.Lock()
		seen[code]++
		mu.Unlock()
		if code == "" {
			s.respond(grpcMsg(nil))
			return
		}
		var c uint32
		fmt.Sscan(code, &c)
		s.reset(http2.ErrCode(c))
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	for _, code := range codesSent {
		t.Run(code.String(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
			defer cancel()
			_, err := tc.EmptyCall(metadata.AppendToOutgoingContext(ctx, "x-reset", fmt.Sprint(uint32(code))), &testgrpc.Empty{})
			if status.Code(err) == codes.OK {
				t.Fatalf("a call Cells reset (%v) succeeded", code)
			}
			mu.Lock()
			n := seen[fmt.Sprint(uint32(code))]
			mu.Unlock()
			if n != 1 {
				t.Errorf("Cells saw the call %d times, want once: a call reset with %v may have been processed", n, code)
			}
			if _, err := tc.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
				t.Errorf("the call after the reset: %v", err)
			}
		})
	}
	if got, want := p.Accepted.Load(), int32(1); got != want {
		t.Errorf("upstream accepted %d connections, want %d: a stream reset must not end the connection", got, want)
	}
}

// TestH2ReviewGoAwayWithErrorCode: Cells sends GOAWAY with an error code
// (ENHANCE_YOUR_CALM, as grpc-go's keepalive enforcement does) and the
// stream being answered as its last stream ID, then finishes that answer.
// The call completes with status OK (RFC 9113 §6.8: streams up to the last
// ID may still complete, whatever the code); the next call goes to a new
// connection.
func TestH2ReviewGoAwayWithErrorCode(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.c.N > 1 {
			s.respond(grpcMsg(nil))
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil ||
			s.writeData(streamMsg("before"), false) != nil ||
			s.c.goAway(s.ID, http2.ErrCodeEnhanceYourCalm) != nil ||
			s.writeData(streamMsg("after"), false) != nil ||
			s.writeHeaders(true, 1, "grpc-status", "0") != nil {
			return
		}
		s.c.close()
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	stream := streamingRecv(t, ctx, tc, "before", "after")
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("end of the stream below the GOAWAY = %v, want io.EOF (status OK)", err)
	}
	waitNoneTakes(t, tp.fwd.grpcUp)
	if _, err := tc.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("the call after the GOAWAY: %v", err)
	}
	if got, want := p.Accepted.Load(), int32(2); got != want {
		t.Errorf("upstream accepted %d connections, want %d", got, want)
	}
}

// TestH2ReviewStreamLimitLowered: with three calls open on a connection,
// Cells lowers SETTINGS_MAX_CONCURRENT_STREAMS to 1 (and enforces it:
// streams past it are refused). Six more concurrent calls all succeed (on
// another connection, or sent again after a refusal), and so do the three.
func TestH2ReviewStreamLimitLowered(t *testing.T) {
	t.Parallel()
	held := make(chan *h2Stream, 3)
	release := make(chan struct{})
	p := newHoldingPeer(t, "/pkg.Svc/Hold", held, release)
	tp := startPeerProxy(t, p)

	var wg sync.WaitGroup
	heldResults := make([]grpcResult, 3)
	heldBodies := make([][]byte, 3)
	for i := range heldResults {
		heldBodies[i] = grpcMsg(randomBytes(1000, byte(i)))
		wg.Go(func() { heldResults[i] = callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Hold", heldBodies[i]) })
	}
	var c *h2PeerConn
	for range heldResults {
		c = recv(t, held, "a held call at the upstream").c
	}
	c.mu.Lock()
	c.maxStreams = 1
	c.mu.Unlock()
	if err := c.write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 1})
	}); err != nil {
		t.Fatal(err)
	}

	results := make([]grpcResult, 6)
	bodies := make([][]byte, len(results))
	var nwg sync.WaitGroup
	for i := range results {
		bodies[i] = grpcMsg(randomBytes(2000, byte(10+i)))
		nwg.Go(func() { results[i] = callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", bodies[i]) })
	}
	// The new calls must not wait for the held ones to end.
	done := make(chan struct{})
	go func() {
		nwg.Wait()
		close(done)
	}()
	recv(t, done, "the calls made after the limit was lowered")
	close(release)
	wg.Wait()
	for i, r := range results {
		checkOK(t, fmt.Sprintf("call %d after the limit was lowered", i), r, bodies[i])
	}
	for i, r := range heldResults {
		checkOK(t, fmt.Sprintf("call %d open when the limit was lowered", i), r, heldBodies[i])
	}
}

// TestH2ReviewHPACKTableSizes: Cells changes HPACK table sizes both ways
// mid-connection: its SETTINGS_HEADER_TABLE_SIZE goes to 0 then back to
// 4096 (the proxy's encoder must signal the smallest size), and its own
// encoder shrinks its table to 0 then grows it back (size updates at the
// start of its blocks, which the proxy's decoder must take). Every call on
// the connection succeeds, with its headers and trailers intact.
func TestH2ReviewHPACKTableSizes(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if got, want := s.Get("x-call"), s.Get(":path"); got != want {
			s.writeHeaders(true, 1, ":status", "200", "content-type", "application/grpc",
				"grpc-status", "13", "grpc-message", "x-call "+got+" on "+want)
			return
		}
		if sz := s.Get("x-enc-table"); sz != "" {
			var n uint32
			fmt.Sscan(sz, &n)
			s.c.wmu.Lock()
			s.c.enc.SetMaxDynamicTableSize(n)
			s.c.wmu.Unlock()
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc", "x-answer", s.Get(":path")) != nil ||
			s.writeData(body, false) != nil {
			return
		}
		s.writeHeaders(true, 1, "grpc-status", "0", "x-trailer", s.Get(":path"))
		if sz := s.Get("x-settings-table"); sz != "" {
			var n uint32
			fmt.Sscan(sz, &n)
			s.c.write(func(fr *http2.Framer) error {
				return fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: n})
			})
		}
	})
	tp := startPeerProxy(t, p)
	steps := []struct{ name, k, v string }{
		{"first", "", ""},
		{"settings-0", "x-settings-table", "0"},
		{"after-settings-0", "", ""},
		{"settings-4096", "x-settings-table", "4096"},
		{"after-settings-4096", "", ""},
		{"encoder-0", "x-enc-table", "0"},
		{"after-encoder-0", "", ""},
		{"encoder-4096", "x-enc-table", "4096"},
		{"after-encoder-4096", "", ""},
	}
	for _, st := range steps {
		path := "/pkg.Svc/" + st.name
		want := grpcMsg([]byte(st.name))
		kv := []string{"x-call", path}
		if st.k != "" {
			kv = append(kv, st.k, st.v)
		}
		r := callGRPC(testCtx(t), tp.H2, tp.URL+path, want, kv...)
		checkOK(t, st.name, r, want)
		if got := r.Header.Get("X-Answer"); got != path {
			t.Errorf("%s: header x-answer = %q, want %q", st.name, got, path)
		}
		if got := r.Trailer.Get("X-Trailer"); got != path {
			t.Errorf("%s: trailer x-trailer = %q, want %q", st.name, got, path)
		}
	}
	if got, want := p.Accepted.Load(), int32(1); got != want {
		t.Errorf("upstream accepted %d connections, want %d", got, want)
	}
}

// TestH2ReviewEmptyDataFrames: Cells sends thousands of empty DATA frames
// between and around its messages, and ends the stream with its trailers.
// The message arrives intact, status OK.
func TestH2ReviewEmptyDataFrames(t *testing.T) {
	t.Parallel()
	want := append(streamMsg("one"), streamMsg("two")...)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		empty := func() bool {
			for range 3000 {
				if s.dataFrame(nil, -1, false) != nil {
					return false
				}
			}
			return true
		}
		if !empty() || s.writeData(want[:7], false) != nil || !empty() ||
			s.writeData(want[7:], false) != nil || !empty() {
			return
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	stream := streamingRecv(t, ctx, tc, "one", "two")
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("end of stream = %v, want io.EOF", err)
	}
}

// TestH2ReviewDropBeforeAnswer: Cells' connection drops (TCP reset) after
// it read a unary call and before it answered. The client gets
// UNAVAILABLE, not a hang; the call is not sent again (Cells may have acted
// on it); the next call succeeds on a new connection.
func TestH2ReviewDropBeforeAnswer(t *testing.T) {
	t.Parallel()
	var seen atomic.Int32
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		_, err := s.readBody()
		if err != nil {
			return
		}
		if s.Get(":path") == "/grpc.testing.TestService/UnaryCall" {
			seen.Add(1)
			s.c.abort()
			return
		}
		s.respond(grpcMsg(nil))
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	_, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: payload(100, 1)})
	if got, want := status.Code(err), codes.Unavailable; got != want {
		t.Errorf("call whose connection dropped = %v, want %v", err, want)
	}
	if got := seen.Load(); got != 1 {
		t.Errorf("Cells saw the call %d times, want once", got)
	}
	if _, err := tc.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
		t.Errorf("the next call: %v", err)
	}
}

// TestH2ReviewLargeMetadata: response header metadata and trailer metadata
// of 20 KiB each (sent by the client as request metadata, which Cells
// echoes), of bytes HPACK's Huffman code does not shorten: every header
// block is more than a 16 KiB frame holds, and crosses the proxy as HEADERS
// and CONTINUATION frames, both legs, between a real grpc-go client and
// server. Each arrives intact. (The proxy's own limit on a request's head,
// 64 KiB, is below what three such fields would need.)
func TestH2ReviewLargeMetadata(t *testing.T) {
	t.Parallel()
	big := func(seed byte) string {
		const rare = "{}|~^<>\\`"
		b := randomBytes(20<<10, seed)
		for i := range b {
			b[i] = rare[int(b[i])%len(rare)]
		}
		return string(b)
	}
	hdr, trl := big(2), big(3)
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		ctx := probe(testCtx(t), "echo", "x-echo-big", hdr, "x-trail-big", trl)
		stream, err := tc.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		p := payload(100<<10, 7)
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: p}); err != nil {
			t.Fatal(err)
		}
		res, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv: %v", err)
		}
		if !proto.Equal(res.GetPayload(), p) {
			t.Error("the message came back different")
		}
		stream.CloseSend()
		if _, err := stream.Recv(); err != io.EOF {
			t.Fatalf("end of stream = %v, want io.EOF", err)
		}
		h, err := stream.Header()
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			what string
			got  []string
			want string
		}{
			{"request metadata at Cells", e.svc.lastMD(t).Get("x-trail-big"), trl},
			{"response header", h.Get("x-echo-big"), hdr},
			{"trailer", stream.Trailer().Get("x-trail-big"), trl},
		} {
			if len(c.got) != 1 || c.got[0] != c.want {
				t.Errorf("%s: got %d values (first %s), want one of %d bytes", c.what, len(c.got), short(c.got...), len(c.want))
			}
		}
	})
}

// TestH2ReviewNoStreamsOneClientGivesUp: Cells allows no stream on its
// connection for a moment (SETTINGS_MAX_CONCURRENT_STREAMS 0) and two calls
// wait on it for the limit to rise. One client gives up. The other call
// must go on waiting, and complete once Cells raises its limit: one
// client's cancellation must not close the connection the other waits on,
// failing that call at once with UNAVAILABLE. Not parallel: it counts the
// calls waiting in the whole process.
func TestH2ReviewNoStreamsOneClientGivesUp(t *testing.T) {
	p := newH2Peer(t, h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 0}}}, echo)
	tp := startPeerProxy(t, p)
	// waitCalls waits until cond holds of the number of calls waiting.
	waitCalls := func(what string, cond func(n int) bool) {
		t.Helper()
		buf := make([]byte, 1<<20)
		waitFor(t, 10*time.Second, func() bool {
			return cond(bytes.Count(buf[:runtime.Stack(buf, true)], []byte("(*grpcConn).awaitStreams(")))
		}, func() string { return "waiting 10 s for " + what })
	}
	want := grpcMsg([]byte("the call that waits"))
	stays := make(chan grpcResult, 1)
	go func() { stays <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Stays", want) }()
	waitCalls("one call to wait for Cells to allow streams", func(n int) bool { return n >= 1 })
	ctx, cancel := context.WithCancel(testCtx(t))
	leaves := make(chan grpcResult, 1)
	go func() { leaves <- callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Leaves", grpcMsg(nil)) }()
	waitCalls("two calls to wait for Cells to allow streams", func(n int) bool { return n >= 2 })
	cancel()
	recv(t, leaves, "the call whose client gave up")
	waitCalls("the proxy to end the call whose client gave up", func(n int) bool { return n <= 1 })
	// Cells raises its limit (on a connection still open, if it is).
	p.Conns()[0].write(func(fr *http2.Framer) error {
		return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100})
	})
	checkOK(t, "the call that waited while another client gave up", recv(t, stays, "the call that waited"), want)
}

// TestH2ReviewChaos: 300 calls, 24 at a time, on a Cells that answers each
// in one of several ways, some of which break other calls on the same
// connection: a complete answer, a reset before or in the middle of the
// answer, an answer without trailers, GOAWAY then a dropped connection in
// the middle of an answer, a dropped connection alone. Every call ends
// (nothing hangs), and a call the client is told succeeded (grpc-status 0)
// carries exactly the answer Cells sent: a broken answer never passes for a
// complete one. Afterwards the proxy still serves calls.
func TestH2ReviewChaos(t *testing.T) {
	t.Parallel()
	fates := []string{"ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok", "reset-before", "reset-mid", "no-trailers", "goaway-drop", "drop"}
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		fate := s.Get("x-fate")
		if fate == "reset-before" {
			s.reset(http2.ErrCodeInternal)
			return
		}
		if fate == "drop" {
			s.c.abort()
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		half := len(body) / 2
		if s.writeData(body[:half], false) != nil {
			return
		}
		switch fate {
		case "reset-mid":
			s.reset(http2.ErrCodeCancel)
			return
		case "goaway-drop":
			s.c.goAway(s.ID, http2.ErrCodeNo)
			s.c.abort()
			return
		case "no-trailers":
			s.writeData(body[half:], true)
			return
		}
		if s.writeData(body[half:], false) != nil {
			return
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)

	const calls, parallel = 300, 24
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	var okCalls, failed atomic.Int32
	for i := range calls {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			fate := fates[i%len(fates)]
			want := grpcMsg(randomBytes(1000+i*37, byte(i)))
			r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Chaos", want, "x-fate", fate)
			if r.Err != nil {
				t.Errorf("call %d (%s): %v", i, fate, r.Err)
				return
			}
			st := r.Trailer.Get("Grpc-Status")
			if st == "" {
				st = r.Header.Get("Grpc-Status")
			}
			if st != "0" {
				failed.Add(1)
				return
			}
			okCalls.Add(1)
			if fate != "ok" {
				t.Errorf("call %d (%s): grpc-status 0 for an answer Cells broke (%d of %d bytes)", i, fate, len(r.Body), len(want))
			}
			if !bytes.Equal(r.Body, want) {
				t.Errorf("call %d (%s): grpc-status 0 with %d bytes, not the %d Cells sent", i, fate, len(r.Body), len(want))
			}
		})
	}
	wg.Wait()
	t.Logf("%d calls OK, %d failed, on %d upstream connections", okCalls.Load(), failed.Load(), p.Accepted.Load())
	want := grpcMsg([]byte("after the chaos"))
	checkOK(t, "a call after the chaos", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Chaos", want, "x-fate", "ok"), want)
}

// TestH2ReviewLargeMessages: messages of 6 MiB each way, a unary call and
// three on a bidirectional stream, between a real grpc-go client and server
// that allow them: each message spans hundreds of DATA frames and many
// times the proxy's 512 KiB stream window, both legs. Each arrives intact.
func TestH2ReviewLargeMessages(t *testing.T) {
	t.Parallel()
	const size, limit = 6 << 20, 32 << 20
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.MaxRecvMsgSize(limit), grpc.MaxSendMsgSize(limit))
	testgrpc.RegisterTestServiceServer(gs, &reviewService{})
	serveGRPC(t, gs, ln)
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	tp := startProxy(t, cfg)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(limit), grpc.MaxCallSendMsgSize(limit))))
	ctx, cancel := context.WithTimeout(testCtx(t), 30*time.Second)
	defer cancel()

	p := payload(size, 1)
	res, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{Payload: p})
	if err != nil {
		t.Fatalf("unary call: %v", err)
	}
	if !proto.Equal(res.GetPayload(), p) {
		t.Error("unary call: the answer differs from the request")
	}

	stream, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sent := make(chan error, 1)
	go func() {
		for i := range 3 {
			if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: payload(size, uint64(10+i))}); err != nil {
				sent <- err
				return
			}
		}
		sent <- stream.CloseSend()
	}()
	for i := range 3 {
		res, err := stream.Recv()
		if err != nil {
			t.Fatalf("stream message %d: %v", i, err)
		}
		if !proto.Equal(res.GetPayload(), payload(size, uint64(10+i))) {
			t.Errorf("stream message %d came back different", i)
		}
	}
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("end of stream = %v, want io.EOF", err)
	}
	if err := recv(t, sent, "the stream's sender"); err != nil {
		t.Errorf("sending: %v", err)
	}
}

// floodService's StreamingOutputCall sends 64 KiB messages until its stream
// ends, then reports how it ended.
type floodService struct {
	testgrpc.UnimplementedTestServiceServer
	started chan struct{}
	ended   chan error
}

func (s *floodService) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	s.started <- struct{}{}
	msg := &testgrpc.StreamingOutputCallResponse{Payload: payload(64<<10, 5)}
	for {
		if err := stream.Send(msg); err != nil {
			s.ended <- stream.Context().Err()
			return err
		}
	}
}

// TestH2ReviewCancelWhileCellsBlocked: a grpc-go client reads one message
// of a server stream, stops reading until Cells (a real grpc-go server) is
// held back by flow control, its Send blocked, and the proxy holds all it
// may; then the client cancels the call. The cancellation reaches Cells
// through the full windows: its handler's context ends and its Send
// returns, and the connection serves the next call.
func TestH2ReviewCancelWhileCellsBlocked(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := &floodService{started: make(chan struct{}, 2), ended: make(chan error, 2)}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, svc)
	serveGRPC(t, gs, ln)
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	tp := startProxy(t, cfg)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))

	for i := range 2 {
		ctx, cancel := context.WithCancel(testCtx(t))
		stream, err := tc.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != nil {
			t.Fatalf("call %d: first message: %v", i, err)
		}
		recv(t, svc.started, "the handler at Cells")
		// Until every window on the way is full: the proxy's stream
		// holds at most its 512 KiB window of the answer.
		waitHeldBack(t, tp.fwd.grpcUp)
		cancel()
		if err := recv(t, svc.ended, "Cells' handler to see the cancellation"); !errors.Is(err, context.Canceled) {
			t.Errorf("call %d: Cells' handler context ended with %v, want %v", i, err, context.Canceled)
		}
	}
}

// waitHeldBack waits until the one stream on u's connections has a full
// receive window: Cells may send nothing more on it.
func waitHeldBack(t *testing.T, u *grpcUpstream) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool {
		for _, c := range grpcConns(u) {
			c.mu.Lock()
			full := false
			for _, s := range c.streams {
				full = full || s.recv < 16<<10
			}
			c.mu.Unlock()
			if full {
				return true
			}
		}
		return false
	}, func() string { return "no stream's receive window filled up within 10 s" })
}

// TestH2ReviewIgnoredFrames: Cells sends, between the frames of an answer,
// frames the proxy must ignore (RFC 9113 §4.1, §5.5): PRIORITY, frames of
// unknown or extension types (ALTSVC, ORIGIN, PRIORITY_UPDATE, 0xfa) on the
// stream and on the connection, a PING ACK nobody asked for, and a
// WINDOW_UPDATE on a stream that is over. The answer arrives intact and the
// connection serves the next call.
func TestH2ReviewIgnoredFrames(t *testing.T) {
	t.Parallel()
	var lastID atomic.Uint32
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		noise := func() error {
			return s.c.write(func(fr *http2.Framer) error {
				for _, f := range []struct {
					typ http2.FrameType
					id  uint32
					p   []byte
				}{
					{0xa, 0, []byte{0, 4, 'c', 'e', 'l', 'l', 'h', '2', '=', '"', ':', '4', '4', '3', '"'}}, // ALTSVC
					{0xc, 0, []byte{0, 5, 'c', 'e', 'l', 'l', 's'}},                                         // ORIGIN
					{0x10, 0, []byte{0, 0, 0, byte(s.ID), 'u', '=', '1'}},                                   // PRIORITY_UPDATE
					{0xfa, s.ID, []byte("unknown on the stream")},
					{0xfa, 0, nil},
				} {
					if err := fr.WriteRawFrame(f.typ, 0, f.id, f.p); err != nil {
						return err
					}
				}
				if err := fr.WritePriority(s.ID, http2.PriorityParam{StreamDep: 0, Weight: 200}); err != nil {
					return err
				}
				if prev := lastID.Load(); prev != 0 {
					if err := fr.WriteWindowUpdate(prev, 1000); err != nil {
						return err
					}
				}
				return fr.WritePing(true, [8]byte{'u', 'n', 'a', 's', 'k', 'e', 'd'})
			})
		}
		defer lastID.Store(s.ID)
		if noise() != nil || s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil ||
			noise() != nil || s.writeData(body[:len(body)/2], false) != nil || noise() != nil ||
			s.writeData(body[len(body)/2:], false) != nil || noise() != nil {
			return
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	for i := range 3 {
		want := grpcMsg(randomBytes(5000, byte(i)))
		checkOK(t, fmt.Sprintf("call %d", i), callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Noise", want), want)
	}
	if got, want := p.Accepted.Load(), int32(1); got != want {
		t.Errorf("upstream accepted %d connections, want %d", got, want)
	}
}

// TestH2ReviewPingOnCallAfterIdle: a call starts on a connection Cells has
// been quiet on for longer than pingEvery (no call was open, so none was
// PINGed for). Cells has died without a FIN or RST reaching the proxy (its
// host gone, a network cut): it answers nothing, PINGs included. The proxy
// must PING with the call, as it promises for a call open while nothing was
// heard for pingEvery, and end the call with UNAVAILABLE once the PING goes
// unanswered, instead of leaving it to the timer set for an idle
// connection, up to pingEvery later (5 minutes by default: a Cells Sync
// call without a deadline hung that long, plus pingTimeout).
func TestH2ReviewPingOnCallAfterIdle(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{SilentPings: true}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if s.Get(":path") == "/pkg.Svc/Echo" {
			s.respond(body)
		}
		// Otherwise nothing: Cells is gone.
	})
	tp := startPingProxy(t, p, time.Hour, 200*time.Millisecond)
	want := grpcMsg([]byte("before the idle hour"))
	checkOK(t, "first call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	c := grpcConns(tp.fwd.grpcUp)[0]
	// Two hours without a frame from Cells, without the wait.
	c.stamp.Store(time.Now().Add(-2 * time.Hour).UnixNano())

	res := make(chan grpcResult, 1)
	go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Watch", grpcMsg(nil)) }()
	waitFor(t, 10*time.Second, func() bool { return pingsSeen(p) > 0 }, func() string {
		return "no PING within 10 s of a call on a connection quiet for two hours (pingEvery 1 h)"
	})
	r := recv(t, res, "the call on the dead connection")
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	st := r.Trailer.Get("Grpc-Status")
	if st == "" {
		st = r.Header.Get("Grpc-Status")
	}
	if st != "14" {
		t.Errorf("grpc-status %q, want 14 (UNAVAILABLE)", st)
	}
}

// TestH2ReviewGoAwayUnderLoad: 120 concurrent unary calls from a grpc-go
// client; Cells sends GOAWAY on its first connection when the 20th stream
// arrives, with that stream as the last it will process, and processes
// nothing above it (RFC 9113 §6.8), as a Cells stopping or recycling its
// connection (grpc-go's MaxConnectionAge, Go's IdleTimeout) does while
// calls keep coming. Every call must succeed: those up to the last stream
// ID on the first connection, those above it sent again on another, as
// they were not processed and their bodies are small (grpcUpstream.do).
//
// Until the body copy handed a refused call's body over to the next
// attempt (handOver), 5 to 19 of the 100 calls above the last stream ID
// failed with UNAVAILABLE in runs on a 2-core machine: the refusal closed
// the client's request body at once, and a call was sent again only if its
// body had been read to the end before, which under load it often had not
// (the copy's goroutine not yet run, or waiting for the client's
// END_STREAM). grpc-go talking to Cells directly retries such calls
// transparently.
func TestH2ReviewGoAwayUnderLoad(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	streams := 0
	var last uint32
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if s.c.N == 1 {
			mu.Lock()
			streams++
			if streams == 20 {
				last = s.ID
				s.c.goAway(last, http2.ErrCodeNo)
			}
			ignore := last != 0 && s.ID > last
			mu.Unlock()
			if ignore {
				return // not processed: no answer
			}
		}
		if _, err := s.readBody(); err != nil {
			return
		}
		s.respond(grpcMsg(nil))
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	const calls = 120
	var wg sync.WaitGroup
	var failed atomic.Int32
	for i := range calls {
		wg.Go(func() {
			if _, err := tc.UnaryCall(testCtx(t), &testgrpc.SimpleRequest{Payload: payload(500, uint64(i))}); err != nil {
				failed.Add(1)
				t.Errorf("call %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	t.Logf("%d of %d calls failed; %d upstream connections; GOAWAY's last stream ID %d", failed.Load(), calls, p.Accepted.Load(), last)
}

// earlyService's FullDuplexCall answers the first message and returns,
// status OK, while its client is still sending.
type earlyService struct {
	testgrpc.UnimplementedTestServiceServer
}

func (earlyService) FullDuplexCall(stream testgrpc.TestService_FullDuplexCallServer) error {
	in, err := stream.Recv()
	if err != nil {
		return err
	}
	return stream.Send(&testgrpc.StreamingOutputCallResponse{Payload: in.GetPayload()})
}

// TestH2ReviewCellsEndsStreamEarly: Cells (a real grpc-go server) ends a
// bidirectional stream with status OK while its client still sends large
// messages, and resets the client's side (RST_STREAM NO_ERROR after the
// trailers, as grpc-go does). The client gets the answer and status OK,
// not an error, whatever its own sends see; the next stream on the
// connection works the same.
func TestH2ReviewCellsEndsStreamEarly(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, earlyService{})
	serveGRPC(t, gs, ln)
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: ln.Addr().String()}
	tp := startProxy(t, cfg)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))

	for i := range 3 {
		ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
		stream, err := tc.FullDuplexCall(ctx)
		if err != nil {
			t.Fatal(err)
		}
		first := payload(1000, uint64(i))
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: first}); err != nil {
			t.Fatal(err)
		}
		sending := make(chan struct{})
		go func() {
			defer close(sending)
			// Until the stream ends: io.EOF once it has.
			for stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: payload(256<<10, 9)}) == nil {
			}
		}()
		res, err := stream.Recv()
		if err != nil {
			t.Fatalf("stream %d: Recv: %v", i, err)
		}
		if !proto.Equal(res.GetPayload(), first) {
			t.Errorf("stream %d: the answer differs from the first message", i)
		}
		if _, err := stream.Recv(); err != io.EOF {
			t.Errorf("stream %d: end = %v, want io.EOF (status OK)", i, err)
		}
		recv(t, sending, "the client's sends to end")
		cancel()
	}
}

// TestH2ReviewStreamRefusedSentAgain: a bidirectional stream whose client
// sends one message and waits for its answer before sending the next is
// refused by Cells after that first message arrived (GOAWAY whose last
// stream ID is below it: not processed). The proxy sends it again on a new
// connection, the message read so far first, then the rest of the
// client's messages as they come, without waiting for the body's end
// (which would never come: the client waits for Cells). The stream then
// runs to its end, status OK, every message intact.
func TestH2ReviewStreamRefusedSentAgain(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if s.c.N == 1 {
			if _, err := s.read(); err != nil {
				return
			}
			s.c.goAway(0, http2.ErrCodeNo)
			return // not processed
		}
		headers := false
		for {
			b, err := s.read()
			if err == io.EOF {
				s.writeHeaders(true, 1, "grpc-status", "0")
				return
			}
			if err != nil {
				return
			}
			if !headers {
				if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
					return
				}
				headers = true
			}
			if s.writeData(b, false) != nil {
				return
			}
		}
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	stream, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		want := payload(3000, uint64(i))
		if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: want}); err != nil {
			t.Fatalf("Send %d: %v", i, err)
		}
		// StreamingOutputCallResponse's payload is field 1, the
		// request's field 3: the echo of a request decodes as a
		// response whose payload is unset (the request's payload is an
		// unknown field to it). Its unknown fields hold the echo.
		res, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv %d: %v", i, err)
		}
		echo, err := proto.Marshal(res)
		if err != nil {
			t.Fatal(err)
		}
		sent, err := proto.Marshal(&testgrpc.StreamingOutputCallRequest{Payload: want})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(echo, sent) {
			t.Errorf("message %d came back different", i)
		}
	}
	stream.CloseSend()
	if _, err := stream.Recv(); err != io.EOF {
		t.Errorf("end of stream = %v, want io.EOF (status OK)", err)
	}
	if got, want := p.Accepted.Load(), int32(2); got != want {
		t.Errorf("upstream accepted %d connections, want %d", got, want)
	}
}

// TestH2ReviewRefusedLargeBody: Cells refuses (REFUSED_STREAM) a call after
// more than grpcReplayMax of its body arrived. The proxy, which no longer
// holds all of it, does not send it again: the client gets UNAVAILABLE at
// once, not a hang, and Cells sees the call once.
func TestH2ReviewRefusedLargeBody(t *testing.T) {
	t.Parallel()
	var seen atomic.Int32
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		seen.Add(1)
		got := 0
		for got <= grpcReplayMax {
			b, err := s.read()
			if err != nil {
				return
			}
			got += len(b)
		}
		s.reset(http2.ErrCodeRefusedStream)
	})
	tp := startPeerProxy(t, p)
	r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Upload", grpcMsg(randomBytes(200<<10, 1)))
	if r.Err != nil {
		t.Fatal(r.Err)
	}
	if got := r.Header.Get("Grpc-Status"); got != "14" {
		t.Errorf("grpc-status %q (%q), want 14 (UNAVAILABLE)", got, r.Header.Get("Grpc-Message"))
	}
	if got := seen.Load(); got != 1 {
		t.Errorf("Cells saw the call %d times, want once", got)
	}
}

// streamingCall opens a StreamingOutputCall through tc for n answers of
// size bytes each; the caller reads them, or not.
func streamingCall(t *testing.T, ctx context.Context, tc testgrpc.TestServiceClient, n int, size int32) testgrpc.TestService_StreamingOutputCallClient {
	t.Helper()
	params := make([]*testgrpc.ResponseParameters, n)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: size}
	}
	stream, err := tc.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{ResponseParameters: params})
	if err != nil {
		t.Fatal(err)
	}
	return stream
}

// streamingRecv opens a StreamingOutputCall through tc and receives the
// messages want, in order; the caller checks how the stream ends.
func streamingRecv(t *testing.T, ctx context.Context, tc testgrpc.TestServiceClient, want ...string) testgrpc.TestService_StreamingOutputCallClient {
	t.Helper()
	stream, err := tc.StreamingOutputCall(ctx, &testgrpc.StreamingOutputCallRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range want {
		res, err := stream.Recv()
		if err != nil {
			t.Fatalf("Recv (before %q): %v", w, err)
		}
		if got := string(res.GetPayload().GetBody()); got != w {
			t.Errorf("message = %q, want %q", got, w)
		}
	}
	return stream
}
