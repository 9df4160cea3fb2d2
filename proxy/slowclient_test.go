package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// raiseFileLimit lifts RLIMIT_NOFILE to its hard limit: the slow-client
// test holds several thousand sockets (both ends of every connection live
// in this process).
func raiseFileLimit(t *testing.T, need uint64) {
	t.Helper()
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			t.Logf("raising RLIMIT_NOFILE: %v", err)
		}
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	if lim.Cur < need {
		t.Skipf("reason: RLIMIT_NOFILE is %d, the test needs %d sockets", lim.Cur, need)
	}
}

// slowConn is one slow client and what became of it.
type slowConn struct {
	opened   atomic.Bool
	cutAfter time.Duration // from the end of the trickle to the server's close
	cut      bool          // the server closed (or answered and closed)
	status   string        // a status line, if the server answered
}

// TestSlowClients holds 1,000 slowloris connections (TLS done, then a
// request head trickled a byte every 2 s, never finished) and 1,000 slow
// uploads (a head with Content-Length 1 MiB, then the body trickled) at
// once, while a normal client makes 60 requests: every one is answered.
// Once the trickles stop, the proxy cuts every slow connection: the heads
// at PROXY_READ_HEADER_TIMEOUT, the uploads at PROXY_IDLE_TIMEOUT (both
// shortened here), and Cells sees each cut upload fail, never complete.
//
// Under the race detector 300 of each: TLS handshakes are many times
// slower there and 2,000 of them would not fit in the time.
func TestSlowClients(t *testing.T) {
	n := 1000
	if raceEnabled {
		n = 300
	}
	if testing.Short() {
		n = 100
	}
	// Per slow upload four sockets (client, proxy, proxy to upstream,
	// upstream), per slowloris two, and room for the rest.
	raiseFileLimit(t, uint64(6*n+1024))

	var inflight atomic.Int32
	rec := &wireRecorder{}
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/upload" {
			inflight.Add(1)
			defer inflight.Add(-1)
		}
		rec.ServeHTTP(w, r)
	}))
	cfg := testConfig(up)
	cfg.ReadHeaderTimeout = 15 * time.Second
	cfg.IdleTimeout = 15 * time.Second
	tp := startProxy(t, cfg)

	stop := make(chan struct{}) // ends every trickle
	var stopOnce sync.Once
	stopTrickles := func() { stopOnce.Do(func() { close(stop) }) }
	defer stopTrickles()
	var stoppedAt atomic.Int64

	// run opens one slow connection: it sends first, then a byte every
	// 2 s until stop, then waits for the server to close it.
	run := func(sc *slowConn, first, trickle string) {
		d := net.Dialer{Timeout: 20 * time.Second}
		conn, err := tls.DialWithDialer(&d, "tcp", tp.Addr().String(), tp.TLSConfig("http/1.1"))
		if err != nil {
			t.Errorf("dial: %v", err)
			return
		}
		defer conn.Close()
		if _, err := io.WriteString(conn, first); err != nil {
			t.Errorf("first write: %v", err)
			return
		}
		sc.opened.Store(true)
		closed := make(chan string, 1)
		go func() {
			// Read until the server closes: an answer (a 408 for a cut
			// upload), then EOF, or EOF alone.
			conn.SetReadDeadline(time.Now().Add(3 * time.Minute))
			line, _ := bufio.NewReader(conn).ReadString('\n')
			io.Copy(io.Discard, conn)
			closed <- strings.TrimSpace(line)
		}()
		tick := time.NewTicker(2 * time.Second)
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-tick.C:
				conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.WriteString(conn, trickle[i%len(trickle):i%len(trickle)+1]); err == nil {
					continue
				}
				// The server cut us while we trickled: that is allowed.
			case <-stop:
			case sc.status = <-closed:
				sc.cut = true
				return
			}
			break
		}
		select {
		case sc.status = <-closed:
			sc.cut = true
			sc.cutAfter = time.Since(time.Unix(0, stoppedAt.Load()))
		case <-time.After(2 * time.Minute):
		}
	}

	loris := make([]slowConn, n)
	uploads := make([]slowConn, n)
	var wg sync.WaitGroup
	// Open at most 64 at a time, so that the handshakes do not all queue
	// at once on a two-core machine.
	sem := make(chan struct{}, 64)
	opened := make(chan struct{}, 2*n)
	open := func(sc *slowConn, first, trickle string) {
		wg.Go(func() {
			sem <- struct{}{}
			go func() {
				// Release the slot once the first bytes are out.
				for !sc.opened.Load() {
					select {
					case <-stop:
						<-sem
						return
					case <-time.After(10 * time.Millisecond):
					}
				}
				opened <- struct{}{}
				<-sem
			}()
			run(sc, first, trickle)
		})
	}
	start := time.Now()
	for i := range n {
		open(&loris[i], "GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", "abcdefgh")
		open(&uploads[i], "PUT /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1048576\r\n\r\nx", "0123456789")
	}
	for i := 0; i < 2*n; i++ {
		select {
		case <-opened:
		case <-time.After(60 * time.Second):
			t.Fatalf("only %d of %d slow connections opened", i, 2*n)
		}
	}
	t.Logf("%d slowloris and %d slow uploads open in %v", n, n, time.Since(start).Round(time.Millisecond))

	// Every upload reached Cells and is held there, at once.
	waitFor(t, 30*time.Second, func() bool { return int(inflight.Load()) >= n }, func() string {
		return fmt.Sprintf("%d slow uploads in flight at the upstream, want %d", inflight.Load(), n)
	})

	// Meanwhile a normal client is served, over HTTP/1.1 and HTTP/2.
	for i := range 60 {
		c := tp.H1
		if i%2 == 1 {
			c = tp.H2
		}
		res, err := c.Get(tp.URL + fmt.Sprintf("/normal/%d", i))
		if err != nil {
			t.Errorf("normal request %d: %v", i, err)
			continue
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if res.StatusCode != http.StatusOK {
			t.Errorf("normal request %d: status %d, want 200", i, res.StatusCode)
		}
	}
	t.Logf("normal client served %v after the start", time.Since(start).Round(time.Millisecond))

	stoppedAt.Store(time.Now().UnixNano())
	stopTrickles()
	wg.Wait()
	tp.H1.CloseIdleConnections()
	tp.H2.CloseIdleConnections()

	var lorisCut, uploadsCut int
	var worst time.Duration
	statuses := map[string]int{}
	for i := range n {
		if loris[i].cut {
			lorisCut++
		}
		if uploads[i].cut {
			uploadsCut++
			statuses[uploads[i].status]++
		}
		worst = max(worst, loris[i].cutAfter, uploads[i].cutAfter)
	}
	t.Logf("cut: %d slowloris, %d uploads (answers %v); the last %v after the trickles stopped", lorisCut, uploadsCut, statuses, worst.Round(time.Millisecond))
	if lorisCut != n {
		t.Errorf("the proxy closed %d of %d slowloris connections, want all", lorisCut, n)
	}
	if uploadsCut != n {
		t.Errorf("the proxy closed %d of %d stalled uploads, want all", uploadsCut, n)
	}
	for s := range statuses {
		if s != "" && !strings.HasPrefix(s, "HTTP/1.1 408") {
			t.Errorf("a stalled upload got %q, want a 408 or a closed connection", s)
		}
	}

	quiesce(t, tp, up)
	var slow, complete int
	for _, w := range rec.all() {
		switch {
		case w.RequestURI == "/slow":
			slow++
		case w.RequestURI == "/upload" && w.BodyErr == nil:
			complete++
		}
	}
	if slow != 0 {
		t.Errorf("%d unfinished heads reached the upstream, want none", slow)
	}
	if complete != 0 {
		t.Errorf("the upstream read %d cut uploads to a clean end, want every one to fail", complete)
	}
}

