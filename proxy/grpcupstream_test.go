package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The gRPC upstream leg, end to end, whatever HTTP/2 client the proxy uses
// to reach Cells' gRPC port: a scripted HTTP/2 server (h2Peer) stands in for
// Cells and does, frame by frame, the unusual things a hand-written client
// tends to get wrong: small and exhausted windows, frame splitting and
// padding, a stream limit of one, resets, GOAWAY, a dropped connection,
// PING, malformed response headers. Clients are net/http's HTTP/2 client,
// which shows the exact status, headers, body and trailers the proxy
// answers, and grpc-go where the gRPC status a real client derives matters.

// startPeerProxy starts a proxy whose gRPC upstream is p over h2c (Cells'
// gRPC port in topology B); its HTTP upstream is a recorder.
func startPeerProxy(t testing.TB, p *h2Peer) *testProxy {
	t.Helper()
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: p.Addr}
	return startProxy(t, cfg)
}

// grpcMsg frames msg as one uncompressed gRPC message.
func grpcMsg(msg []byte) []byte {
	b := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	return append(b, msg...)
}

// randomBytes is n bytes of a fixed pseudo-random sequence for seed.
func randomBytes(n int, seed byte) []byte {
	b := make([]byte, n)
	rand.NewChaCha8([32]byte{'u', 'p', seed}).Read(b)
	return b
}

// grpcResult is a gRPC call as net/http's client saw it.
type grpcResult struct {
	Status  int
	Header  http.Header
	Body    []byte
	Trailer http.Header
	Err     error // of the request, or of reading the body
}

// callGRPC makes a gRPC call with net/http's HTTP/2 client as gRPC clients
// make it: POST, content-type application/grpc, te: trailers, a body of
// unknown length; then reads the whole response. kv are more request
// fields, name then value; "host" sets the authority.
func callGRPC(ctx context.Context, c *http.Client, url string, body []byte, kv ...string) grpcResult {
	req, err := grpcRequest(ctx, url, body)
	if err != nil {
		return grpcResult{Err: err}
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if strings.EqualFold(kv[i], "host") {
			req.Host = kv[i+1]
			continue
		}
		req.Header.Add(kv[i], kv[i+1])
	}
	res, err := c.Do(req)
	if err != nil {
		return grpcResult{Err: err}
	}
	defer res.Body.Close()
	r := grpcResult{Status: res.StatusCode, Header: res.Header}
	r.Body, r.Err = io.ReadAll(res.Body)
	r.Trailer = res.Trailer
	return r
}

// grpcRequest is a gRPC call's request as a gRPC client sends it: POST,
// content-type application/grpc, te: trailers, no content-length.
func grpcRequest(ctx context.Context, url string, body []byte) (*http.Request, error) {
	// Not a *bytes.Reader: its length would become a content-length.
	req, err := http.NewRequestWithContext(ctx, "POST", url, io.MultiReader(bytes.NewReader(body)))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	return req, nil
}

// startCall makes a gRPC call through tp over HTTP/2 and returns its
// response once the header arrived; the body is closed when the test ends.
func startCall(t *testing.T, ctx context.Context, tp *testProxy, path string, body []byte) *http.Response {
	t.Helper()
	req, err := grpcRequest(ctx, tp.URL+path, body)
	if err != nil {
		t.Fatal(err)
	}
	res, err := tp.H2.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { res.Body.Close() })
	return res
}

// checkOK fails unless r is a complete call with grpc-status 0 and body want.
func checkOK(t testing.TB, what string, r grpcResult, want []byte) {
	t.Helper()
	if r.Err != nil {
		t.Fatalf("%s: %v", what, r.Err)
	}
	if r.Status != http.StatusOK {
		t.Errorf("%s: status = %d, want 200", what, r.Status)
	}
	if got := r.Trailer.Get("Grpc-Status"); got != "0" {
		t.Errorf("%s: trailer grpc-status = %q (grpc-message %q, header grpc-status %q), want \"0\"",
			what, got, r.Trailer.Get("Grpc-Message"), r.Header.Get("Grpc-Status"))
	}
	if !bytes.Equal(r.Body, want) {
		t.Errorf("%s: body is %d bytes, not the %d the upstream sent", what, len(r.Body), len(want))
	}
}

// short shows values, each cut to 30 bytes with its length.
func short(values ...string) string {
	var b strings.Builder
	for i, v := range values {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%.30q (%d bytes)", v, len(v))
	}
	return b.String()
}

// grpcConns is a copy of u's connections to Cells, taken under u's lock:
// each one's own state is still to be read under its own lock.
func grpcConns(u *grpcUpstream) []*grpcConn {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.conns)
}

// recv waits up to 10 s for a value from c.
func recv[T any](t testing.TB, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(10 * time.Second):
		t.Fatalf("waiting for %s: timed out", what)
		var zero T
		return zero
	}
}

// echo is a handler that reads the request body and answers it back with
// grpc-status 0.
func echo(s *h2Stream) {
	body, err := s.readBody()
	if err != nil {
		return
	}
	s.respond(body)
}

// TestGRPCUpstreamRequestFlowControl: the upstream grants window only as
// it reads, with a connection window that stays the RFC's 65,535: once with
// a 1 KiB stream window (the stream's window binds), once with a 1 MiB one
// (the connection's binds). A 1 MiB request body arrives intact, and the
// proxy never sends a byte beyond a window granted (h2Peer checks every
// DATA frame against both).
func TestGRPCUpstreamRequestFlowControl(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name   string
		window uint32
	}{
		{"stream-window-1KiB", 1024},
		{"connection-window-64KiB", 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			got := make(chan [32]byte, 1)
			p := newH2Peer(t, h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: c.window}}}, func(s *h2Stream) {
				body, err := s.readBody()
				if err != nil {
					return
				}
				got <- sha256.Sum256(body)
				s.respond(grpcMsg(nil))
			})
			tp := startPeerProxy(t, p)

			body := grpcMsg(randomBytes(1<<20-5, 1))
			r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Upload", body)
			checkOK(t, "upload", r, grpcMsg(nil))
			if sum := recv(t, got, "the upstream's hash of the body"); sum != sha256.Sum256(body) {
				t.Error("the body the upstream received differs from the one sent")
			}
			for _, v := range p.Violations() {
				t.Errorf("upstream: %s", v)
			}
			for _, c := range p.Conns() {
				t.Logf("connection %d: %d DATA frames, the largest %d bytes", c.N, c.Stats().DataFrames, c.Stats().MaxDataFrame)
			}
		})
	}
}

// TestGRPCUpstreamResponseFlowControl: the upstream answers 64 MiB on one
// stream, honouring the proxy's windows, while the client reads nothing
// yet. The upstream blocks on an exhausted window with a bounded amount
// sent: the proxy holds a slow client's response in windows, not in memory.
// Then the client reads it all, intact, with its trailers.
func TestGRPCUpstreamResponseFlowControl(t *testing.T) {
	t.Parallel()
	const total = 64 << 20
	// What may be in flight while the client reads nothing: the proxy's
	// receive window on the upstream stream (512 KiB today) plus the
	// client's window on its stream from the proxy (4 MiB for net/http's
	// client) plus copy buffers and frames in transit (well under 1 MiB):
	// about 5 MiB. 24 MiB leaves room for a client that picks larger
	// windows, and still fails a proxy that reads the response into memory
	// (it would take all 64 MiB).
	const bound = 24 << 20
	stalled := make(chan int64, 1)
	ended := make(chan error, 1) // nil: all sent
	sum := make(chan []byte, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		h := sha256.New()
		src := rand.NewChaCha8([32]byte{'6', '4'})
		buf := make([]byte, 64<<10)
		// Blocked on a window for half a second with no WINDOW_UPDATE:
		// the proxy holds all it will hold. A shorter pause (a window
		// update that comes late) would only report a smaller amount.
		stall := func() {
			select {
			case stalled <- s.Sent():
			default:
			}
		}
		for sent := 0; sent < total; sent += len(buf) {
			src.Read(buf)
			h.Write(buf)
			if err := s.writeDataStall(buf, false, 500*time.Millisecond, stall); err != nil {
				ended <- fmt.Errorf("after %d bytes: %w", s.Sent(), err)
				return
			}
		}
		ended <- nil
		sum <- h.Sum(nil)
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)

	ctx := testCtx(t)
	res := startCall(t, ctx, tp, "/pkg.Svc/Download", grpcMsg(nil))
	select {
	case n := <-stalled:
		t.Logf("the upstream blocked on a window after sending %.1f MiB", float64(n)/(1<<20))
		if n > bound {
			t.Errorf("the upstream sent %d bytes before blocking, want at most %d while the client reads nothing", n, bound)
		}
	case err := <-ended:
		if err == nil {
			t.Fatalf("the upstream sent all %d bytes while the client read nothing: the response is buffered without bound", total)
		}
		t.Fatalf("the upstream's stream ended %v", err)
	case <-time.After(time.Minute):
		t.Fatal("the upstream neither blocked on a window nor finished within a minute")
	}
	h := sha256.New()
	n, err := io.Copy(h, res.Body)
	if err != nil {
		t.Fatalf("reading the response after %d bytes: %v", n, err)
	}
	if n != total {
		t.Errorf("client received %d bytes, want %d", n, total)
	}
	if want := recv(t, sum, "the upstream's hash"); !bytes.Equal(h.Sum(nil), want) {
		t.Error("SHA-256 of the bytes received differs from the bytes the upstream sent")
	}
	if got := res.Trailer.Get("Grpc-Status"); got != "0" {
		t.Errorf("trailer grpc-status = %q, want \"0\"", got)
	}
}

