package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// Measurements for the choice of the gRPC upstream's receive window per
// stream (grpcUpstream.streamWindow): what unread calls make the proxy hold,
// and what a smaller window costs one bulk stream. Figures go to the log;
// nothing here asserts a time.
//
//	go test ./proxy -run TestGRPCUpstreamUnreadCallsHeld -v
//	go test ./proxy -run '^$' -bench GRPCUpstreamWindow -benchtime 4x

// windowSizes are the stream windows compared; 0 is newGRPCUpstream's.
var windowSizes = []uint32{0, 4 << 20, 1 << 20, 512 << 10, 256 << 10}

func windowName(w uint32) string {
	switch {
	case w == 0:
		return "default"
	case w >= 1<<20:
		return fmt.Sprintf("%dMiB", w>>20)
	}
	return fmt.Sprintf("%dKiB", w>>10)
}

// setStreamWindow sets the upstream's stream window before its first call
// (a connection announces it in its SETTINGS); 0 keeps the default.
func setStreamWindow(tp *testProxy, w uint32) uint32 {
	if w != 0 {
		tp.fwd.grpcUp.streamWindow = w
	}
	return tp.fwd.grpcUp.streamWindow
}

// bulkChunk is what the scripted Cells sends, 64 KiB at a time; read only.
var bulkChunk = make([]byte, 64<<10)

// TestGRPCUpstreamUnreadCallsHeld: one client opens many server-streaming
// calls on two connections and reads none of their large answers. Once
// Cells has stopped sending (every call out of window), no call may hold
// more than its stream window of the answer, with the buffer's slack; the
// test logs the sum. Other calls on the same upstream connection must still
// complete meanwhile: a small one, and an 8 MiB answer read whole.
//
// It measured the choice of the window (2026-11-27, 100 calls of 16 MiB
// answers): buffers of 439 MiB at 4 MiB, 114 MiB at 1 MiB, 57 MiB at
// 512 KiB, 27 MiB at 256 KiB; pass another window to unreadCallsHeld to measure again.
func TestGRPCUpstreamUnreadCallsHeld(t *testing.T) {
	calls := 100
	if raceEnabled || testing.Short() {
		calls = 8
	}
	unreadCallsHeld(t, 0, calls, 2)
}