// TestClientAbortsUpload stops an upload half-way: over HTTP/1.1 the
// client closes its connection, over HTTP/2 it resets the stream. The
// upstream's read of the body fails promptly (an error, not a short body
// ending in io.EOF), so Cells can never take the half as the whole.
func TestClientAbortsUpload(t *testing.T) {
	t.Parallel()
	const size = 1 << 20
	type result struct {
		n   int
		err error
	}
	newUp := func(t *testing.T) (*testProxy, *testUpstream, chan struct{}, chan result) {
		started := make(chan struct{}, 1)
		results := make(chan result, 1)
		up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			buf := make([]byte, 32<<10)
			n := 0
			var err error
			for {
				var m int
				m, err = r.Body.Read(buf)
				n += m
				if n > 0 {
					select {
					case started <- struct{}{}:
					default:
					}
				}
				if err != nil {
					break
				}
			}
			if err == io.EOF {
				err = nil
			}
			results <- result{n, err}
			if err != nil {
				http.Error(w, "broken body", http.StatusBadRequest)
				return
			}
			io.WriteString(w, "ok")
		}))
		return startProxy(t, testConfig(up)), up, started, results
	}
	check := func(t *testing.T, started chan struct{}, results chan result, abort func()) {
		select {
		case <-started:
		case <-time.After(20 * time.Second):
			t.Fatal("the upstream got no body byte")
		}
		abort()
		select {
		case r := <-results:
			if r.err == nil {
				t.Errorf("upstream read %d bytes and a clean end, want a read error", r.n)
			}
			if r.n >= size {
				t.Errorf("upstream read %d bytes, want fewer than %d", r.n, size)
			}
			t.Logf("upstream read %d bytes, then %v", r.n, r.err)
		case <-time.After(20 * time.Second):
			t.Fatal("the upstream's body read did not fail within 20 s of the abort")
		}
	}

	t.Run("h1 close", func(t *testing.T) {
		t.Parallel()
		tp, up, started, results := newUp(t)
		defer quiesce(t, tp, up)
		conn, err := tls.Dial("tcp", tp.Addr().String(), tp.TLSConfig("http/1.1"))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "PUT /io/bucket/file HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n", size)
		if _, err := conn.Write(make([]byte, size/2)); err != nil {
			t.Fatal(err)
		}
		check(t, started, results, func() { conn.Close() })
	})

	t.Run("h2 reset", func(t *testing.T) {
		t.Parallel()
		tp, up, started, results := newUp(t)
		defer quiesce(t, tp, up)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		pr, pw := io.Pipe()
		req, _ := http.NewRequestWithContext(ctx, "PUT", tp.URL+"/io/bucket/file", pr)
		req.ContentLength = size
		done := make(chan error, 1)
		go func() {
			res, err := tp.H2.Do(req)
			if err == nil {
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
				err = fmt.Errorf("status %d", res.StatusCode)
			}
			done <- err
		}()
		go func() {
			pw.Write(make([]byte, size/2))
			<-ctx.Done()
			pw.CloseWithError(ctx.Err())
		}()
		check(t, started, results, cancel)
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("client: %v, want context.Canceled", err)
		}
	})
}