// TestGRPCUpstreamMaxConcurrentStreams: the upstream allows one stream at a
// time and refuses any other with REFUSED_STREAM. Eight concurrent calls on
// one client connection all complete with their own answers (whether the
// proxy queues them or opens more connections), and the proxy keeps to the
// limit once it knows it. Streams a new connection opened before the
// upstream's SETTINGS reached the proxy are refused, and must be sent again
// (forward.go, replayBody: without it net/http's transport fails them).
func TestGRPCUpstreamMaxConcurrentStreams(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 1}}}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		// The answer in several frames, so that each stream stays open
		// long enough for a proxy that ignores the limit to open another.
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		for len(body) > 0 {
			n := min(len(body), 4<<10)
			if s.writeData(body[:n], false) != nil {
				return
			}
			body = body[n:]
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)

	// One call first, on which the proxy's connection learns the
	// upstream's SETTINGS.
	warm := grpcMsg([]byte("warm-up"))
	checkOK(t, "warm-up call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", warm), warm)
	before := len(p.Conns())

	var wg sync.WaitGroup
	results := make([]grpcResult, 8)
	bodies := make([][]byte, len(results))
	for i := range results {
		bodies[i] = grpcMsg(randomBytes(32<<10, byte(i)))
		wg.Go(func() { results[i] = callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", bodies[i]) })
	}
	wg.Wait()
	for i, r := range results {
		checkOK(t, fmt.Sprintf("call %d", i), r, bodies[i])
	}
	for _, c := range p.Conns() {
		// Streams opened on a new connection before the proxy has read
		// its SETTINGS may be refused (the limit is unknown until then,
		// RFC 9113 §6.5.2); the calls must still complete (§8.7: a
		// refused stream was not processed and may be sent again). Once
		// the proxy has acknowledged the SETTINGS it knows the limit: at
		// most one stream it chose before, whose HEADERS follow the ACK
		// on the wire, may still be refused.
		st := c.Stats()
		if len(st.LateRefused) > 1 {
			t.Errorf("connection %d: streams %v refused after the proxy acknowledged SETTINGS_MAX_CONCURRENT_STREAMS = 1", c.N, st.LateRefused)
		}
		if len(st.Refused) > 0 {
			t.Logf("connection %d: streams %v refused (%v after the SETTINGS ACK)", c.N, st.Refused, st.LateRefused)
		}
	}
	t.Logf("upstream connections: %d before the concurrent calls, %d after", before, len(p.Conns()))
}

// TestGRPCUpstreamManyConcurrentCalls: 60 concurrent calls with 200 KB
// bodies echoed back in pieces, Cells allowing 5 streams per connection and
// 8 KB stream windows, a third of the calls cancelled by their clients
// half-way. The others complete intact, and afterwards no goroutine of a
// call is left in the proxy: the stream limit, the windows, the dials and
// the resets all at once, as a busy Cells Sync makes them. Not parallel:
// the goroutine count would include other tests' calls.
func TestGRPCUpstreamManyConcurrentCalls(t *testing.T) {
	p := newH2Peer(t, h2PeerConfig{Settings: []http2.Setting{
		{ID: http2.SettingMaxConcurrentStreams, Val: 5},
		{ID: http2.SettingInitialWindowSize, Val: 8 << 10},
	}}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		for len(body) > 0 {
			n := min(len(body), 7000)
			if s.writeData(body[:n], false) != nil {
				return
			}
			body = body[n:]
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	var wg sync.WaitGroup
	errs := make(chan string, 100)
	for i := range 60 {
		wg.Go(func() {
			want := grpcMsg(randomBytes(200<<10, byte(i)))
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			if i%3 == 0 {
				go func() { time.Sleep(time.Duration(i) * time.Millisecond); cancel() }()
				callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Echo", want)
				return
			}
			r := callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Echo", want)
			if r.Err != nil || r.Trailer.Get("Grpc-Status") != "0" || !bytes.Equal(r.Body, want) {
				errs <- fmt.Sprintf("call %d: err %v status %q msg %q body %d/%d", i, r.Err, r.Trailer.Get("Grpc-Status"), r.Trailer.Get("Grpc-Message"), len(r.Body), len(want))
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	t.Logf("upstream connections: %d", p.Accepted.Load())
	tp.H2.CloseIdleConnections()
	// A generous bound: they end within milliseconds.
	var n int
	waitFor(t, 10*time.Second, func() bool {
		buf := make([]byte, 1<<20)
		st := string(buf[:runtime.Stack(buf, true)])
		n = strings.Count(st, "(*grpcStream).writeBody") + strings.Count(st, "(*grpcUpstream).do")
		return n == 0
	}, func() string {
		return fmt.Sprintf("%d proxy stream goroutines still running 10 s after all calls ended", n)
	})
}

// TestGRPCUpstreamMaxStreamsZero: Cells announces
// SETTINGS_MAX_CONCURRENT_STREAMS = 0, which RFC 9113 §6.5.2 allows ("prevents
// the creation of new streams"). A call opens one connection, not one after
// another: it waits there for a SETTINGS that lets it in, and fails with
// UNAVAILABLE when none comes; a client that gives up first ends the wait,
// and the connection that took nothing is closed. Were the proxy to dial
// again whenever no connection takes the call, a single call would open
// thousands of connections to Cells, and go on after its client left.
func TestGRPCUpstreamMaxStreamsZero(t *testing.T) {
	t.Parallel()
	zero := h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 0}}}
	want := grpcMsg([]byte("x"))
	// oneConnClosed checks that the call dialled one connection to Cells,
	// and that the proxy closed it, having taken no stream, once the call
	// ended.
	oneConnClosed := func(t *testing.T, p *h2Peer) {
		t.Helper()
		waitPeerClosed(t, p.Conns()[0], "the connection that took no stream")
		if n := p.Accepted.Load(); n != 1 {
			t.Errorf("the upstream accepted %d connections for one call, want 1", n)
		}
	}

	t.Run("unavailable", func(t *testing.T) {
		t.Parallel()
		p := newH2Peer(t, zero, echo)
		tp := startPeerProxy(t, p)
		tp.fwd.grpcUp.noStreamsWait = 200 * time.Millisecond
		r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want)
		if r.Err != nil || r.Status != http.StatusOK || r.Header.Get("Grpc-Status") != "14" {
			t.Errorf("call: err %v, status %d, grpc-status %q (%q), want 200 and grpc-status 14 (UNAVAILABLE)",
				r.Err, r.Status, r.Header.Get("Grpc-Status"), r.Header.Get("Grpc-Message"))
		}
		oneConnClosed(t, p)
	})

	t.Run("concurrent calls", func(t *testing.T) {
		// They wait on the one connection instead of dialling one each.
		t.Parallel()
		p := newH2Peer(t, zero, echo)
		tp := startPeerProxy(t, p)
		tp.fwd.grpcUp.noStreamsWait = 500 * time.Millisecond
		const calls = 20
		var wg sync.WaitGroup
		for range calls {
			wg.Go(func() {
				if r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want); r.Header.Get("Grpc-Status") != "14" {
					t.Errorf("call: err %v, status %d, grpc-status %q, want grpc-status 14", r.Err, r.Status, r.Header.Get("Grpc-Status"))
				}
			})
		}
		wg.Wait()
		// One, or two should a call come after the first was closed.
		if n := p.Accepted.Load(); n > 2 {
			t.Errorf("the upstream accepted %d connections for %d calls while it allows no stream", n, calls)
		}
	})

	t.Run("client gives up", func(t *testing.T) {
		t.Parallel()
		p := newH2Peer(t, zero, echo)
		tp := startPeerProxy(t, p)
		ctx, cancel := context.WithTimeout(testCtx(t), 500*time.Millisecond)
		defer cancel()
		if r := callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Echo", want); r.Err == nil {
			t.Errorf("call: status %d, grpc-status %q, want the client's deadline to end it", r.Status, r.Header.Get("Grpc-Status"))
		}
		// Closed when the proxy's call ends: whatever it dialled, it
		// dialled by then.
		oneConnClosed(t, p)
	})

	t.Run("limit raised", func(t *testing.T) {
		t.Parallel()
		p := newH2Peer(t, zero, echo)
		tp := startPeerProxy(t, p)
		go func() {
			// New SETTINGS once the proxy has acknowledged the first,
			// so that they follow them on the wire.
			var c *h2PeerConn
			for c == nil {
				if conns := p.Conns(); len(conns) > 0 {
					c = conns[0]
					break
				}
				select {
				case <-p.done:
					return
				case <-time.After(10 * time.Millisecond):
				}
			}
			for {
				c.mu.Lock()
				acked, closed, changed := c.acked, c.closed, c.changed
				c.mu.Unlock()
				if closed {
					return
				}
				if acked {
					break
				}
				select {
				case <-changed:
				case <-p.done:
					return
				}
			}
			c.write(func(fr *http2.Framer) error {
				return fr.WriteSettings(http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 100})
			})
		}()
		checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
		if n := p.Accepted.Load(); n != 1 {
			t.Errorf("the upstream accepted %d connections, want 1 (the call waits on the first for its limit to rise)", n)
		}
	})
}

