package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

// retireCells is a caCells that says which of the proxy's connections
// carried each request (X-Conn: the proxy's address as Cells sees it).
//
//	GET /conn      answers "ok"
//	GET /slow      answers "first", then, once the test closes release, "second"
//	PUT /upload    answers the hex SHA-256 of the body it read
//	websocket      echoes every message until the client closes
type retireCells struct {
	*caCells
	slow    chan struct{} // a /slow request has its first part
	release chan struct{} // closed by the test: /slow ends
	upload  chan struct{} // an /upload request has begun
}

func newRetireCells(t *testing.T, ca *testCA) *retireCells {
	t.Helper()
	c := &retireCells{slow: make(chan struct{}, 1), release: make(chan struct{}), upload: make(chan struct{}, 1)}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "" {
			ws, err := websocket.Accept(w, r, nil)
			if err != nil {
				return
			}
			defer ws.CloseNow()
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			for {
				typ, msg, err := ws.Read(ctx)
				if err != nil {
					return
				}
				if err := ws.Write(ctx, typ, msg); err != nil {
					return
				}
			}
		}
		w.Header().Set("X-Conn", r.RemoteAddr)
		switch r.URL.Path {
		case "/slow":
			io.WriteString(w, "first")
			w.(http.Flusher).Flush()
			c.slow <- struct{}{}
			<-c.release
			io.WriteString(w, "second")
		case "/upload":
			c.upload <- struct{}{}
			h := sha256.New()
			if _, err := io.Copy(h, r.Body); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			io.WriteString(w, hex.EncodeToString(h.Sum(nil)))
		default:
			io.WriteString(w, "ok")
		}
	})
	c.caCells = newCACellsServing(t, ca.issue(t, true, "localhost"), 0, h)
	return c
}

// open reports whether Cells holds a connection from addr open.
func (c *retireCells) open(addr string) bool {
	s := &c.conns
	s.mu.Lock()
	defer s.mu.Unlock()
	for nc := range s.m {
		if nc.RemoteAddr().String() == addr {
			return true
		}
	}
	return false
}

// waitClosed waits until the proxy's connection from addr is closed, as
// Cells sees it.
func (c *retireCells) waitClosed(t *testing.T, addr, what string) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool { return !c.open(addr) }, func() string {
		return fmt.Sprintf("%s: the proxy's connection to Cells from %s, made before CELLS_UPSTREAM_CA_FILE changed, still open 10s on", what, addr)
	})
}

// startRetireProxy starts, for a CA-change test, a Cells whose
// certificate a new CA issues and a proxy that trusts that CA's file. The
// file is polled hourly: the test drives the checks (changeCA). A test
// that calls it must not be parallel (setCertPollInterval).
func startRetireProxy(t *testing.T) (*testCA, *retireCells, *caProxy) {
	t.Helper()
	setCertPollInterval(t, time.Hour)
	ca := newTestCA(t, "cells root")
	cells := newRetireCells(t, ca)
	return ca, cells, startCAProxy(t, cells.caCells, ca.PEM())
}

// get sends GET path through the proxy and returns the connection to
// Cells that carried it.
func (p *caProxy) get(t *testing.T, path string) string {
	t.Helper()
	res, err := p.H1.Get(p.URL + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer res.Body.Close()
	if _, err := io.Copy(io.Discard, res.Body); err != nil {
		t.Fatalf("GET %s: body: %v", path, err)
	}
	if res.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s, want 200", path, res.Status)
	}
	return res.Header.Get("X-Conn")
}

// waitIdle waits until the direct path holds n idle connections to Cells:
// the one a request used is back in the pool.
func (p *caProxy) waitIdle(t *testing.T, n int) {
	t.Helper()
	u := p.fwd.httpUp
	var got int
	waitFor(t, 10*time.Second, func() bool {
		u.mu.Lock()
		got = len(u.idle)
		u.mu.Unlock()
		return got == n
	}, func() string { return fmt.Sprintf("the proxy holds %d idle connections to Cells, want %d", got, n) })
}