// h2HeadUpstream is Cells for the unfinished-head tests: it reads the
// body, answers a gRPC call with its status alone, in trailers, and any
// other request with the length of its body.
func h2HeadUpstream(t *testing.T) *testUpstream {
	return newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		if r.Header.Get("Content-Type") == "application/grpc" {
			w.Header().Set("Content-Type", "application/grpc")
			w.Header().Set("Trailer", "Grpc-Status")
			w.WriteHeader(http.StatusOK)
			w.Header().Set("Grpc-Status", "0")
			return
		}
		fmt.Fprint(w, n)
	}))
}

// h2Upload opens stream id with a PUT of 5 bytes whose body has not
// started.
func h2Upload(tp *testProxy, c *frameConn, id uint32) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndHeaders: true,
		BlockFragment: c.block(pseudo(tp, "PUT", "/io/up", "content-length", "5")...)})
}

// h2First makes a request on stream 1 and waits for its answer: by then
// the client has acknowledged the server's SETTINGS, which it cannot do in
// the middle of a header block.
func h2First(tp *testProxy, c *frameConn) error {
	if err := c.request(1, pseudo(tp, "GET", "/first")...); err != nil {
		return err
	}
	if ev, ok := c.waitAnswer(1); !ok || ev.Status != "200" {
		return fmt.Errorf("the first request got %v", ev)
	}
	return nil
}

// h2Unfinished sends the first part of a request head on stream id,
// without END_HEADERS; the client then answers no PING, as one in the
// middle of a header block cannot.
func h2Unfinished(tp *testProxy, c *frameConn, id uint32) error {
	c.noPingAck.Store(true)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, EndStream: true,
		BlockFragment: c.block(pseudo(tp, "GET", "/never")...)})
}