// waitNoneTakes waits until no connection of u takes a new call (each gone
// away, failed or removed).
func waitNoneTakes(t *testing.T, u *grpcUpstream) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool { return !slices.ContainsFunc(grpcConns(u), (*grpcConn).canTake) }, func() string {
		return "a connection to Cells still takes calls 10 s after its GOAWAY"
	})
}

// waitPeerClosed waits up to 10 s for the proxy to close c, what.
func waitPeerClosed(t *testing.T, c *h2PeerConn, what string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		c.mu.Lock()
		closed, changed := c.closed, c.changed
		c.mu.Unlock()
		if closed {
			return
		}
		select {
		case <-changed:
		case <-timeout:
			t.Fatalf("%s is still open 10 s later", what)
		}
	}
}

// TestGRPCUpstreamFraming: the same answer framed in the ways RFC 9113
// allows: a header block split over HEADERS and CONTINUATION frames, padded
// DATA frames, a body in one-byte DATA frames, trailers split over HEADERS
// and CONTINUATION. The client gets the exact headers, body and trailers.
func TestGRPCUpstreamFraming(t *testing.T) {
	t.Parallel()
	type framing struct {
		name         string
		headerParts  int // frames of the response header block
		trailerParts int // frames of the trailer block
		pad          int // padding bytes per DATA frame; -1: not padded
		chunk        int // bytes per DATA frame; 0: as large as allowed
	}
	cases := []framing{
		{"plain", 1, 1, -1, 0},
		{"split-headers", 4, 1, -1, 0},
		{"padded-data", 1, 1, 200, 50},
		{"zero-padding", 1, 1, 0, 50},
		{"one-byte-data", 1, 1, -1, 1},
		{"split-trailers", 1, 3, -1, 0},
		{"all", 5, 4, 3, 1},
	}
	body := grpcMsg([]byte(strings.Repeat("framing test payload; ", 20)))
	long := strings.Repeat("h", 300) // makes each CONTINUATION carry real bytes
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		i := slices.IndexFunc(cases, func(f framing) bool { return s.Get(":path") == "/pkg.Svc/"+f.name })
		if i < 0 {
			s.reset(http2.ErrCodeInternal)
			return
		}
		f := cases[i]
		if s.writeHeaders(false, f.headerParts, ":status", "200", "content-type", "application/grpc",
			"x-cells-header", "header value", "x-long-header", long) != nil {
			return
		}
		for b := body; len(b) > 0; {
			n := len(b)
			if f.chunk > 0 {
				n = min(n, f.chunk)
			}
			var err error
			if f.pad >= 0 {
				err = s.writePadded(b[:n], f.pad, false)
			} else {
				err = s.writeData(b[:n], false)
			}
			if err != nil {
				return
			}
			b = b[n:]
		}
		s.writeHeaders(true, f.trailerParts, "grpc-status", "0", "grpc-message", "framing ok",
			"x-cells-trailer", "trailer value", "x-long-trailer", long)
	})
	tp := startPeerProxy(t, p)

	for _, f := range cases {
		t.Run(f.name, func(t *testing.T) {
			r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/"+f.name, grpcMsg(nil))
			checkOK(t, f.name, r, body)
			for _, c := range []struct {
				what string
				h    http.Header
				key  string
				want string
			}{
				{"header", r.Header, "Content-Type", "application/grpc"},
				{"header", r.Header, "X-Cells-Header", "header value"},
				{"header", r.Header, "X-Long-Header", long},
				{"trailer", r.Trailer, "Grpc-Message", "framing ok"},
				{"trailer", r.Trailer, "X-Cells-Trailer", "trailer value"},
				{"trailer", r.Trailer, "X-Long-Trailer", long},
			} {
				if got := c.h.Values(c.key); !slices.Equal(got, []string{c.want}) {
					t.Errorf("%s %s = %s, want [%s]", c.what, c.key, short(got...), short(c.want))
				}
			}
		})
	}
}

// TestGRPCUpstreamPaddingOnlyData: the upstream sends 5 MiB of DATA frames
// that carry padding and nothing else (a server may pad to hide sizes), then
// the message and the trailers. Padding takes flow-control window (RFC 9113
// §6.9.1) but is never read by the client, so the proxy must give it back
// as it arrives: given back only with the next bytes the client reads, as
// it was, it used up the stream window before any byte came to be
// read, and the call hung.
func TestGRPCUpstreamPaddingOnlyData(t *testing.T) {
	t.Parallel()
	want := grpcMsg([]byte("after the padding"))
	p := newH2Peer(t, h2PeerConfig{ConnWindow: 1 << 30}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		for sent := 0; sent < 5<<20; sent += 256 {
			if s.writePadded(nil, 255, false) != nil {
				return
			}
		}
		if s.writeData(want, false) != nil {
			return
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	// A generous bound for an answer that takes a second at most, so that
	// a stalled call fails the test rather than hanging it.
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	checkOK(t, "call", callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Padded", grpcMsg(nil)), want)
}

// TestGRPCUpstreamTrailersOnly: a call answered with a single HEADERS frame
// with END_STREAM (the trailers-only form of a gRPC error) reaches a
// grpc-go client as its status: code and percent-decoded message.
func TestGRPCUpstreamTrailersOnly(t *testing.T) {
	t.Parallel()
	paths := make(chan string, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		paths <- s.Get(":path")
		s.writeHeaders(true, 1, ":status", "200", "content-type", "application/grpc",
			"grpc-status", "7", "grpc-message", "no access to caf%C3%A9")
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))

	_, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{})
	st := status.Convert(err)
	if got, want := st.Code(), codes.PermissionDenied; got != want {
		t.Errorf("status = %v, want %v", err, want)
	}
	if got, want := st.Message(), "no access to café"; got != want {
		t.Errorf("message = %q, want %q", got, want)
	}
	if got, want := recv(t, paths, "the call's path"), "/grpc.testing.TestService/EmptyCall"; got != want {
		t.Errorf("upstream :path = %q, want %q", got, want)
	}
}

// TestGRPCUpstreamResetMidResponse: the upstream resets one stream
// (INTERNAL_ERROR) after part of its answer, while a second call on the
// same upstream connection is in progress. The first call ends at once
// with an error status, not a hang and not grpc-status 0; the second
// completes.
func TestGRPCUpstreamResetMidResponse(t *testing.T) {
	t.Parallel()
	brokenStarted := make(chan *h2Stream, 1)
	slowSeen := make(chan *h2Stream, 1) // for the test
	slowStarted := make(chan struct{})  // for the first call's handler
	resetDone := make(chan struct{})
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		switch s.Get(":path") {
		case "/pkg.Svc/Broken":
			if _, err := s.readBody(); err != nil {
				return
			}
			if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil ||
				s.writeData(grpcMsg([]byte("first part")), false) != nil {
				return
			}
			brokenStarted <- s
			select {
			case <-slowStarted:
			case <-s.Done():
				return
			}
			s.reset(http2.ErrCodeInternal)
			close(resetDone)
		case "/pkg.Svc/Slow":
			slowSeen <- s
			close(slowStarted)
			body, err := s.readBody()
			if err != nil {
				return
			}
			select {
			case <-resetDone:
			case <-s.Done():
				return
			}
			s.respond(body)
		}
	})
	tp := startPeerProxy(t, p)

	first := make(chan grpcResult, 1)
	go func() { first <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Broken", grpcMsg(nil)) }()
	broken := recv(t, brokenStarted, "the first call at the upstream")
	// Its handler resets it once the second call has reached the upstream.
	want2 := grpcMsg([]byte("second call"))
	second := make(chan grpcResult, 1)
	go func() { second <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Slow", want2) }()

	// A hang would end at testCtx's minute as a read error, not as the
	// grpc-status checked here.
	r := recv(t, first, "the first call to end")
	if r.Err != nil {
		t.Fatalf("first call: %v", r.Err)
	}
	if got, want := r.Body, grpcMsg([]byte("first part")); !bytes.Equal(got, want) {
		t.Errorf("first call: body = %q, want the part sent before the reset, %q", got, want)
	}
	// Pinned: the proxy ends a body Cells reset mid-way with the status
	// grpc-go's client derives from the reset, INTERNAL for INTERNAL_ERROR,
	// in the trailers (forward.go, grpcBroken); not UNAVAILABLE, which
	// would have the client send again a call Cells had started on.
	if got, want := r.Trailer.Get("Grpc-Status"), "13"; got != want {
		t.Errorf("first call: trailer grpc-status = %q (message %q), want %q", got, r.Trailer.Get("Grpc-Message"), want)
	}
	if got, want := r.Trailer.Get("Grpc-Message"), "cells-proxy: upstream reset the stream (INTERNAL_ERROR)"; got != want {
		t.Errorf("first call: grpc-message = %q, want %q", got, want)
	}

	checkOK(t, "second call", recv(t, second, "the second call to end"), want2)
	if slow := recv(t, slowSeen, "the second call at the upstream"); slow.c != broken.c {
		t.Errorf("the calls went to upstream connections %d and %d, want one", broken.c.N, slow.c.N)
	}
}

// TestGRPCUpstreamGoAway: the upstream answers one call per connection,
// then sends GOAWAY (NO_ERROR, last stream ID the one it answered) and
// closes the connection, as a server going away does. Each next call, made
// as soon as the previous one ends, succeeds on a new connection.
func TestGRPCUpstreamGoAway(t *testing.T) {
	t.Parallel()
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if s.respond(body) != nil {
			return
		}
		s.c.goAway(s.ID, http2.ErrCodeNo)
		s.c.close()
	})
	tp := startPeerProxy(t, p)

	const calls = 3
	for i := range calls {
		want := grpcMsg([]byte(fmt.Sprintf("call %d", i)))
		checkOK(t, fmt.Sprintf("call %d", i), callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
		// The answer can reach the client before the GOAWAY that follows
		// it reaches the proxy: the next call must find the connection
		// gone away, not race it.
		waitNoneTakes(t, tp.fwd.grpcUp)
	}
	if got, want := p.Accepted.Load(), int32(calls); got != want {
		t.Errorf("upstream accepted %d connections, want %d (one per call)", got, want)
	}
}