// changeCA replaces the CA file with ca's root and another one's (Cells'
// certificate still verifies) and has the proxy check it.
func (p *caProxy) changeCA(t *testing.T, ca *testCA) {
	t.Helper()
	before := strings.Count(p.Log.String(), "CELLS_UPSTREAM_CA_FILE reloaded")
	replaceFile(t, p.caFile, append(ca.PEM(), newTestCA(t, "another root").PEM()...), true)
	p.fwd.ca.poll()
	if got := strings.Count(p.Log.String(), "CELLS_UPSTREAM_CA_FILE reloaded"); got != before+1 {
		t.Fatalf("no line says CELLS_UPSTREAM_CA_FILE was reloaded after it changed:\n%s", p.Log)
	}
}

// TestUpstreamCAChangeHTTP: after CELLS_UPSTREAM_CA_FILE changes, no new
// request on the direct path goes over a connection to Cells made before:
// an idle one is closed at once, one busy with a response across the
// change finishes it intact and is then closed rather than pooled.
func TestUpstreamCAChangeHTTP(t *testing.T) {
	ca, cells, p := startRetireProxy(t)

	t.Run("idle", func(t *testing.T) {
		first := p.get(t, "/conn")
		p.waitIdle(t, 1)
		if again := p.get(t, "/conn"); again != first {
			t.Fatalf("second GET went over %s, the first over %s: the proxy reuses no connection, the test proves nothing", again, first)
		}
		p.waitIdle(t, 1)
		p.changeCA(t, ca)
		if got := p.get(t, "/conn"); got == first {
			t.Errorf("GET after the CA change went over %s, the connection made before it", got)
		}
		cells.waitClosed(t, first, "idle")
	})

	// Between the counter's rise and the close of the idle connections
	// (changed), a request that takes one must not go out on it.
	t.Run("idle before its close", func(t *testing.T) {
		first := p.get(t, "/conn")
		p.waitIdle(t, 1)
		p.fwd.ca.gen.Add(1) // the change, before changed runs
		if got := p.get(t, "/conn"); got == first {
			t.Errorf("GET after the CA change went over %s, the connection made before it", got)
		}
		cells.waitClosed(t, first, "idle")
	})

	t.Run("busy", func(t *testing.T) {
		type result struct {
			body, conn string
			err        error
		}
		done := make(chan result, 1)
		go func() {
			res, err := p.H1.Get(p.URL + "/slow")
			if err != nil {
				done <- result{err: err}
				return
			}
			defer res.Body.Close()
			b, err := io.ReadAll(res.Body)
			done <- result{string(b), res.Header.Get("X-Conn"), err}
		}()
		select {
		case <-cells.slow:
		case <-time.After(10 * time.Second):
			t.Fatal("GET /slow did not reach Cells in 10s")
		}
		p.changeCA(t, ca)
		close(cells.release)
		r := <-done
		if r.err != nil || r.body != "firstsecond" {
			t.Fatalf("GET /slow across the CA change: %q, %v; want \"firstsecond\"", r.body, r.err)
		}
		cells.waitClosed(t, r.conn, "busy")
		if got := p.get(t, "/conn"); got == r.conn {
			t.Errorf("GET after the CA change went over %s, the connection made before it", got)
		}
	})
}

// TestUpstreamCAChangeUpload: an upload (of unknown length: through
// http.Transport) in flight across a change of CELLS_UPSTREAM_CA_FILE
// reaches Cells intact; its connection is then closed, and the next upload
// goes over a new one.
func TestUpstreamCAChangeUpload(t *testing.T) {
	ca, cells, p := startRetireProxy(t)

	// upload sends body, of unknown length (so through http.Transport),
	// and returns what Cells answered and the connection that carried it.
	upload := func(body io.Reader) (sum, conn string, err error) {
		req, err := http.NewRequest("PUT", p.URL+"/upload", io.MultiReader(body))
		if err != nil {
			return "", "", err
		}
		res, err := p.H1.Do(req)
		if err != nil {
			return "", "", err
		}
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		if err == nil && res.StatusCode != http.StatusOK {
			err = fmt.Errorf("%s: %q, want 200", res.Status, b)
		}
		return string(b), res.Header.Get("X-Conn"), err
	}

	part := func(seed byte) []byte { return bytes.Repeat([]byte{seed, seed + 1, seed + 2}, 1<<20) }
	first, second := part(1), part(7)
	want := sha256.Sum256(append(append([]byte(nil), first...), second...))
	pr, pw := io.Pipe()
	type result struct {
		sum, conn string
		err       error
	}
	done := make(chan result, 1)
	go func() {
		sum, conn, err := upload(pr)
		pr.CloseWithError(err) // a failed upload does not leave the writes below waiting
		done <- result{sum, conn, err}
	}()
	if _, err := pw.Write(first); err != nil {
		t.Fatal(err)
	}
	select {
	case <-cells.upload:
	case <-time.After(10 * time.Second):
		t.Fatal("the upload did not reach Cells in 10s")
	}
	p.changeCA(t, ca)
	if _, err := pw.Write(second); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	r := <-done
	if r.err != nil {
		t.Fatalf("upload across the CA change: %v", r.err)
	}
	if got := r.sum; got != hex.EncodeToString(want[:]) {
		t.Fatalf("upload across the CA change: Cells got a body of SHA-256 %s, want %x", got, want)
	}
	cells.waitClosed(t, r.conn, "upload")
	if _, conn, err := upload(strings.NewReader("next")); err != nil {
		t.Errorf("upload after the CA change: %v", err)
	} else if conn == r.conn {
		t.Errorf("upload after the CA change went over %s, the connection made before it", conn)
	}
}