// h2Trickle sends a CONTINUATION frame of one field on stream id every
// 100 ms, never ending the block, until the proxy cuts the connection or
// the test ends (Close).
func h2Trickle(c *frameConn, id uint32) {
	go func() {
		for {
			select {
			case <-c.closing:
				return
			case <-time.After(100 * time.Millisecond):
			}
			c.wmu.Lock()
			c.ebuf.Reset()
			c.enc.WriteField(hpack.HeaderField{Name: "x-trickle", Value: "t", Sensitive: true})
			err := c.fr.WriteContinuation(id, false, c.ebuf.Bytes())
			c.wmu.Unlock()
			if err != nil {
				return
			}
		}
	}()
}

// h2OpenWaiting opens an upload on stream 1 and a gRPC call on stream 3,
// both waiting for their bodies (Cells Sync's streams stay quiet for
// hours).
func h2OpenWaiting(t *testing.T, tp *testProxy, c *frameConn) {
	t.Helper()
	if err := h2Upload(tp, c, 1); err != nil {
		t.Fatal(err)
	}
	c.wmu.Lock()
	err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, EndHeaders: true,
		BlockFragment: c.block(pseudo(tp, "POST", "/tree.NodeChangesStreamer/StreamChanges",
			"content-type", "application/grpc", "te", "trailers")...)})
	c.wmu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
}

// h2FinishWaiting sends the bodies of h2OpenWaiting's streams and checks
// both answers: Cells read the upload's 5 bytes; the gRPC call's answer is
// its status alone, in trailers.
func h2FinishWaiting(t *testing.T, c *frameConn) {
	t.Helper()
	c.wmu.Lock()
	err := c.fr.WriteData(1, true, []byte("hello"))
	if err == nil {
		err = c.fr.WriteData(3, true, []byte{0, 0, 0, 0, 0}) // an empty gRPC message
	}
	c.wmu.Unlock()
	if err != nil {
		t.Fatalf("the connection with open streams: %v", err)
	}
	// Both answers, in whatever order they come.
	got := map[uint32]string{}
	for ended := 0; ended < 2; {
		ev := c.wait(t, "the answers on the connection with open streams", func(ev frameEvent) bool {
			return ev.Type == http2.FrameGoAway || ev.Type == http2.FrameRSTStream ||
				ev.Type == http2.FrameHeaders || ev.Type == http2.FrameData
		})
		if ev.Type == http2.FrameGoAway {
			t.Fatalf("the connection with open streams: got %v; answers so far %v", ev, got)
		}
		switch ev.Type {
		case http2.FrameData:
			got[ev.StreamID] += " " + string(ev.Data)
		case http2.FrameHeaders:
			if ev.Status != "" {
				got[ev.StreamID] += ev.String()
			}
		default:
			got[ev.StreamID] += ev.String()
		}
		if ev.End || ev.Type == http2.FrameRSTStream {
			ended++
		}
	}
	for id, want := range map[uint32]string{1: ":status 200 5", 3: ":status 200"} {
		if got[id] != want {
			t.Errorf("the connection with open streams, stream %d: got %q, want %q", id, got[id], want)
		}
	}
}

// TestServerTimeoutsAsBefore: the limits 4d8a295 made Server fields so
// that tests shorten them keep their values in production: New sets them,
// and every server of the proxy is made by newHTTPServer (the public
// HTTP/2 and HTTP/1.1 ones, the PYDIO_GRPC_EXTERNAL one, the redirect),
// but the health port's, which sets none of them.
func TestServerTimeoutsAsBefore(t *testing.T) {
	cfg := testConfig(nil)
	cfg.Upstream = &url.URL{Scheme: "https", Host: "cells:8080"}
	s, err := New(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		protos func(*http.Protocols)
	}{
		{"HTTP/2 (public, PYDIO_GRPC_EXTERNAL)", func(p *http.Protocols) { p.SetUnencryptedHTTP2(true) }},
		{"HTTP/1.1 (public, redirect)", func(p *http.Protocols) { p.SetHTTP1(true) }},
	} {
		srv := s.newHTTPServer(http.NotFoundHandler(), tc.protos)
		if got, want := srv.IdleTimeout, 75*time.Second; got != want {
			t.Errorf("%s: IdleTimeout %v, want %v", tc.name, got, want)
		}
		if got, want := srv.HTTP2.SendPingTimeout, 60*time.Second; got != want {
			t.Errorf("%s: HTTP2.SendPingTimeout %v, want %v", tc.name, got, want)
		}
		if got, want := srv.HTTP2.PingTimeout, 20*time.Second; got != want {
			t.Errorf("%s: HTTP2.PingTimeout %v, want %v", tc.name, got, want)
		}
	}
}