// TestGRPCUpstreamGoAwayBetweenCalls: with two calls open on a connection,
// the upstream sends GOAWAY whose last stream ID is the first call's. The
// first call, which Cells goes on with, completes on that connection; the
// second, which Cells will not process (RFC 9113 §6.8), is sent again on a
// new one. Failing the first would lose a call Cells may have acted on;
// failing the second would lose one that a retry makes good.
func TestGRPCUpstreamGoAwayBetweenCalls(t *testing.T) {
	t.Parallel()
	first := make(chan *h2Stream, 1)
	release := make(chan struct{})
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		if s.c.N == 1 && s.Get(":path") == "/pkg.Svc/First" {
			s.holdEcho(first, release, body)
			return
		}
		if s.c.N == 1 {
			// The second call on the first connection: above the GOAWAY.
			s.c.goAway(s.ID-2, http2.ErrCodeNo)
			close(release)
			return
		}
		s.respond(body)
	})
	tp := startPeerProxy(t, p)
	w1, w2 := grpcMsg([]byte("first")), grpcMsg([]byte("second"))
	r1 := make(chan grpcResult, 1)
	go func() { r1 <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/First", w1) }()
	recv(t, first, "the first call upstream")
	r2 := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Second", w2)
	checkOK(t, "second call (above GOAWAY)", r2, w2)
	checkOK(t, "first call (below GOAWAY)", recv(t, r1, "first call"), w1)
}

// TestGRPCUpstreamConnectionDrop: the upstream's connection drops (TCP
// reset) in the middle of a server stream, after two messages. The
// grpc-go client gets both messages, then an error status at once, not a
// hang; the next call succeeds on a new connection.
func TestGRPCUpstreamConnectionDrop(t *testing.T) {
	t.Parallel()
	clientGot := make(chan struct{})
	msg := func(s string) []byte {
		b, err := proto.Marshal(&testgrpc.StreamingOutputCallResponse{Payload: &testgrpc.Payload{Body: []byte(s)}})
		if err != nil {
			panic(err)
		}
		return grpcMsg(b)
	}
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		switch s.Get(":path") {
		case "/grpc.testing.TestService/StreamingOutputCall":
			if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil ||
				s.writeData(append(msg("one"), msg("two")...), false) != nil {
				return
			}
			select {
			case <-clientGot:
			case <-s.Done():
				return
			}
			s.c.abort()
		default:
			s.respond(grpcMsg(nil))
		}
	})
	tp := startPeerProxy(t, p)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))

	// The proxy sees the connection drop at once: 20 s is far more than
	// it needs, and far less than a hang.
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	stream := streamingRecv(t, ctx, tc, "one", "two")
	close(clientGot)
	_, err := stream.Recv()
	// Pinned: the proxy ends a response whose upstream body broke with
	// UNAVAILABLE in the trailers (forward.go, grpcBroken): the status that
	// tells a client such as Cells Sync to call again.
	if got, want := status.Code(err), codes.Unavailable; got != want {
		t.Errorf("Recv after the drop = %v, want %v", err, want)
	}
	if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}); err != nil {
		t.Errorf("the call after the drop: %v", err)
	}
	if got, want := p.Accepted.Load(), int32(2); got != want {
		t.Errorf("upstream accepted %d connections, want %d", got, want)
	}
}

// TestGRPCUpstreamClientCancel: a client that gives up a call while the
// upstream is still sending (closes the response body, or cancels the
// request) makes the proxy reset the upstream stream with CANCEL.
func TestGRPCUpstreamClientCancel(t *testing.T) {
	t.Parallel()
	streams := make(chan *h2Stream, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		streams <- s
		// Messages until the stream or the connection ends.
		m := grpcMsg(randomBytes(16<<10, 9))
		for s.writeData(m, false) == nil {
		}
	})
	tp := startPeerProxy(t, p)

	for _, how := range []string{"close-body", "cancel-context"} {
		t.Run(how, func(t *testing.T) {
			ctx, cancel := context.WithCancel(testCtx(t))
			defer cancel()
			res := startCall(t, ctx, tp, "/pkg.Svc/Watch", grpcMsg(nil))
			if _, err := io.ReadFull(res.Body, make([]byte, 1<<10)); err != nil {
				t.Fatalf("reading the first bytes: %v", err)
			}
			s := recv(t, streams, "the call at the upstream")
			if how == "close-body" {
				res.Body.Close()
			} else {
				cancel()
			}
			code, ok := s.resetCode()
			if !ok {
				t.Fatal("the upstream got no RST_STREAM within 10 s of the client giving up")
			}
			if code != http2.ErrCodeCancel {
				t.Errorf("upstream RST_STREAM %v, want %v", code, http2.ErrCodeCancel)
			}
		})
	}
}

// TestGRPCUpstreamStreamWindowOverflow: Cells takes a stream's send window
// past 2^31-1 with a WINDOW_UPDATE. The proxy resets that stream with
// FLOW_CONTROL_ERROR (RFC 9113 §6.9.1), the client's call ends with an
// error at once rather than waiting on a window that cannot be, and the
// connection serves the next call: a stream error must not become a
// connection error.
func TestGRPCUpstreamStreamWindowOverflow(t *testing.T) {
	t.Parallel()
	streams := make(chan *h2Stream, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if s.Get(":path") == "/pkg.Svc/Overflow" {
			if _, err := s.read(); err != nil {
				return
			}
			if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
				return
			}
			streams <- s
			s.c.write(func(fr *http2.Framer) error { return fr.WriteWindowUpdate(s.ID, 1<<31-1) })
			<-s.Done()
			return
		}
		body, err := s.readBody()
		if err != nil {
			return
		}
		s.respond(body)
	})
	tp := startPeerProxy(t, p)
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	// A request body still open, so that the stream is not half-closed.
	pr, pw := io.Pipe()
	defer pw.Close()
	req, _ := http.NewRequestWithContext(ctx, "POST", tp.URL+"/pkg.Svc/Overflow", pr)
	req.Header.Set("Content-Type", "application/grpc")
	go pw.Write(grpcMsg([]byte("x")))
	res, err := tp.H2.Do(req)
	if err == nil {
		b, rerr := io.ReadAll(res.Body)
		res.Body.Close()
		t.Logf("overflow call: status %d, %d body bytes, read err %v, trailer %v", res.StatusCode, len(b), rerr, res.Trailer)
		if rerr == nil && res.Trailer.Get("Grpc-Status") == "" {
			t.Errorf("overflow call ended without an error status")
		}
	} else {
		t.Logf("overflow call: %v", err)
	}
	s := recv(t, streams, "the stream upstream")
	if code, ok := s.resetCode(); !ok || code != http2.ErrCodeFlowControl {
		t.Errorf("the overflowed stream: reset %v (%v), want RST_STREAM FLOW_CONTROL_ERROR", ok, code)
	}
	want := grpcMsg([]byte("next"))
	checkOK(t, "next call", callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
}