// TestUpstreamCAChangeGRPC: after CELLS_UPSTREAM_CA_FILE changes, a gRPC
// connection made before takes no new call. Idle, it is closed at once;
// carrying a bidirectional stream (Cells Sync's StreamChanges), the stream
// keeps working to its end, new calls go on a new connection, and the old
// one closes once the stream has ended.
func TestUpstreamCAChangeGRPC(t *testing.T) {
	ca, _, p := startRetireProxy(t)
	cc := newGRPCClient(t, p.testProxy, p.Addr().String())
	defer cc.Close()
	tc := testgrpc.NewTestServiceClient(cc)
	conns := func() []*grpcConn { return grpcConns(p.fwd.grpcUp) }
	call := func(t *testing.T, when string) {
		t.Helper()
		if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}); err != nil {
			t.Fatalf("%s: EmptyCall: %v", when, err)
		}
	}

	t.Run("idle", func(t *testing.T) {
		call(t, "before the CA change")
		before := conns()
		if len(before) != 1 {
			t.Fatalf("the proxy holds %d gRPC connections to Cells after a call, want 1", len(before))
		}
		p.changeCA(t, ca)
		waitGRPCConns(t, p.testProxy, 0)
		call(t, "after the CA change")
		if got := conns(); len(got) != 1 || got[0] == before[0] {
			t.Errorf("after the CA change the proxy holds %d gRPC connections (the one made before among them: %v), want one new one", len(got), slices.Contains(got, before[0]))
		}
	})

	// Between the counter's rise and dropStale (changed), a call must
	// not go out on a connection made before.
	t.Run("idle before its retirement", func(t *testing.T) {
		call(t, "before the CA change")
		before := conns()
		if len(before) != 1 {
			t.Fatalf("the proxy holds %d gRPC connections to Cells after a call, want 1", len(before))
		}
		p.fwd.ca.gen.Add(1) // the change, before changed runs
		call(t, "after the CA change")
		if got := conns(); len(got) != 2 || !slices.Contains(got, before[0]) {
			t.Errorf("after the CA change the proxy holds %d gRPC connections (the one made before among them: %v), want it and a new one for the call", len(got), slices.Contains(got, before[0]))
		}
		p.fwd.grpcUp.dropStale() // what changed does
		waitGRPCConns(t, p.testProxy, 1)
	})

	t.Run("stream", func(t *testing.T) {
		stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"))
		if err != nil {
			t.Fatal(err)
		}
		echo := func(i int, when string) {
			t.Helper()
			in := payload(1<<10, uint64(i))
			if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: in}); err != nil {
				t.Fatalf("%s: Send: %v", when, err)
			}
			res, err := stream.Recv()
			if err != nil {
				t.Fatalf("%s: Recv: %v", when, err)
			}
			if !bytes.Equal(res.GetPayload().GetBody(), in.Body) {
				t.Errorf("%s: echo differs from what was sent", when)
			}
		}
		echo(0, "before the CA change")
		before := conns()
		if len(before) != 1 {
			t.Fatalf("the proxy holds %d gRPC connections to Cells, want 1", len(before))
		}
		p.changeCA(t, ca)
		echo(1, "after the CA change")
		call(t, "beside the stream, after the CA change")
		if got := conns(); len(got) != 2 || !slices.Contains(got, before[0]) {
			t.Errorf("beside the stream the proxy holds %d gRPC connections (the stream's among them: %v), want the stream's and a new one", len(got), slices.Contains(got, before[0]))
		}
		echo(2, "after a call beside it")
		if err := stream.CloseSend(); err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Recv(); err != io.EOF {
			t.Errorf("stream across the CA change: Recv after CloseSend = %v, want io.EOF (status OK)", err)
		}
		waitGRPCConns(t, p.testProxy, 1)
		if got := conns(); slices.Contains(got, before[0]) {
			t.Errorf("the stream's connection, made before the CA change, still held after the stream ended")
		}
		call(t, "after the stream ended")
	})
}

