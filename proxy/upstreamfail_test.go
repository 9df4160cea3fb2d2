package proxy

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cells-proxy/cells-proxy/internal/testport"
)

// serveAt starts a plain HTTP/1.1 upstream on addr, retrying while the
// port is still held by the previous one. It stops when the test ends.
func serveAt(t *testing.T, addr string, h http.Handler) *http.Server {
	t.Helper()
	var ln net.Listener
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; {
		if ln, err = net.Listen("tcp", addr); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("listening again on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	srv := &http.Server{Handler: h, ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	return srv
}

// TestUpstreamRestart kills Cells under load and starts it again on the
// same port: during the outage every request gets a fast 502 (a refused
// connect takes microseconds; the bound, 5 s, is half the dial timeout a
// request that waited for Cells would take, and far from what a stalled
// test process adds), service returns as soon as Cells listens again, and
// no request hangs.
func TestUpstreamRestart(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	// The port stays Cells' while it is down: no other test's listener
	// may take it in between.
	addr := testport.Reserve(t)
	up := serveAt(t, addr, ok)
	cfg := testConfig(nil)
	cfg.Upstream = &url.URL{Scheme: "http", Host: addr}
	tp := startProxy(t, cfg)

	var (
		mu        sync.Mutex
		statuses  = map[int]int{}
		slowest   time.Duration // of the 502s
		clientErr []error
		ok200     atomic.Int32
		bad502    atomic.Int32
	)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 4 {
		c := tp.H1
		if w%2 == 1 {
			c = tp.H2
		}
		wg.Go(func() {
			for i := 0; i < 20000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				res, err := c.Get(tp.URL + "/a/frontend/bootconf")
				if err == nil {
					_, err = io.Copy(io.Discard, res.Body)
					res.Body.Close()
				}
				took := time.Since(start)
				mu.Lock()
				if err != nil {
					clientErr = append(clientErr, err)
				} else {
					statuses[res.StatusCode]++
					if res.StatusCode == http.StatusBadGateway {
						slowest = max(slowest, took)
					}
				}
				mu.Unlock()
				switch {
				case err != nil:
				case res.StatusCode == http.StatusOK:
					ok200.Add(1)
				case res.StatusCode == http.StatusBadGateway:
					bad502.Add(1)
				}
			}
		})
	}
	waitFor := func(what string, cond func() bool) time.Duration {
		t.Helper()
		start := time.Now()
		for !cond() {
			if time.Since(start) > 20*time.Second {
				close(stop)
				wg.Wait()
				t.Fatalf("waiting for %s: timed out", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
		return time.Since(start)
	}

	waitFor("20 answers from Cells", func() bool { return ok200.Load() >= 20 })
	up.Close() // Cells dies: its listener and every connection
	base502 := bad502.Load()
	waitFor("50 answers during the outage", func() bool { return bad502.Load() >= base502+50 })
	serveAt(t, addr, ok) // Cells is back on the same port
	base200 := ok200.Load()
	back := waitFor("service to return", func() bool { return ok200.Load() >= base200+20 })
	close(stop)
	wg.Wait()
	tp.H1.CloseIdleConnections()
	tp.H2.CloseIdleConnections()

	t.Logf("statuses %v; slowest 502 %v; service back %v after the restart; client errors %v", statuses, slowest, back, clientErr)
	for s := range statuses {
		if s != http.StatusOK && s != http.StatusBadGateway {
			t.Errorf("got status %d, want only 200 and 502", s)
		}
	}
	if slowest > 5*time.Second {
		t.Errorf("slowest 502 took %v, want each well within the 10 s dial timeout", slowest)
	}
	// Only a request in flight when Cells died may break mid-answer: at
	// most one per worker.
	if len(clientErr) > 4 {
		t.Errorf("%d requests failed at the client (%v), want at most the 4 in flight when Cells died", len(clientErr), clientErr[0])
	}
}

// TestUpstreamBreaksMidResponse has Cells break off a response after its
// head: half of a declared Content-Length, or a chunked body without its
// last chunk. The client sees an error (HTTP/1.1: unexpected EOF, HTTP/2:
// a reset stream), never a short body that looks complete.
func TestUpstreamBreaksMidResponse(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, resp string
	}{
		{"content-length", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: application/octet-stream\r\n\r\n" + string(make([]byte, 50))},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/zip\r\n\r\n5\r\nhello\r\n"},
		{"chunked, broken chunk", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				conn, brw, err := http.NewResponseController(w).Hijack()
				if err != nil {
					t.Errorf("hijack: %v", err)
					return
				}
				brw.WriteString(tt.resp)
				brw.Flush()
				conn.Close()
			}))
			tp := startProxy(t, testConfig(up))
			for _, c := range []struct {
				name   string
				client *http.Client
			}{{"h1", tp.H1}, {"h2", tp.H2}} {
				res, err := c.client.Get(tp.URL + "/io/bucket/big.zip")
				var body []byte
				if err == nil {
					body, err = io.ReadAll(res.Body)
					res.Body.Close()
				}
				if err == nil {
					t.Errorf("%s: status %d and a clean %d-byte body, want an error", c.name, res.StatusCode, len(body))
					continue
				}
				t.Logf("%s: %v", c.name, err)
				if c.name == "h1" && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Errorf("h1: error %v, want unexpected EOF", err)
				}
			}
		})
	}
}