// TestGRPCUpstreamWindowLoweredBeforeEnd: Cells lowers
// SETTINGS_INITIAL_WINDOW_SIZE while a call's request body is under way, so
// that the stream's send window goes negative (RFC 9113 §6.9.2 allows it),
// and then the client ends its body. The END_STREAM, an empty DATA frame,
// takes no window and must leave at once. The proxy looped on it instead,
// holding the connection's lock: the call, every other call on the
// connection and the proxy's shutdown hung, a core spinning.
func TestGRPCUpstreamWindowLoweredBeforeEnd(t *testing.T) {
	t.Parallel()
	const sent = 30000
	lowered := make(chan struct{})
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		// The body's first bytes, read but not granted back: the
		// stream's window is 65,535 - 30,000.
		if s.wait(func() bool {
			var n int64
			for _, ch := range s.queue {
				n += ch.flow
			}
			return n >= sent
		}, 0, nil) != nil {
			return
		}
		s.c.write(func(fr *http2.Framer) error {
			return fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1000})
		})
		// Answered after the SETTINGS: the proxy applied them.
		s.c.ping(t, [8]byte{1})
		close(lowered)
		// Nothing granted until END_STREAM came with a window of
		// 1,000 - 30,000.
		if s.wait(func() bool { return s.remoteEnd }, 0, nil) != nil {
			return
		}
		body, err := s.readBody()
		if err != nil {
			return
		}
		s.respond(grpcMsg([]byte(strconv.Itoa(len(body)))))
	})
	tp := startPeerProxy(t, p)
	ctx, cancel := context.WithTimeout(testCtx(t), 10*time.Second)
	defer cancel()
	pr, pw := io.Pipe()
	go func() {
		pw.Write(make([]byte, sent))
		select {
		case <-lowered:
		case <-ctx.Done():
		}
		pw.Close()
	}()
	req, _ := http.NewRequestWithContext(ctx, "POST", tp.URL+"/pkg.Svc/Upload", pr)
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	res, err := tp.H2.Do(req)
	if err != nil {
		t.Fatalf("the call hung or failed: %v", err)
	}
	r := grpcResult{Status: res.StatusCode, Header: res.Header}
	r.Body, r.Err = io.ReadAll(res.Body)
	res.Body.Close()
	r.Trailer = res.Trailer
	checkOK(t, "upload", r, grpcMsg([]byte(strconv.Itoa(sent))))
}

// TestGRPCConnectRefused: CONNECT is answered 405 by the proxy on every
// port, as SECURITY.md promises ("No open proxy"), also when it says it
// is gRPC (content-type application/grpc on the public port) or arrives on
// the dedicated gRPC port, where every request is taken for a gRPC call.
// It went to Cells' gRPC port, as a request no HTTP/2 server should take
// (CONNECT with a :scheme and a :path, RFC 9113 §8.5).
func TestGRPCConnectRefused(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		calls.Add(1)
		s.respond(nil)
	})
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: p.Addr}
	cfg.GRPCAddr = "127.0.0.1:0"
	tp := startProxy(t, cfg)
	for _, c := range []struct {
		name, addr string
	}{
		{"main-port", tp.Addr().String()},
		{"dedicated-port", tp.GRPCAddr().String()},
	} {
		t.Run(c.name, func(t *testing.T) {
			fc := dialH2At(t, tp, c.addr)
			if err := fc.request(1, ":method", "CONNECT", ":authority", "127.0.0.1:1", "content-type", "application/grpc"); err != nil {
				t.Fatal(err)
			}
			ev := fc.wait(t, "the answer to CONNECT", func(ev frameEvent) bool { return ev.StreamID == 1 })
			if got, want := ev.String(), ":status 405"; got != want {
				t.Errorf("CONNECT: got %s, want %s", got, want)
			}
		})
	}
	if n := calls.Load(); n != 0 {
		t.Errorf("the gRPC upstream got %d CONNECT requests, want none", n)
	}
}

// TestGRPCUpstreamPing: a PING from the upstream gets a PING ACK with the
// same eight bytes, on an idle connection and during a call.
func TestGRPCUpstreamPing(t *testing.T) {
	t.Parallel()
	inCall := make(chan *h2Stream, 1)
	release := make(chan struct{})
	// The call to /pkg.Svc/Ping stays open until the PING is answered.
	p := newHoldingPeer(t, "/pkg.Svc/Ping", inCall, release)
	tp := startPeerProxy(t, p)

	want := grpcMsg([]byte("ping"))
	checkOK(t, "first call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	c := p.Conns()[0]
	for _, data := range [][8]byte{{'c', 'e', 'l', 'l', 's', 1, 2, 3}, {0xff, 0, 0xfe, 1, 0xfd, 2, 0xfc, 3}} {
		if got := c.ping(t, data); got != data {
			t.Errorf("idle connection: PING ACK carries %x, want %x", got, data)
		}
	}

	done := make(chan grpcResult, 1)
	go func() { done <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Ping", want) }()
	s := recv(t, inCall, "the call at the upstream")
	data := [8]byte{'i', 'n', '-', 'c', 'a', 'l', 'l', '!'}
	if got := s.c.ping(t, data); got != data {
		t.Errorf("during a call: PING ACK carries %x, want %x", got, data)
	}
	close(release)
	checkOK(t, "call during the PING", recv(t, done, "the call to end"), want)
}

// TestGRPCUpstreamMaxFrameSize: the upstream's SETTINGS_MAX_FRAME_SIZE is
// 16,384 and its windows are 1 MiB, so that only the frame size limits
// DATA frames: a 100 KiB message arrives intact in frames no larger.
func TestGRPCUpstreamMaxFrameSize(t *testing.T) {
	t.Parallel()
	const maxFrame = 16384
	got := make(chan [32]byte, 1)
	p := newH2Peer(t, h2PeerConfig{
		Settings: []http2.Setting{
			{ID: http2.SettingMaxFrameSize, Val: maxFrame},
			{ID: http2.SettingInitialWindowSize, Val: 1 << 20},
		},
		ConnWindow: 1 << 20,
	}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		got <- sha256.Sum256(body)
		s.respond(grpcMsg(nil))
	})
	tp := startPeerProxy(t, p)

	body := grpcMsg(randomBytes(100<<10, 11))
	checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Upload", body), grpcMsg(nil))
	if sum := recv(t, got, "the upstream's hash of the body"); sum != sha256.Sum256(body) {
		t.Error("the body the upstream received differs from the one sent")
	}
	for _, c := range p.Conns() {
		st := c.Stats()
		if st.MaxDataFrame > maxFrame {
			t.Errorf("connection %d: a DATA frame of %d bytes, want at most %d (SETTINGS_MAX_FRAME_SIZE)", c.N, st.MaxDataFrame, maxFrame)
		}
		t.Logf("connection %d: %d DATA frames, the largest %d bytes", c.N, st.DataFrames, st.MaxDataFrame)
	}
}

// TestGRPCUpstreamBadResponseHeaders: a response whose header block is
// malformed (RFC 9113 §8.3: a field name with upper case, a pseudo-header
// other than :status, no :status) is an upstream failure: the client gets
// a gRPC error status from the proxy, and the next call works.
func TestGRPCUpstreamBadResponseHeaders(t *testing.T) {
	t.Parallel()
	type badHead struct {
		name   string
		fields []string
	}
	cases := []badHead{
		{"uppercase-name", []string{":status", "200", "content-type", "application/grpc", "X-Bad", "1"}},
		{"request-pseudo-header", []string{":status", "200", ":path", "/pkg.Svc/Bad", "content-type", "application/grpc"}},
		{"unknown-pseudo-header", []string{":status", "200", ":cells", "1", "content-type", "application/grpc"}},
		{"no-status", []string{"content-type", "application/grpc"}},
		{"pseudo-header-after-field", []string{"content-type", "application/grpc", ":status", "200"}},
	}
	streams := make(chan *h2Stream, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		i := slices.IndexFunc(cases, func(c badHead) bool { return s.Get(":path") == "/pkg.Svc/"+c.name })
		if i < 0 {
			s.respond(body)
			return
		}
		streams <- s
		// A whole answer behind the bad head; the proxy may reset the
		// stream at any point.
		if s.writeHeaders(false, 1, cases[i].fields...) == nil && s.writeData(grpcMsg([]byte("bad")), false) == nil {
			s.writeHeaders(true, 1, "grpc-status", "0")
		}
	})
	tp := startPeerProxy(t, p)

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/"+c.name, grpcMsg(nil))
			s := recv(t, streams, "the call at the upstream")
			if r.Err != nil {
				t.Fatalf("call: %v", r.Err)
			}
			// Pinned: the proxy's own trailers-only answer for an
			// upstream whose response head is malformed (forward.go,
			// fail: INTERNAL, as grpc-go's client gives connected to
			// Cells; UNAVAILABLE until 2026-11-29).
			const msg = "cells-proxy: HTTP/2 error from upstream on the call (PROTOCOL_ERROR): malformed response header"
			if r.Status != http.StatusOK || r.Header.Get("Grpc-Status") != "13" ||
				r.Header.Get("Grpc-Message") != grpcEscape(msg) || len(r.Body) != 0 {
				t.Errorf("client got %d, grpc-status %q, grpc-message %q, %d body bytes; want 200, \"13\", %q and none",
					r.Status, r.Header.Get("Grpc-Status"), r.Header.Get("Grpc-Message"), len(r.Body), grpcEscape(msg))
			}
			// RFC 9113 §8.1.1: a malformed response is a stream error
			// of type PROTOCOL_ERROR.
			if code, ok := s.resetCode(); !ok || code != http2.ErrCodeProtocol {
				t.Errorf("upstream stream reset %v (reset: %v), want RST_STREAM %v", code, ok, http2.ErrCodeProtocol)
			}
			want := grpcMsg([]byte("after " + c.name))
			checkOK(t, "next call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
		})
	}
}