// h2AwaitClose waits, up to guard, for the server to close c. It returns
// the error code of the server's GOAWAY (-1: none came) or an error if the
// connection is still open.
func h2AwaitClose(c *frameConn, guard time.Duration) (goaway int64, err error) {
	goaway = -1
	timeout := time.After(guard)
	for {
		select {
		case ev, ok := <-c.events:
			if !ok {
				return goaway, nil
			}
			if ev.Type == http2.FrameGoAway && goaway < 0 {
				goaway = int64(ev.Code)
			}
		case <-timeout:
			return goaway, fmt.Errorf("connection still open after %v", guard)
		}
	}
}

// TestH2UnfinishedHeadClosed: when PROXY_READ_HEADER_TIMEOUT is longer,
// what ends a connection whose client never finishes a request head is
// its idle limit (IdleTimeout: the unfinished block opens no stream) or,
// when another stream is open, its PING, which the client cannot answer in
// the middle of a header block (RFC 9113 §6.10). Each case is a connection
// that must be closed, without a GOAWAY other than NO_ERROR: preface and
// SETTINGS then nothing; a HEADERS frame without END_HEADERS and no
// CONTINUATION; CONTINUATION frames trickled; the unfinished block while a
// stream is open. A connection whose streams are open and wait for their
// bodies (an upload not started, a gRPC stream: Cells Sync's stay quiet
// for hours) and that answers PINGs is not cut: once every other
// connection is closed, its streams still complete. The limits are
// shortened here (75 s, 60 s and 20 s in the proxy); the test fails if
// either goes. TestH2HeadTimeout has PROXY_READ_HEADER_TIMEOUT shorter.
func TestH2UnfinishedHeadClosed(t *testing.T) {
	t.Parallel()
	up := h2HeadUpstream(t)
	cfg := testConfig(up)
	cfg.IdleTimeout = time.Hour       // PROXY_IDLE_TIMEOUT, for bodies: not tested here
	cfg.ReadHeaderTimeout = time.Hour // longer than the limits tested here
	var limits time.Duration
	tp := startProxy(t, cfg, func(s *Server) {
		s.keepAlive, s.pingAfter, s.pingWait = time.Second, 2*time.Second, time.Second
		limits = s.keepAlive + s.pingAfter + s.pingWait
	})
	guard := 10*limits + 30*time.Second // a failure guard, not a measure

	type result struct {
		name string
		err  error // nil: closed as it should be
	}
	cases := []struct {
		name string
		open func(*frameConn) error
	}{
		{"preface and SETTINGS, then nothing", func(*frameConn) error { return nil }},
		{"HEADERS without END_HEADERS", func(c *frameConn) error {
			if err := h2First(tp, c); err != nil {
				return err
			}
			return h2Unfinished(tp, c, 3)
		}},
		{"CONTINUATION trickled", func(c *frameConn) error {
			if err := h2First(tp, c); err != nil {
				return err
			}
			if err := h2Unfinished(tp, c, 3); err != nil {
				return err
			}
			h2Trickle(c, 3)
			return nil
		}},
		{"HEADERS without END_HEADERS, another stream open", func(c *frameConn) error {
			if err := h2First(tp, c); err != nil {
				return err
			}
			if err := h2Upload(tp, c, 3); err != nil {
				return err
			}
			return h2Unfinished(tp, c, 5)
		}},
	}

	// The connection that must stay: an upload and a gRPC call, both
	// waiting for their bodies.
	keep := dialH2(t, tp)
	h2OpenWaiting(t, tp, keep)

	results := make(chan result, len(cases))
	for _, tc := range cases {
		c := dialH2(t, tp)
		go func() {
			if err := tc.open(c); err != nil {
				results <- result{tc.name, fmt.Errorf("sending: %v", err)}
				return
			}
			goaway, err := h2AwaitClose(c, guard)
			if err == nil && goaway > 0 {
				err = fmt.Errorf("got GOAWAY %v, want the connection closed as idle", http2.ErrCode(goaway))
			}
			results <- result{tc.name, err}
		}()
	}
	for range cases {
		if r := <-results; r.err != nil {
			t.Errorf("%s: %v", r.name, r.err)
		}
	}

	// Every other connection is closed: the one whose streams wait for
	// their bodies still carries them.
	h2FinishWaiting(t, keep)
}