// TestUpstreamCAChangeWebsocket: a websocket open across a change of
// CELLS_UPSTREAM_CA_FILE keeps echoing (its connection is its own, never
// pooled): a routine rotation does not cut the web UI's events.
func TestUpstreamCAChangeWebsocket(t *testing.T) {
	ca, _, p := startRetireProxy(t)
	ctx := testCtx(t)
	ws, _, err := websocket.Dial(ctx, "wss://"+p.Addr().String()+"/ws/event", &websocket.DialOptions{HTTPClient: p.H1})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	echo := func(msg, when string) {
		t.Helper()
		if err := ws.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatalf("%s: websocket write: %v", when, err)
		}
		if _, got, err := ws.Read(ctx); err != nil || string(got) != msg {
			t.Fatalf("%s: websocket echo: %q, %v; want %q", when, got, err, msg)
		}
	}
	echo("before", "before the CA change")
	p.changeCA(t, ca)
	echo("after", "after the CA change")
	p.get(t, "/conn") // a request beside it
	echo("again", "after a request beside it")
	if err := ws.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Errorf("websocket close: %v", err)
	}
}

// TestUpstreamCAUnchangedKeepsConns: a check that finds the file with the
// same content (touched, or written again with the same bytes), or one
// that does not load, retires no connection.
func TestUpstreamCAUnchangedKeepsConns(t *testing.T) {
	ca, _, p := startRetireProxy(t)
	cc := newGRPCClient(t, p.testProxy, p.Addr().String())
	defer cc.Close()
	tc := testgrpc.NewTestServiceClient(cc)
	grpcConn := func() *grpcConn {
		t.Helper()
		if _, err := tc.EmptyCall(testCtx(t), &testgrpc.Empty{}); err != nil {
			t.Fatalf("EmptyCall: %v", err)
		}
		conns := grpcConns(p.fwd.grpcUp)
		if len(conns) != 1 {
			t.Fatalf("the proxy holds %d gRPC connections to Cells, want 1", len(conns))
		}
		return conns[0]
	}
	h1, g := p.get(t, "/conn"), grpcConn()
	p.waitIdle(t, 1)
	for _, c := range []struct {
		name   string
		change func()
	}{
		{"touched", func() {
			future := time.Now().Add(time.Hour)
			if err := os.Chtimes(p.caFile, future, future); err != nil {
				t.Fatal(err)
			}
		}},
		{"same bytes", func() { replaceFile(t, p.caFile, ca.PEM(), true) }},
		{"not a CA", func() { replaceFile(t, p.caFile, []byte("not a PEM bundle"), true) }},
		{"back to the same bytes", func() { replaceFile(t, p.caFile, ca.PEM(), false) }},
	} {
		c.change()
		p.fwd.ca.poll()
		if got := p.get(t, "/conn"); got != h1 {
			t.Errorf("%s: GET went over %s, want the connection made before, %s", c.name, got, h1)
		}
		p.waitIdle(t, 1)
		if got := grpcConn(); got != g {
			t.Errorf("%s: gRPC call went over a new connection, want the one made before", c.name)
		}
	}
	if strings.Contains(p.Log.String(), "CELLS_UPSTREAM_CA_FILE reloaded") {
		t.Errorf("a line says CELLS_UPSTREAM_CA_FILE was reloaded, its content unchanged:\n%s", p.Log)
	}
}

