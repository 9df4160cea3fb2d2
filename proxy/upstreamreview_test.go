package proxy

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// connUpstream is a Cells written by hand that owns each connection:
// serve reads the requests itself (their bodies too, or not), and writes
// what it likes. Plain or TLS with a certificate made for the test.
type connUpstream struct {
	ln     net.Listener
	caFile string
	tls    bool
	conns  atomic.Int64
	wg     sync.WaitGroup
	mu     sync.Mutex
	open   map[net.Conn]bool
}

func newConnUpstream(t *testing.T, withTLS bool, serve func(n int64, c net.Conn, br *bufio.Reader)) *connUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &connUpstream{ln: ln, tls: withTLS, open: map[net.Conn]bool{}}
	var conf *tls.Config
	if withTLS {
		cert, err := SelfSigned("127.0.0.1")
		if err != nil {
			t.Fatal(err)
		}
		conf = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"http/1.1"}}
		u.caFile = writeCertPEM(t, cert)
	}
	u.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n := u.conns.Add(1)
			u.mu.Lock()
			u.open[c] = true
			u.mu.Unlock()
			u.wg.Go(func() {
				defer func() {
					c.Close()
					u.mu.Lock()
					delete(u.open, c)
					u.mu.Unlock()
				}()
				nc := c
				if conf != nil {
					tc := tls.Server(c, conf)
					if tc.Handshake() != nil {
						return
					}
					nc = tc
				}
				serve(n, nc, bufio.NewReader(nc))
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		for c := range u.open {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *connUpstream) proxy(t *testing.T) *testProxy {
	cfg := testConfig(nil)
	scheme := "http"
	if u.tls {
		scheme = "https"
	}
	cfg.Upstream = &url.URL{Scheme: scheme, Host: u.ln.Addr().String()}
	cfg.UpstreamCAFile = u.caFile
	return startProxy(t, cfg)
}

func topologies() []struct {
	name string
	tls  bool
} {
	return []struct {
		name string
		tls  bool
	}{{"http", false}, {"https", true}}
}

// TestUpstreamReviewResponseFraming: answers whose framing is unusual but
// valid pass through whole, to HTTP/1.1 and HTTP/2 clients, and the
// connection they came on serves the next request right.
func TestUpstreamReviewResponseFraming(t *testing.T) {
	t.Parallel()
	answers := map[string]string{
		"/trailers":  "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;ext=1\r\nhello\r\n6;a=\"b\"\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n",
		"/cl-and-te": "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
		"/http10":    "HTTP/1.0 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
		"/fold":      "HTTP/1.1 200 OK\r\nX-Folded: hello\r\n world\r\nContent-Length: 11\r\n\r\nhello world",
		"/1xx":       "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
	}
	// Answers whose framing is broken or unusual: what the client gets. A
	// 204 or 304 with a Content-Length (allowed on a 304) loses it: Go's
	// HTTP/2 client took the empty answer for one cut short.
	odd := map[string]string{
		"/cl-same":     `200 "hello world"`,
		"/cl-conflict": `502 "cells-proxy: upstream unavailable\n"`,
		"/204-body":    `204 ""`,
		"/304-length":  `304 ""`,
		"/http10-eof":  `200 "hello world"`,
	}
	oddAnswers := map[string]string{
		"/cl-same":     "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 11\r\n\r\nhello world",
		"/cl-conflict": "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 12\r\n\r\nhello world",
		"/204-body":    "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
		"/304-length":  "HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\nEtag: \"x\"\r\n\r\n",
		"/http10-eof":  "HTTP/1.0 200 OK\r\n\r\nhello world",
	}
	for _, tc := range topologies() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			up := newConnUpstream(t, tc.tls, func(n int64, c net.Conn, br *bufio.Reader) {
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body)
					if a, ok := oddAnswers[req.URL.Path]; ok {
						io.WriteString(c, a)
						if req.URL.Path == "/http10-eof" {
							return
						}
						continue
					}
					a, ok := answers[req.URL.Path]
					if !ok {
						a = fmt.Sprintf("HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nc%03d", n)
					}
					io.WriteString(c, a)
				}
			})
			tp := up.proxy(t)
			for _, cl := range h1h2Clients(tp) {
				for path, want := range odd {
					res, body, err := fetch(cl.c, "GET", tp.URL+path)
					if err != nil {
						t.Errorf("%s %s: %v", cl.name, path, err)
						continue
					}
					if got := fmt.Sprintf("%d %q", res.StatusCode, body); got != want {
						t.Errorf("%s %s: %s, want %s", cl.name, path, got, want)
					}
					if _, body := getBody(t, cl.c, "GET", tp.URL+"/next"); !strings.HasPrefix(body, "c") {
						t.Errorf("%s after %s: %q", cl.name, path, body)
					}
				}
				// An upload's answer (the Transport's path).
				req, _ := http.NewRequest("PUT", tp.URL+"/204-body", strings.NewReader(strings.Repeat("u", 64<<10)))
				if res, err := cl.c.Do(req); err != nil {
					t.Errorf("%s PUT answered 204 with a length: %v", cl.name, err)
				} else if b, err := io.ReadAll(res.Body); err != nil || res.StatusCode != 204 {
					t.Errorf("%s PUT answered 204 with a length: %d %q %v", cl.name, res.StatusCode, b, err)
				}
				for path := range answers {
					res, body := getBody(t, cl.c, "GET", tp.URL+path)
					if res.StatusCode != 200 || body != "hello world" {
						t.Errorf("%s %s: %d %q, want 200 \"hello world\"", cl.name, path, res.StatusCode, body)
					}
					if path == "/trailers" && res.Trailer.Get("X-Sum") != "42" {
						t.Errorf("%s %s: trailers %v", cl.name, path, res.Trailer)
					}
					if _, body := getBody(t, cl.c, "GET", tp.URL+"/next"); !strings.HasPrefix(body, "c") {
						t.Errorf("%s after %s: %q", cl.name, path, body)
					}
				}
			}
			_ = time.Second
		})
	}
}