// TestH2HeadTimeout: an HTTP/2 request head must arrive within
// PROXY_READ_HEADER_TIMEOUT, as an HTTP/1.1 one, counted from its HEADERS
// frame and not renewed by CONTINUATION frames (nginx's
// client_header_timeout); the connection is then closed with GOAWAY
// PROTOCOL_ERROR. The idle and PING limits are an hour here: only that
// bound can close a connection in time. A head split over CONTINUATION
// frames that ends in time is served, and its connection then kept past
// the bound; an upload and a gRPC call that wait for their bodies longer
// than it are not cut. Before h2conn bounded the block, the first four
// cases stayed open until the guard.
func TestH2HeadTimeout(t *testing.T) {
	t.Parallel()
	const readHeader = 300 * time.Millisecond
	up := h2HeadUpstream(t)
	cfg := testConfig(up)
	cfg.IdleTimeout = time.Hour // PROXY_IDLE_TIMEOUT, for bodies: not tested here
	cfg.ReadHeaderTimeout = readHeader
	cfg.GRPCAddr = "127.0.0.1:0"
	tp := startProxy(t, cfg, func(s *Server) {
		s.keepAlive, s.pingAfter, s.pingWait = time.Hour, time.Hour, time.Hour
	})
	const guard = 30 * time.Second // a failure guard, not a measure

	for _, tc := range []struct {
		name string
		grpc bool // on the PYDIO_GRPC_EXTERNAL port
		open func(*frameConn) error
	}{
		{"HEADERS without END_HEADERS", false, func(c *frameConn) error {
			if err := h2First(tp, c); err != nil {
				return err
			}
			return h2Unfinished(tp, c, 3)
		}},
		{"HEADERS without END_HEADERS, gRPC port", true, func(c *frameConn) error {
			// Any answer: the client has acknowledged the server's
			// SETTINGS by then (h2First).
			if err := c.request(1, h2Fields("POST", tp.GRPCAddr().String(), "/a.B/C",
				"content-type", "application/grpc", "te", "trailers")...); err != nil {
				return err
			}
			if ev, ok := c.waitAnswer(1); !ok {
				return fmt.Errorf("the first call got %v", ev)
			}
			return h2Unfinished(tp, c, 3)
		}},
		{"CONTINUATION trickled", false, func(c *frameConn) error {
			if err := h2First(tp, c); err != nil {
				return err
			}
			if err := h2Unfinished(tp, c, 3); err != nil {
				return err
			}
			h2Trickle(c, 3) // every 100 ms: a bound renewed by each would never pass
			return nil
		}},
		{"HEADERS with bad padding, CONTINUATION trickled", false, func(c *frameConn) error {
			// Padding longer than the payload: net/http resets the
			// stream, but its framer takes the block as open and
			// ignores the CONTINUATION frames that follow, one by one.
			if err := h2First(tp, c); err != nil {
				return err
			}
			c.noPingAck.Store(true)
			c.wmu.Lock()
			err := c.fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersPadded, 3, append([]byte{200}, make([]byte, 10)...))
			c.wmu.Unlock()
			if err != nil {
				return err
			}
			h2Trickle(c, 3)
			return nil
		}},
		{"HEADERS without END_HEADERS, another stream open", false, func(c *frameConn) error {
			if err := h2First(tp, c); err != nil {
				return err
			}
			if err := h2Upload(tp, c, 3); err != nil {
				return err
			}
			return h2Unfinished(tp, c, 5)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			addr := tp.Addr().String()
			if tc.grpc {
				addr = tp.GRPCAddr().String()
			}
			c := dialH2At(t, tp, addr)
			if err := tc.open(c); err != nil {
				t.Fatalf("sending: %v", err)
			}
			goaway, err := h2AwaitClose(c, guard)
			if err != nil {
				t.Fatal(err)
			}
			if got, want := goaway, int64(http2.ErrCodeProtocol); got != want {
				t.Errorf("GOAWAY code: got %d, want %d (PROTOCOL_ERROR)", got, want)
			}
		})
	}

	t.Run("HEADERS with bad padding, its block ended in time, then idle past the bound", func(t *testing.T) {
		t.Parallel()
		c := dialH2(t, tp)
		if err := h2First(tp, c); err != nil {
			t.Fatal(err)
		}
		// Both frames in one write, so that the block ends in time on a
		// loaded machine; net/http resets stream 3 and ignores the
		// CONTINUATION, which must lift the bound.
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		fr.WriteRawFrame(http2.FrameHeaders, http2.FlagHeadersPadded, 3, append([]byte{200}, make([]byte, 10)...))
		fr.WriteContinuation(3, true, nil)
		c.wmu.Lock()
		_, err := c.conn.Write(buf.Bytes())
		c.wmu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		if ev, ok := c.waitAnswer(3); !ok || ev.Type != http2.FrameRSTStream {
			t.Fatalf("the HEADERS frame with bad padding got %v, want RST_STREAM", ev)
		}
		time.Sleep(5 * readHeader)
		// A deadline left armed would not end the connection: the
		// frame net/http then reads, of an unknown type, is ignored
		// between blocks (RFC 9113 §5.5), but h2conn stops inspecting,
		// and net/http answers a connection-specific field with 400
		// where h2conn has the stream reset (§8.2.2).
		if err := c.request(5, pseudo(tp, "GET", "/after", "connection", "keep-alive")...); err != nil {
			t.Fatal(err)
		}
		if ev, ok := c.waitAnswer(5); !ok || ev.Type != http2.FrameRSTStream {
			t.Fatalf("a request with a connection-specific field after the bound got %v, want RST_STREAM (h2conn still inspecting)", ev)
		}
		if err := c.request(7, pseudo(tp, "GET", "/after")...); err != nil {
			t.Fatal(err)
		}
		if ev, ok := c.waitAnswer(7); !ok || ev.Status != "200" {
			t.Fatalf("the request after the bound got %v, want 200", ev)
		}
	})

	t.Run("head in CONTINUATION frames, in time, then a slow body", func(t *testing.T) {
		t.Parallel()
		c := dialH2(t, tp)
		if err := h2First(tp, c); err != nil { // SETTINGS exchanged
			t.Fatal(err)
		}
		// The whole head in one write, so that it arrives in time on a
		// loaded machine: HEADERS and two CONTINUATION frames. Then a
		// DATA frame begun, and its end only once the bound is well
		// past: the bound of a head that ended must not cut its body.
		blk := c.block(pseudo(tp, "PUT", "/split", "content-length", "5", "x-a", "1", "x-b", "2")...)
		var buf bytes.Buffer
		fr := http2.NewFramer(&buf, nil)
		third := len(blk) / 3
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: blk[:third]})
		fr.WriteContinuation(3, false, blk[third:2*third])
		fr.WriteContinuation(3, true, blk[2*third:])
		fr.WriteData(3, true, []byte("hello"))
		wire := buf.Bytes()
		// No other frame (a PING's answer) between the two parts.
		c.wmu.Lock()
		_, err := c.conn.Write(wire[:len(wire)-3])
		if err == nil {
			time.Sleep(5 * readHeader)
			_, err = c.conn.Write(wire[len(wire)-3:])
		}
		c.wmu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
		var got string
		for {
			ev := c.wait(t, "the answer to the split head", func(ev frameEvent) bool {
				return ev.Type == http2.FrameGoAway || ev.StreamID == 3
			})
			switch ev.Type {
			case http2.FrameData:
				got += " " + string(ev.Data)
			default:
				got += ev.String()
			}
			if ev.End || ev.Type == http2.FrameGoAway || ev.Type == http2.FrameRSTStream {
				break
			}
		}
		if want := ":status 200 5"; got != want {
			t.Fatalf("the split head and its slow body: got %q, want %q", got, want)
		}
		// Idle for several times the bound: the keep-alive (an hour
		// here) applies.
		time.Sleep(5 * readHeader)
		if err := c.request(5, pseudo(tp, "GET", "/after")...); err != nil {
			t.Fatalf("the next request: %v", err)
		}
		if got, want := c.answer(t, 5).String(), ":status 200"; got != want {
			t.Errorf("the next request: got %s, want %s", got, want)
		}
	})

	t.Run("upload and gRPC call waiting for their bodies", func(t *testing.T) {
		t.Parallel()
		c := dialH2(t, tp)
		h2OpenWaiting(t, tp, c)
		time.Sleep(5 * readHeader) // their heads ended: no bound runs
		h2FinishWaiting(t, c)
	})
}