// TestGRPCUpstreamRequestHeaders: the request the upstream receives, field
// by field, pinned: the pseudo-headers (:method POST, :scheme http for an
// h2c upstream, :authority as the client sent it, :path exact, query
// included) first, te: trailers, the client's metadata untouched,
// forwarding fields set by the proxy (a client's forwarded, x-forwarded-*
// and x-real-ip replaced), no connection-specific or other hop-by-hop
// field, every name in lower case, grpc-timeout as the client sent it.
func TestGRPCUpstreamRequestHeaders(t *testing.T) {
	t.Parallel()
	headers := make(chan []hpack.HeaderField, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		headers <- s.Header
		echo(s)
	})
	tp := startPeerProxy(t, p)
	// A call first, so that the one pinned goes at once on an open
	// connection: one that waited for the dial carries the time left as
	// its grpc-timeout (TestGRPCUpstreamWaitTimeLeft).
	warm := grpcMsg([]byte("warm"))
	checkOK(t, "first call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", warm), warm)
	recv(t, headers, "the first call at the upstream")

	const authority = "cells.example.com:443"
	body := grpcMsg([]byte("headers"))
	r := callGRPC(testCtx(t), tp.H2, tp.URL+"/tree.NodeProvider/ListNodes?a=1;b=%zz", body,
		"host", authority,
		"User-Agent", "cells-sync/4.4 grpc-go/1.85.0",
		"X-Pydio-Bearer", "eyJhbGciOi.secret.token",
		"X-Forwarded-For", "203.0.113.9",
		"X-Forwarded-Host", "evil.example",
		"X-Forwarded-Proto", "http",
		"X-Real-Ip", "203.0.113.10",
		"Forwarded", "for=203.0.113.11",
		"Proxy-Authorization", "Basic c2VjcmV0",
		"Grpc-Timeout", "30S",
		"Grpc-Accept-Encoding", "gzip",
		"X-Meta-Bin", "AAEC",
	)
	checkOK(t, "call", r, body)
	fields := recv(t, headers, "the request at the upstream")

	var pseudo, regular []string
	for i, f := range fields {
		if f.Name != strings.ToLower(f.Name) {
			t.Errorf("field name %q is not lower case", f.Name)
		}
		if strings.HasPrefix(f.Name, ":") {
			if len(regular) > 0 {
				t.Errorf("pseudo-header %s at position %d, after regular fields", f.Name, i)
			}
			pseudo = append(pseudo, f.Name+": "+f.Value)
			continue
		}
		regular = append(regular, f.Name+": "+f.Value)
	}
	slices.Sort(pseudo)
	slices.Sort(regular)
	wantPseudo := []string{
		":authority: " + authority,
		":method: POST",
		":path: /tree.NodeProvider/ListNodes?a=1;b=%zz",
		":scheme: http",
	}
	wantRegular := []string{
		"content-type: application/grpc",
		"grpc-accept-encoding: gzip",
		"grpc-timeout: 30S",
		"te: trailers",
		"user-agent: cells-sync/4.4 grpc-go/1.85.0",
		"x-forwarded-for: 127.0.0.1",
		"x-forwarded-host: " + authority,
		"x-forwarded-proto: https",
		"x-meta-bin: AAEC",
		"x-pydio-bearer: eyJhbGciOi.secret.token",
		"x-real-ip: 127.0.0.1",
	}
	if !slices.Equal(pseudo, wantPseudo) {
		t.Errorf("pseudo-headers:\n got %q\nwant %q", pseudo, wantPseudo)
	}
	if !slices.Equal(regular, wantRegular) {
		t.Errorf("fields:\n got %q\nwant %q", regular, wantRegular)
	}
	for _, f := range fields {
		switch f.Name {
		case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
			"proxy-authorization", "proxy-authenticate", "trailer", "forwarded":
			t.Errorf("hop-by-hop field %s: %q sent to the upstream", f.Name, f.Value)
		}
	}
}

// TestGRPCUpstreamClosedOnShutdown: once the proxy has shut down, its
// connections to the gRPC upstream are closed too.
func TestGRPCUpstreamClosedOnShutdown(t *testing.T) {
	t.Parallel()
	p, tp, _, _ := startEchoPeer(t, "bye")
	if err := tp.Shutdown(); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	c := p.Conns()[0]
	for {
		c.mu.Lock()
		closed, changed := c.closed, c.changed
		c.mu.Unlock()
		if closed {
			return
		}
		select {
		case <-changed:
		case <-time.After(10 * time.Second):
			t.Fatal("the upstream connection is still open 10 s after the proxy shut down")
		}
	}
}

// TestGRPCUpstreamAbandonedCallsReturnWindow: calls whose clients give up
// with data still unread (in the proxy and on its way) give their share of
// the connection's receive window back. Twelve abandoned 2 MiB answers are
// three times the 8 MiB connection window the proxy gets here (1 GiB by
// default, which they would not exhaust): had they kept it, the call after
// them on the same upstream connection would never get its answer.
func TestGRPCUpstreamAbandonedCallsReturnWindow(t *testing.T) {
	t.Parallel()
	big := grpcMsg(randomBytes(2<<20, 7))
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.Get(":path") == "/pkg.Svc/Echo" {
			s.respond(grpcMsg([]byte("last")))
			return
		}
		// Sends as the proxy's windows allow, until the reset.
		s.respond(big)
	})
	tp := startPeerProxy(t, p)
	tp.fwd.grpcUp.connWindow = 8 << 20
	for i := range 12 {
		ctx, cancel := context.WithCancel(testCtx(t))
		res := startCall(t, ctx, tp, "/pkg.Svc/Download", grpcMsg(nil))
		if _, err := io.ReadFull(res.Body, make([]byte, 1<<10)); err != nil {
			t.Fatalf("call %d: reading the first bytes: %v", i, err)
		}
		res.Body.Close()
		cancel()
	}
	want := grpcMsg([]byte("last"))
	// A generous bound for an answer that takes milliseconds, so that a
	// lost window fails the test rather than hanging it.
	ctx, cancel := context.WithTimeout(testCtx(t), 20*time.Second)
	defer cancel()
	checkOK(t, "the call after them", callGRPC(ctx, tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
	if n := len(p.Conns()); n != 1 {
		t.Errorf("the upstream accepted %d connections, want 1 (all calls on one)", n)
	}
}

// TestGRPCUpstreamSlowClients: two clients stop reading large answers that
// share an upstream connection with a third client's small call, which
// must still complete. Each stalled call may hold its whole stream window
// (512 KiB) in the proxy, unread; a connection window that two such calls can
// use up (8 MiB, as it was) stalls every call on the connection, and Cells
// Sync keeps large downloads open on the connection its other calls use.
func TestGRPCUpstreamSlowClients(t *testing.T) {
	t.Parallel()
	const big = 32 << 20
	stalled := make(chan uint32, 4)
	p := newH2Peer(t, h2PeerConfig{ConnWindow: 1 << 30}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc") != nil {
			return
		}
		if s.Get(":path") == "/pkg.Svc/Small" {
			if s.writeData(grpcMsg([]byte("small answer")), false) != nil {
				return
			}
			s.writeHeaders(true, 1, "grpc-status", "0")
			return
		}
		buf := make([]byte, 64<<10)
		once := false
		stall := func() {
			if !once {
				once = true
				stalled <- s.ID
			}
		}
		for sent := 0; sent < big; sent += len(buf) {
			if s.writeDataStall(buf, false, 500*time.Millisecond, stall) != nil {
				return
			}
		}
		s.writeHeaders(true, 1, "grpc-status", "0")
	})
	tp := startPeerProxy(t, p)
	ctx := testCtx(t)

	// Two slow clients, each on a client connection of its own, that read
	// nothing of their large answers.
	for i := range 2 {
		req, err := grpcRequest(ctx, tp.URL+"/pkg.Svc/Big", grpcMsg(nil))
		if err != nil {
			t.Fatal(err)
		}
		res, err := tp.client(true).Do(req)
		if err != nil {
			t.Fatalf("large call %d: %v", i, err)
		}
		t.Cleanup(func() { res.Body.Close() })
	}
	for range 2 {
		recv(t, stalled, "a large answer to wait for a window")
	}
	// A generous bound for an answer that takes milliseconds, so that a
	// starved connection fails the test rather than hanging it.
	sctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	want := grpcMsg([]byte("small answer"))
	checkOK(t, "a small call meanwhile", callGRPC(sctx, tp.client(true), tp.URL+"/pkg.Svc/Small", grpcMsg(nil)), want)
	if n := p.Accepted.Load(); n != 1 {
		t.Errorf("the upstream accepted %d connections, want 1 (all calls on one)", n)
	}
}