// TestUpstreamSilent has Cells accept connections and never answer: each
// request gets 504 once PROXY_IDLE_TIMEOUT passes, and a burst of 50 such
// requests leaves no goroutine behind.
func TestUpstreamSilent(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held sync.WaitGroup
	var conns sync.Map
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			held.Go(func() { io.Copy(io.Discard, c); c.Close() })
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-accepted
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		held.Wait()
	})

	cfg := testConfig(nil)
	cfg.Upstream = &url.URL{Scheme: "http", Host: ln.Addr().String()}
	cfg.IdleTimeout = time.Second
	tp := startProxy(t, cfg)

	// Warm both clients up so their connections are part of the baseline.
	for _, c := range []*http.Client{tp.H1, tp.H2} {
		if res, err := c.Get(tp.URL + "/warm"); err == nil {
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
	}
	tp.H1.CloseIdleConnections()
	tp.H2.CloseIdleConnections()
	time.Sleep(100 * time.Millisecond)
	before := runtime.NumGoroutine()

	var wg sync.WaitGroup
	results := make(chan string, 50)
	for i := range 50 {
		c := tp.H1
		if i%2 == 1 {
			c = tp.H2
		}
		wg.Go(func() {
			start := time.Now()
			res, err := c.Get(tp.URL + fmt.Sprintf("/silent/%d", i))
			if err != nil {
				results <- err.Error()
				return
			}
			body, _ := io.ReadAll(res.Body)
			res.Body.Close()
			if took := time.Since(start); took > 20*time.Second {
				results <- fmt.Sprintf("504 after %v", took)
				return
			}
			if res.StatusCode != http.StatusGatewayTimeout {
				results <- fmt.Sprintf("%s %s (%q, %v, after %v)", res.Proto, res.Status, body, res.Header, time.Since(start))
				return
			}
			results <- res.Status
		})
	}
	wg.Wait()
	close(results)
	for r := range results {
		if r != "504 Gateway Timeout" {
			t.Errorf("silent upstream: got %q, want 504 Gateway Timeout within 20 s", r)
		}
	}
	tp.H1.CloseIdleConnections()
	tp.H2.CloseIdleConnections()

	var after int
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if after = runtime.NumGoroutine(); after <= before+25 || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("goroutines: %d before the burst, %d after", before, after)
	if after > before+25 { // a pile-up is at least one per request: 50
		t.Errorf("%d goroutines after 50 timed-out requests, %d before: they pile up", after, before)
	}
}