// TestUpstreamCAChangeGRPCWaiting: a gRPC call that waits for Cells to
// allow a stream on a connection (SETTINGS_MAX_CONCURRENT_STREAMS 0) when
// CELLS_UPSTREAM_CA_FILE changes was never sent: it must not stay on that
// connection, which takes no new call, but go on a new one, and reach
// Cells once that allows streams. The upstream is an h2c peer whose
// SETTINGS the test controls; the proxy's gRPC pool is given a CA whose
// change the test makes (the counter, then the pool's retirement, as
// upstreamCA.load does), since the certificate plays no part here.
func TestUpstreamCAChangeGRPCWaiting(t *testing.T) {
	t.Parallel()
	want := grpcMsg([]byte("after the change"))
	var seen timeoutsSeen
	zero := h2PeerConfig{Settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 0}}}
	p := newH2Peer(t, zero, seen.echo)
	tp, ca := startH2CCAProxy(t, p.Addr)
	u := tp.fwd.grpcUp

	res := make(chan grpcResult, 1)
	go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want) }()
	old := waitGRPCConn(t, u, "the call to wait for Cells to allow a stream", func(c *grpcConn) bool { return c.waiting > 0 })
	ca.gen.Add(1)
	u.dropStale()
	// The call dials again; Cells allows no stream there either at first.
	waitFor(t, 10*time.Second, func() bool { return p.Accepted.Load() >= 2 }, func() string {
		return "the waiting call did not dial a new connection 10 s after the CA change"
	})
	waitGRPCConn(t, u, "the call to wait on the new connection", func(c *grpcConn) bool { return c != old && c.waiting > 0 })
	raiseStreams(t, p.Conns()[1])
	checkOK(t, "call waiting across the CA change", recv(t, res, "the call"), want)
	if got := len(seen.all()); got != 1 {
		t.Errorf("Cells saw %d calls, want 1", got)
	}
	if slices.Contains(grpcConns(u), old) {
		t.Errorf("the connection made before the CA change is still held")
	}
}

// TestUpstreamCAChangeGRPCDialing: a gRPC call whose connection to Cells
// is being dialled when CELLS_UPSTREAM_CA_FILE changes was verified, if
// at all, with the file being replaced. The connection is retired as soon
// as the dial ends, and the call goes on a new one, dialled after the
// change. Cells is an h2c peer behind a relay that holds the first dial
// until the test has made the change.
func TestUpstreamCAChangeGRPCDialing(t *testing.T) {
	t.Parallel()
	want := grpcMsg([]byte("after the change"))
	var seen timeoutsSeen
	p := newH2Peer(t, h2PeerConfig{}, seen.echo)
	accepted, release := make(chan struct{}, 2), make(chan struct{})
	relay := holdingRelay(t, p.Addr, accepted, release)
	tp, ca := startH2CCAProxy(t, relay)

	res := make(chan grpcResult, 1)
	go func() { res <- callGRPC(testCtx(t), tp.H2, tp.URL+"/pkg.Svc/Echo", want) }()
	recv(t, accepted, "the proxy's dial")
	ca.gen.Add(1) // the change, while the dial waits for Cells
	close(release)
	checkOK(t, "call dialled across the CA change", recv(t, res, "the call"), want)
	if got := p.Accepted.Load(); got != 2 {
		t.Errorf("Cells accepted %d connections, want 2: the one dialled across the change, retired, and a new one for the call", got)
	}
	if conns := grpcConns(tp.fwd.grpcUp); len(conns) != 1 || conns[0].gen != 1 {
		t.Errorf("after the call the proxy holds %d gRPC connections, want one dialled after the change", len(conns))
	}
}

// startH2CCAProxy is a proxy whose gRPC upstream is the h2c server at addr,
// its pool given a CA whose changes the test makes (raising its counter,
// and calling dropStale where the change's retirement is wanted): over h2c
// the certificate plays no part, the connections' generations do.
func startH2CCAProxy(t *testing.T, addr string) (*testProxy, *upstreamCA) {
	t.Helper()
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: addr}
	ca := &upstreamCA{}
	return startProxy(t, cfg, func(s *Server) { s.fwd.grpcUp.ca = ca }), ca
}