// refusedAttempts is what a refusingPeer saw of each attempt of its calls.
type refusedAttempts struct {
	mu       sync.Mutex
	bodies   [][]byte
	timeouts []string // grpc-timeout
}

// refusingPeer is a Cells that leaves the first call it gets unprocessed,
// with RST_STREAM REFUSED_STREAM (how "refused-stream") or with a GOAWAY
// below it and the connection closed (how "goaway"), and echoes the body
// of every later one.
func refusingPeer(t *testing.T, how string) (*h2Peer, *refusedAttempts) {
	seen := &refusedAttempts{}
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		if err != nil {
			return
		}
		seen.mu.Lock()
		seen.bodies = append(seen.bodies, body)
		seen.timeouts = append(seen.timeouts, s.Get("grpc-timeout"))
		first := len(seen.bodies) == 1
		seen.mu.Unlock()
		switch {
		case !first:
			s.respond(body)
		case how == "refused-stream":
			s.reset(http2.ErrCodeRefusedStream)
		default:
			s.c.goAway(0, http2.ErrCodeNo)
			s.c.close()
		}
	})
	return p, seen
}

// TestGRPCUpstreamRefusedSentAgain: a call Cells did not process, refused
// with RST_STREAM REFUSED_STREAM or left above the last stream ID of a
// GOAWAY, is sent again with its body (RFC 9113 §8.7), on a new connection
// after a GOAWAY; the client sees one successful call.
func TestGRPCUpstreamRefusedSentAgain(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"refused-stream", "goaway"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			p, seen := refusingPeer(t, how)
			tp := startPeerProxy(t, p)
			want := grpcMsg(randomBytes(3000, 3))
			checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want), want)
			seen.mu.Lock()
			defer seen.mu.Unlock()
			bodies := seen.bodies
			if len(bodies) != 2 {
				t.Fatalf("the upstream saw the call %d times, want 2", len(bodies))
			}
			if !bytes.Equal(bodies[0], want) || !bytes.Equal(bodies[1], want) {
				t.Error("a body the upstream received differs from the one sent")
			}
		})
	}
}

// TestGRPCUpstreamRetryTimeLeft: a call with a grpc-timeout that Cells
// refused (REFUSED_STREAM, or above a GOAWAY's last stream ID) is sent
// again with the time left before its deadline, not with the client's
// grpc-timeout, which counts from when the client sent the call: Cells
// would take the call for having more time than its client waits. The
// first attempt waited for the proxy to dial Cells, so it carries the time
// left too (TestGRPCUpstreamWaitTimeLeft: one that went at once keeps the
// client's value as it came); the second carries no more than the first.
func TestGRPCUpstreamRetryTimeLeft(t *testing.T) {
	t.Parallel()
	for _, how := range []string{"refused-stream", "goaway"} {
		t.Run(how, func(t *testing.T) {
			t.Parallel()
			p, seen := refusingPeer(t, how)
			tp := startPeerProxy(t, p)
			want := grpcMsg([]byte("time left"))
			checkOK(t, "call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want, "grpc-timeout", "30S"), want)
			seen.mu.Lock()
			defer seen.mu.Unlock()
			timeouts := seen.timeouts
			if len(timeouts) != 2 {
				t.Fatalf("the upstream saw the call %d times, want 2", len(timeouts))
			}
			first, ok := parseGRPCTimeout(timeouts[0])
			if !ok || first <= 0 || first > 30*time.Second {
				t.Errorf("first attempt: grpc-timeout %q, want the time left: above 0 and at most the client's 30S", timeouts[0])
			}
			left, ok := parseGRPCTimeout(timeouts[1])
			switch {
			case !ok:
				t.Errorf("second attempt: grpc-timeout %q is not one (at most 8 digits and a unit)", timeouts[1])
			case left <= 0 || left >= 30*time.Second || left > first:
				t.Errorf("second attempt: grpc-timeout %q (%v), want the time left: above 0, below the client's 30S and at most the first attempt's %q", timeouts[1], left, timeouts[0])
			case !strings.HasSuffix(timeouts[1], "u"):
				// Just under 30 s is 3e10 ns, more than 8 digits: in
				// microseconds it fits.
				t.Errorf("second attempt: grpc-timeout %q, want it in microseconds, the finest unit it fits in", timeouts[1])
			}
		})
	}
}

// lateCtx is a call's context in the moment between its deadline and its
// timer: the deadline has passed, but context.WithDeadline's timer, which
// a loaded machine may run late, has not ended it yet. Deadline reports the
// deadline; Done stays open until the test ends.
type lateCtx struct {
	context.Context
	deadline time.Time
}

func (c lateCtx) Deadline() (time.Time, bool) { return c.deadline, true }

// TestGRPCUpstreamRetryPastDeadline: Cells refuses a call once its deadline
// has passed, before the proxy's own timer has ended the call (lateCtx).
// There is no time left to give Cells: the call is not sent again, and its
// client gets DEADLINE_EXCEEDED.
func TestGRPCUpstreamRetryPastDeadline(t *testing.T) {
	t.Parallel()
	deadline := time.Now().Add(50 * time.Millisecond)
	var attempts atomic.Int32
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		attempts.Add(1)
		// Not a timing margin: the call's deadline is a fixed time,
		// and lateCtx never ends the call at it.
		select {
		case <-time.After(time.Until(deadline)):
		case <-s.Done():
			return
		}
		s.reset(http2.ErrCodeRefusedStream)
	})
	tp := startPeerProxy(t, p)
	req, err := grpcRequest(lateCtx{t.Context(), deadline}, "http://cells/pkg.Svc/Echo", grpcMsg([]byte("too late")))
	if err != nil {
		t.Fatal(err)
	}
	// As the proxy's HTTP/2 server hands a gRPC call over.
	req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
	req.ContentLength = -1
	req.Header.Set("Grpc-Timeout", "50m")
	res, err := tp.fwd.startGRPC(req)
	if err == nil {
		res.Body.Close()
		t.Fatal("the call was answered; want it ended at its deadline")
	}
	w := httptest.NewRecorder()
	tp.fwd.errorHandler(w, req, err)
	if got, want := w.Header().Get("Grpc-Status"), "4"; got != want {
		t.Errorf("grpc-status = %q (%q), want %q (DEADLINE_EXCEEDED)", got, w.Header().Get("Grpc-Message"), want)
	}
	if n := attempts.Load(); n != 1 {
		t.Errorf("the upstream saw the call %d times, want once: no time was left to send it again", n)
	}
}