func unreadCallsHeld(t *testing.T, window uint32, calls, conns int) {
	const answer = 16 << 20
	const medium = 8 << 20
	var mu sync.Mutex
	var bulk []*h2Stream
	stalled := make(chan uint32, calls)
	p := newH2Peer(t, h2PeerConfig{ConnWindow: 1 << 30}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		switch s.Get(":path") {
		case "/pkg.Svc/Small":
			if s.writeData(grpcMsg([]byte("small answer")), false) == nil {
				s.writeHeaders(true, 1, "grpc-status", "0")
			}
			return
		case "/pkg.Svc/Medium":
			for sent := 0; sent < medium; sent += len(bulkChunk) {
				if s.writeData(bulkChunk, false) != nil {
					return
				}
			}
			s.writeHeaders(true, 1, "grpc-status", "0")
			return
		}
		mu.Lock()
		bulk = append(bulk, s)
		mu.Unlock()
		once := false
		stall := func() {
			if !once {
				once = true
				stalled <- s.ID
			}
		}
		for sent := 0; sent < answer; sent += len(bulkChunk) {
			if s.writeDataStall(bulkChunk, false, 200*time.Millisecond, stall) != nil {
				return
			}
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	w := setStreamWindow(tp, window)
	ctx := testCtx(t)
	small := grpcMsg([]byte("small answer"))
	// The upstream connection, and the proxy's pools, before the baseline.
	checkOK(t, "first call", callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Small", grpcMsg(nil)), small)
	base := h2HeapInUse()

	// The client: raw HTTP/2 connections that grant the RFC's 65,535-byte
	// windows and never give any back, so that it holds almost nothing of
	// the answers itself.
	fcs := make([]*frameConn, conns)
	for i := range fcs {
		fcs[i] = dialH2At(t, tp, tp.Addr().String())
	}
	fields := pseudo(tp, "POST", "/pkg.Svc/Download", "content-type", "application/grpc", "te", "trailers")
	for i := range calls {
		id := uint32(2*(i/conns) + 1)
		if err := fcs[i%conns].request(id, fields...); err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	timeout := time.After(time.Minute)
	for n := 0; n < calls; n++ {
		select {
		case <-stalled:
		case <-timeout:
			t.Fatalf("%d of %d calls ran out of window in a minute", n, calls)
		}
	}
	// Cells has stopped sending when nothing more went out for 500 ms.
	sent := func() (n int64) {
		mu.Lock()
		defer mu.Unlock()
		for _, s := range bulk {
			n += s.Sent()
		}
		return n
	}
	total := sent()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		time.Sleep(500 * time.Millisecond)
		n := sent()
		if n == total {
			break
		}
		total = n
	}
	heap := int64(h2HeapInUse()) - int64(base)
	var held, capSum int64
	var open, maxCap int
	for _, c := range grpcConns(tp.fwd.grpcUp) {
		c.mu.Lock()
		for _, s := range c.streams {
			open++
			held += int64(s.buf.Len())
			capSum += int64(s.buf.Cap())
			maxCap = max(maxCap, s.buf.Cap())
		}
		c.mu.Unlock()
	}
	const mib = 1 << 20
	t.Logf("window %s, %d unread calls on %d client connections, %d upstream calls open: "+
		"Cells sent %.1f MiB; the calls' buffers hold %.1f MiB unread, %.1f MiB allocated (largest %.2f MiB); heap in use %+.1f MiB",
		windowName(w), calls, conns, open, float64(total)/mib, float64(held)/mib, float64(capSum)/mib, float64(maxCap)/mib, float64(heap)/mib)

	if limit := int(w) + int(w)/2; maxCap > limit {
		t.Errorf("a call whose client reads nothing holds a %d-byte buffer, over 1.5 times its %d-byte window", maxCap, w)
	}
	if open < calls {
		t.Errorf("%d calls open on the upstream, want the %d unread ones", open, calls)
	}

	// Other calls on the same upstream connection, from another client
	// connection, meanwhile. A generous bound for answers that take
	// milliseconds, so that a starved connection fails the test rather
	// than hanging it.
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	checkOK(t, "a small call meanwhile", callGRPC(sctx, tp.H2, tp.URL+"/pkg.Svc/Small", grpcMsg(nil)), small)
	smallTook := time.Since(start)
	start = time.Now()
	r := callGRPC(sctx, tp.H2, tp.URL+"/pkg.Svc/Medium", grpcMsg(nil))
	if r.Err != nil || len(r.Body) != medium || r.Trailer.Get("Grpc-Status") != "0" {
		t.Fatalf("an 8 MiB answer meanwhile: %d bytes, grpc-status %q, %v", len(r.Body), r.Trailer.Get("Grpc-Status"), r.Err)
	}
	t.Logf("meanwhile: a small call took %v, an 8 MiB answer %v", smallTook.Round(time.Microsecond), time.Since(start).Round(time.Microsecond))
	if n := p.Accepted.Load(); n != 1 {
		t.Errorf("the upstream accepted %d connections, want 1 (all calls on one)", n)
	}
}

// BenchmarkGRPCUpstreamWindow: one large server stream (256 MiB in 64 KiB
// messages) through the proxy to a client that reads as fast as it can, for
// each stream window. Cells is either the scripted peer (DATA frames as the
// windows allow) or a grpc-go server (topology B, h2c); rtt=1ms puts a delay
// line between the proxy and Cells, nominally 0.5 ms each way. Go's timers
// wake at a 1 ms granularity when the process is idle (netpoll), so the
// round trip it adds is larger: an empty call through the proxy took about
// 2.6 ms with it and 0.2 ms without on a 2-CPU machine (logged).
//
//	go test -c -o /tmp/proxy.test ./proxy
//	/tmp/proxy.test -test.run '^$' -test.bench 'GRPCUpstreamWindow/grpc-go/rtt=0/window=1MiB$' -test.benchtime 4x
func BenchmarkGRPCUpstreamWindow(b *testing.B) {
	for _, cells := range []string{"peer", "grpc-go"} {
		for _, rtt := range []time.Duration{0, time.Millisecond} {
			for _, w := range windowSizes[1:] {
				name := fmt.Sprintf("%s/rtt=%v/window=%s", cells, rtt, windowName(w))
				b.Run(name, func(b *testing.B) {
					if cells == "peer" {
						benchPeerStream(b, w, rtt/2)
					} else {
						benchGRPCGoStream(b, w, rtt/2)
					}
				})
			}
		}
	}
}

const bulkStreamSize = 256 << 20

// windowProxy starts a proxy whose gRPC upstream is Cells at addr (h2c),
// through a delay line of oneWay each way when it is not 0, with the given
// stream window (0: the default).
func windowProxy(b *testing.B, addr string, window uint32, oneWay time.Duration) *testProxy {
	if oneWay > 0 {
		addr = delayRelay(b, addr, oneWay)
	}
	cfg := testConfig(newUpstream(b, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: addr}
	tp := startProxy(b, cfg)
	setStreamWindow(tp, window)
	return tp
}

func benchPeerStream(b *testing.B, window uint32, oneWay time.Duration) {
	p := newH2Peer(b, h2PeerConfig{ConnWindow: 1 << 30}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		for sent := 0; sent < bulkStreamSize; sent += len(bulkChunk) {
			if s.writeData(bulkChunk, false) != nil {
				return
			}
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := windowProxy(b, p.Addr, window, oneWay)
	b.SetBytes(bulkStreamSize)
	b.ResetTimer()
	for b.Loop() {
		req, err := grpcRequest(b.Context(), tp.URL+"/pkg.Svc/Download", grpcMsg(nil))
		if err != nil {
			b.Fatal(err)
		}
		res, err := tp.H2.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if err != nil || n != bulkStreamSize || res.Trailer.Get("Grpc-Status") != "0" {
			b.Fatalf("received %d bytes, grpc-status %q: %v", n, res.Trailer.Get("Grpc-Status"), err)
		}
	}
}

// bulkService answers StreamingOutputCall with the same 64 KiB message, once
// per response parameter, so that the server allocates nothing per message.
type bulkService struct {
	testgrpc.UnimplementedTestServiceServer
	msg *testgrpc.StreamingOutputCallResponse
}

func (s *bulkService) EmptyCall(context.Context, *testgrpc.Empty) (*testgrpc.Empty, error) {
	return &testgrpc.Empty{}, nil
}

func (s *bulkService) StreamingOutputCall(in *testgrpc.StreamingOutputCallRequest, stream testgrpc.TestService_StreamingOutputCallServer) error {
	for range in.GetResponseParameters() {
		if err := stream.Send(s.msg); err != nil {
			return err
		}
	}
	return nil
}

func benchGRPCGoStream(b *testing.B, window uint32, oneWay time.Duration) {
	const msgSize = 64 << 10
	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, &bulkService{msg: &testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: make([]byte, msgSize)}}})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	serveGRPC(b, gs, ln)
	tp := windowProxy(b, ln.Addr().String(), window, oneWay)
	tc := testgrpc.NewTestServiceClient(dialProxy(b, tp, tp.Addr().String()))
	// The round trip of an empty call through the proxy, delay line
	// included.
	var lat []time.Duration
	for range 21 {
		start := time.Now()
		if _, err := tc.EmptyCall(b.Context(), &testgrpc.Empty{}); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	slices.Sort(lat)
	b.Logf("empty call through the proxy: median %v", lat[len(lat)/2].Round(time.Microsecond))
	params := make([]*testgrpc.ResponseParameters, bulkStreamSize/msgSize)
	for i := range params {
		params[i] = &testgrpc.ResponseParameters{Size: msgSize}
	}
	req := &testgrpc.StreamingOutputCallRequest{ResponseParameters: params}
	b.SetBytes(bulkStreamSize)
	b.ResetTimer()
	for b.Loop() {
		stream, err := tc.StreamingOutputCall(b.Context(), req)
		if err != nil {
			b.Fatal(err)
		}
		var n int
		for {
			m, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				b.Fatalf("after %d bytes: %v", n, err)
			}
			n += len(m.GetPayload().GetBody())
		}
		if n != bulkStreamSize {
			b.Fatalf("received %d bytes, want %d", n, bulkStreamSize)
		}
	}
}

// delayRelay listens on 127.0.0.1 and relays every connection to target,
// each byte leaving oneWay after it arrived, both ways: a delay line, whose
// chunks are queued with the time they arrived, not a copy that sleeps
// between chunks. It stops when the test ends.
func delayRelay(tb testing.TB, target string, oneWay time.Duration) string {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			mu.Lock()
			conns = append(conns, in, out)
			mu.Unlock()
			wg.Go(func() { delayLine(in, out, oneWay) })
			wg.Go(func() { delayLine(out, in, oneWay) })
		}
	})
	tb.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}

// delayLine copies src to dst, each chunk written d after it was read.
func delayLine(src, dst net.Conn, d time.Duration) {
	type chunk struct {
		b   []byte
		due time.Time
	}
	q := make(chan chunk, 4096)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range q {
			time.Sleep(time.Until(c.due))
			if _, err := dst.Write(c.b); err != nil {
				src.Close()
				dst.Close()
				for range q {
				}
				return
			}
		}
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}()
	for {
		b := make([]byte, 64<<10)
		n, err := src.Read(b)
		if n > 0 {
			q <- chunk{b[:n], time.Now().Add(d)}
		}
		if err != nil {
			break
		}
	}
	close(q)
	<-done
}