// TestGRPCUpstreamHeaderListSize: Cells announces SETTINGS_MAX_HEADER_LIST_SIZE
// of 1 KiB. A call whose head is larger is answered RESOURCE_EXHAUSTED by
// the proxy and never reaches Cells; calls before and after it go through
// on the same connection (the refused head left the HPACK state as it was:
// the peer decodes the next block with the table it has), and no block the
// peer receives is above the limit.
func TestGRPCUpstreamHeaderListSize(t *testing.T) {
	t.Parallel()
	const limit = 1024
	var mu sync.Mutex
	var sizes []int
	p := newH2Peer(t, h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxHeaderListSize, Val: limit}}}, func(s *h2Stream) {
		n := 0
		for _, f := range s.Header {
			n += int(f.Size())
		}
		mu.Lock()
		sizes = append(sizes, n)
		mu.Unlock()
		echo(s)
	})
	tp := startPeerProxy(t, p)
	ctx := testCtx(t)
	url := tp.URL + "/tree.NodeProvider/ReadNode"
	body := grpcMsg([]byte("small head"))

	checkOK(t, "first call", callGRPC(ctx, tp.H2, url, body, "X-Pydio-Bearer", "short.token"), body)
	r := callGRPC(ctx, tp.H2, url, body, "X-Pydio-Bearer", strings.Repeat("t", limit))
	if r.Err != nil {
		t.Fatalf("large head: %v", r.Err)
	}
	if got := r.Header.Get("Grpc-Status"); r.Status != http.StatusOK || got != "8" {
		t.Errorf("large head: status %d, grpc-status %q (%q), want 200 and 8 (RESOURCE_EXHAUSTED)",
			r.Status, got, r.Header.Get("Grpc-Message"))
	}
	checkOK(t, "call after", callGRPC(ctx, tp.H2, url, body, "X-Pydio-Bearer", "short.token"), body)

	mu.Lock()
	defer mu.Unlock()
	if len(sizes) != 2 {
		t.Errorf("the upstream saw %d calls, want 2 (the large head must not be sent)", len(sizes))
	}
	for _, n := range sizes {
		if n > limit {
			t.Errorf("the upstream received a head of %d bytes, above its limit of %d", n, limit)
		}
	}
	if conns := len(p.Conns()); conns != 1 {
		t.Errorf("%d upstream connections, want 1", conns)
	}
}

// TestCanonicalKey: canonicalKey's shortcuts give what
// http.CanonicalHeaderKey gives, and other names go to it.
func TestCanonicalKey(t *testing.T) {
	for _, name := range []string{
		"content-type", "content-length", "date", "trailer", "grpc-status", "grpc-message",
		"grpc-encoding", "grpc-accept-encoding", "grpc-status-details-bin",
		"x-pydio-bearer", "grpc-trace-bin", "Grpc-Status", "x_under", "",
	} {
		if got, want := canonicalKey(name), http.CanonicalHeaderKey(name); got != want {
			t.Errorf("canonicalKey(%q) = %q, want %q", name, got, want)
		}
	}
}

// TestGRPCUpstreamRequestTrailers: trailers a client sends after its
// request body do not reach the upstream, a forwarding field among them
// included: the stream ends with its last DATA frame, and the call goes
// through. (Through ReverseProxy they went as an empty header block.)
func TestGRPCUpstreamRequestTrailers(t *testing.T) {
	t.Parallel()
	type seen struct {
		body    []byte
		trailer []hpack.HeaderField
	}
	upstream := make(chan seen, 1)
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		body, err := s.readBody()
		s.c.mu.Lock()
		tr := s.trailer
		s.c.mu.Unlock()
		upstream <- seen{body, tr}
		if err == nil {
			s.respond(body)
		}
	})
	tp := startPeerProxy(t, p)

	want := grpcMsg([]byte("with trailers"))
	req, err := grpcRequest(testCtx(t), tp.URL+"/pkg.Svc/Upload", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Trailer = http.Header{"X-Checksum": nil, "X-Forwarded-For": nil}
	req.Body = io.NopCloser(&trailerReader{r: bytes.NewReader(want), req: req, set: map[string]string{
		"X-Checksum":      "sha256:abc",
		"X-Forwarded-For": "203.0.113.9",
	}})
	res, err := tp.H2.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(res.Body)
	res.Body.Close()
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("response body %q, %v; want %q", got, err, want)
	}
	if st := res.Trailer.Get("Grpc-Status"); st != "0" {
		t.Errorf("grpc-status = %q, want 0", st)
	}
	up := recv(t, upstream, "the request at the upstream")
	if !bytes.Equal(up.body, want) {
		t.Errorf("upstream body = %q, want %q", up.body, want)
	}
	if up.trailer != nil {
		t.Errorf("request trailers reached the upstream: %v", up.trailer)
	}
}

// trailerReader is a request body that fills in its request's trailers as
// it ends, as net/http's client wants request trailers set.
type trailerReader struct {
	r   io.Reader
	req *http.Request
	set map[string]string
}

func (t *trailerReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if err == io.EOF {
		for k, v := range t.set {
			t.req.Trailer.Set(k, v)
		}
	}
	return n, err
}

// TestGRPCUpstreamClosed: once the drain has closed the gRPC upstream
// (grpcDrainGrace), a call that still reaches the proxy gets UNAVAILABLE
// "shutting down", without a new connection to Cells.
func TestGRPCUpstreamClosed(t *testing.T) {
	t.Parallel()
	svc, gs := newProbeServer(t)
	var dials atomic.Int32
	gup := newUpstreamWith(t, upH2C, gs, func(s *http.Server) {
		s.ConnState = func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				dials.Add(1)
			}
		}
	})
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	cfg := testConfig(up)
	cfg.GRPCUpstream = gup.URL
	tp := startProxy(t, cfg)
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}); err != nil {
		t.Fatalf("call before Close: %v", err)
	}
	if n := tp.fwd.grpcUp.Close(); n != 0 {
		t.Errorf("Close ended %d calls, want 0: none was open", n)
	}
	_, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "shutting down") {
		t.Errorf("call after Close: %v, want UNAVAILABLE \"cells-proxy: shutting down\"", err)
	}
	if n := svc.calls(); n != 1 {
		t.Errorf("Cells saw %d calls, want 1", n)
	}
	if n := dials.Load(); n != 1 {
		t.Errorf("the proxy opened %d connections to Cells' gRPC port, want 1: none after Close", n)
	}
}

// TestGRPCUpstreamRetryClientGone: a call Cells left unprocessed (above the
// last stream ID of a GOAWAY, the connection then closed) goes again on a
// new connection, and its client resets it while the proxy is still
// dialling that connection. The call must not reach Cells once the
// connection is up: its client has been told it failed, and may well send
// it again itself (a Cells Sync write), which Cells would then do twice.
// The connection itself is kept for the next call.
func TestGRPCUpstreamRetryClientGone(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	seen := map[string]int{}
	next := make(chan uint32, 1) // the stream ID the next call got
	p := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		call := s.Get("x-call")
		mu.Lock()
		seen[call]++
		first := seen[call] == 1
		mu.Unlock()
		body, err := s.readBody()
		if err != nil {
			return
		}
		switch {
		case call == "gone" && first:
			s.c.goAway(0, http2.ErrCodeNo)
			s.c.close()
		case call == "next":
			next <- s.ID
			s.respond(body)
		}
	})
	// Between the proxy and the peer: the second connection (the one the
	// unprocessed call goes again on) waits for release.
	held, release := make(chan struct{}, 1), make(chan struct{})
	gate := startConnServer(t, func(n int64, c net.Conn) {
		if n == 2 {
			held <- struct{}{}
			select {
			case <-release:
			case <-t.Context().Done():
				return
			}
		}
		up, err := net.Dial("tcp", p.Addr)
		if err != nil {
			return
		}
		done := make(chan struct{}, 2)
		go func() { io.Copy(up, c); done <- struct{}{} }()
		go func() { io.Copy(c, up); done <- struct{}{} }()
		<-done
		up.Close()
		c.Close()
		<-done
	})
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: gate.ln.Addr().String()}
	tp := startProxy(t, cfg)

	fc := dialH2(t, tp)
	fc.wmu.Lock()
	err := fc.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, EndHeaders: true, BlockFragment: fc.block(
		pseudo(tp, "POST", "/pkg.Svc/Write", "content-type", "application/grpc", "te", "trailers", "x-call", "gone")...)})
	if err == nil {
		err = fc.fr.WriteData(1, true, grpcMsg([]byte("write once")))
	}
	fc.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	recv(t, held, "the proxy dialling again for the unprocessed call")
	// The client resets the call. The server handles a connection's frames
	// in order: once the request after the reset is answered, the reset
	// has cancelled the call.
	fc.wmu.Lock()
	err = fc.fr.WriteRSTStream(1, http2.ErrCodeCancel)
	fc.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if err := fc.request(3, pseudo(tp, "GET", "/")...); err != nil {
		t.Fatal(err)
	}
	if ev := fc.answer(t, 3); ev.Type != http2.FrameHeaders {
		t.Fatalf("the request after the reset: %v", ev)
	}
	close(release)

	want := grpcMsg([]byte("next"))
	checkOK(t, "the next call", callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want, "x-call", "next"), want)
	// The connection dialled for the reset call carries the next one, which
	// is its first stream unless the reset call went out on it.
	if id := recv(t, next, "the next call at the upstream"); id != 1 {
		t.Errorf("the next call is stream %d of its connection, want 1: the call its client had reset was sent to Cells before it", id)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := seen["gone"]; n != 1 {
		t.Errorf("Cells saw the reset call %d times, want once (the attempt it left unprocessed)", n)
	}
}
