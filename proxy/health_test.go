package proxy

import (
	"bufio"
	"context"
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

	"github.com/cells-proxy/cells-proxy/internal/testport"
)

// TestReadyzCallerGone: healthchecks that arrive together share one probe
// of Cells. The one that started it giving up (Docker killing a slow
// healthcheck, a load balancer's timeout) must not turn the others'
// answer into "context canceled" while Cells is fine.
func TestReadyzCallerGone(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("User-Agent") == "cells-proxy-healthcheck" {
			// Cells is slow to answer the probe: it is in flight until
			// the test says.
			once.Do(func() { close(arrived) })
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		io.WriteString(w, "ok")
	}))
	tp := startProxy(t, testConfig(up))
	health := tp.HealthAddr().String()

	// The first caller starts the probe.
	first, err := net.Dial("tcp", health)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	if _, err := io.WriteString(first, "GET /readyz HTTP/1.1\r\nHost: "+health+"\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	<-arrived

	// The second comes while the probe runs.
	second := make(chan int, 1)
	go func() {
		c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
		res, err := c.Get("http://" + health + "/readyz")
		if err != nil {
			t.Errorf("second GET /readyz: %v", err)
			second <- 0
			return
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		second <- res.StatusCode
	}()

	// The first goes away: its end of the connection closes, which
	// cancels its request at the proxy. The proxy then answers it and
	// closes: once that is read, the proxy is done with the first caller.
	if err := first.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if res, err := http.ReadResponse(bufio.NewReader(first), nil); err == nil {
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
	}
	io.Copy(io.Discard, first)

	// Cells answers the probe.
	close(release)
	if got, want := <-second, http.StatusOK; got != want {
		t.Errorf("/readyz for the caller that stayed = %d, want %d", got, want)
	}
	if got, want := readyz(t, tp), http.StatusOK; got != want {
		t.Errorf("/readyz after = %d, want %d", got, want)
	}
}

// TestReadyzNamesTheFix: when a setting is why Cells cannot be reached,
// what `cells-proxy healthcheck` prints (docker inspect shows it) names
// the variable to change, as the request log does. It used to print Go's
// error alone: "x509: certificate signed by unknown authority", "http:
// server gave HTTP response to HTTPS client".
func TestReadyzNamesTheFix(t *testing.T) {
	named := namedUpstream(t, "cells.internal")
	plain := newUpstream(t, upPlain, &recorder{})
	for _, tc := range []struct {
		name, upstream, caFile, want string
	}{
		{"untrusted", named.Addr(), named.CAFile, "CELLS_UPSTREAM_SERVER_NAME"},
		{"clear", plain.Addr(), "", "CELLS_UPSTREAM=http://"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(nil)
			cfg.Upstream = &url.URL{Scheme: "https", Host: tc.upstream}
			cfg.UpstreamCAFile = tc.caFile
			tp := startProxy(t, cfg)
			_, err := Probe(context.Background(), tp.HealthAddr().String())
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("healthcheck: %v, want a line naming %s", err, tc.want)
			}
		})
	}
}

// TestProbeServiceName: the health listener takes a service name as its
// port (net.Listen looks it up: 127.0.0.1:http is 127.0.0.1:80), as every
// listener does, and so must the healthcheck; it put the name in its URL
// and answered `parse "http://127.0.0.1:http/readyz": invalid port`, with
// the proxy serving there. No test may listen on port 80: the probe must
// reach the dial to port 80, or whatever answers there.
func TestProbeServiceName(t *testing.T) {
	_, err := Probe(context.Background(), "127.0.0.1:http")
	if err != nil && !strings.Contains(err.Error(), "127.0.0.1:80") && !strings.HasPrefix(err.Error(), "not ready") {
		t.Errorf("Probe(127.0.0.1:http): %v, want it to ask 127.0.0.1:80", err)
	}
}

// TestListeningLines: every listener says where it listens at start, the
// health listener too (an operator whose healthcheck fails looks for it).
func TestListeningLines(t *testing.T) {
	tp := startProxy(t, testConfig(newUpstream(t, upTLS, &recorder{})))
	// Run logs them as it starts each server, after startProxy returns.
	var logged, missing string
	waitFor(t, 10*time.Second, func() bool {
		logged, missing = tp.Log.String(), ""
		for _, addr := range []net.Addr{tp.Addr(), tp.RedirectAddr(), tp.HealthAddr()} {
			if !strings.Contains(logged, "msg=listening addr="+addr.String()+" ") {
				missing = addr.String()
			}
		}
		return missing == ""
	}, func() string { return fmt.Sprintf("no listening line for %s within 10 s:\n%s", missing, logged) })
}

// TestReadyzGRPCPortRefused: topology B, Cells in clear answering on its
// main port but not started with CELLS_GRPC_EXTERNAL, so nothing listens on
// the gRPC port cells-proxy forwards to. /readyz stays 200 (browsers work)
// but says Cells Sync cannot connect, and the log says why once. A gRPC
// port that listens draws no such word.
func TestReadyzGRPCPortRefused(t *testing.T) {
	up := newUpstream(t, upPlain, &recorder{})
	grpcUp := newUpstream(t, upH2C, &recorder{})
	for _, tc := range []struct {
		name, grpc string
		warned     bool
	}{
		{"refused", refusedAddr(t), true},
		{"listening", grpcUp.Addr(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := testConfig(up)
			cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: tc.grpc}
			tp := startProxy(t, cfg)
			for range 3 {
				ok, detail, _ := tp.health.probe(t.Context())
				if !ok || strings.Contains(detail, "Cells Sync cannot connect") != tc.warned {
					t.Errorf("probe = %v %q, want ready, naming the gRPC port: %v", ok, detail, tc.warned)
				}
			}
			const warning = "refuses connections on its gRPC port"
			if n, want := strings.Count(tp.Log.String(), warning), map[bool]int{true: 1}[tc.warned]; n != want {
				t.Errorf("warning logged %d times over three probes, want %d:\n%s", n, want, tp.Log)
			}
			if tc.warned {
				_, port, _ := net.SplitHostPort(tc.grpc)
				if !strings.Contains(tp.Log.String(), "CELLS_GRPC_EXTERNAL="+port) {
					t.Errorf("the warning does not name CELLS_GRPC_EXTERNAL=%s:\n%s", port, tp.Log)
				}
			}
		})
	}
}

// TestWatchStart: with nobody asking /readyz (no HEALTHCHECK: systemd, a
// compose file without one), the proxy probes Cells from the start until
// Cells answers, and logs what /readyz would have said: a line once Cells
// answers, after which it stops; TLS where CELLS_UPSTREAM says http; a
// CELLS_UPSTREAM that leads back to the proxy, whose first client then gets
// 508 instead of going round. While Cells is down it asks again, silently.
func TestWatchStart(t *testing.T) {
	const every = 20 * time.Millisecond
	watch := func(s *Server) { s.watchEvery = every }
	logged := func(t *testing.T, tp *testProxy, line string) {
		t.Helper()
		waitFor(t, 10*time.Second, func() bool { return strings.Contains(tp.Log.String(), line) }, func() string {
			return fmt.Sprintf("never logged %q:\n%s", line, tp.Log)
		})
	}
	// ok is a Cells that counts the probes it answers.
	ok := func(probes *atomic.Int32) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Header.Get("User-Agent") == "cells-proxy-healthcheck" {
				probes.Add(1)
			}
			io.WriteString(w, "ok")
		})
	}

	t.Run("cells answers", func(t *testing.T) {
		t.Parallel()
		var probes atomic.Int32
		tp := startProxy(t, testConfig(newUpstream(t, upTLS, ok(&probes))), watch)
		logged(t, tp, `msg="cells answers"`)
		// Past the probe's cache and ten more intervals: a watch that
		// went on would have probed again.
		time.Sleep(readyCache + 10*every)
		if n := probes.Load(); n != 1 {
			t.Errorf("Cells got %d probes, want 1: the watch stops once Cells answers", n)
		}
	})

	t.Run("cells down, then up", func(t *testing.T) {
		t.Parallel()
		addr := testport.Reserve(t)
		cfg := testConfig(nil)
		cfg.Upstream = &url.URL{Scheme: "http", Host: addr}
		tp := startProxy(t, cfg, watch)
		const started = `health="/livez /readyz"` // the last line of the start
		logged(t, tp, started)
		time.Sleep(5 * every)
		// All that follows the start's last line: the watch begins after
		// it, and its first probe may well have ended by the time the
		// line was seen.
		_, after, _ := strings.Cut(tp.Log.String(), started)
		if _, after, _ = strings.Cut(after, "\n"); after != "" {
			t.Errorf("Cells down at the start was logged:\n%s", after)
		}
		serveAt(t, addr, ok(new(atomic.Int32)))
		logged(t, tp, `msg="cells answers"`)
	})

	t.Run("tls where http", func(t *testing.T) {
		t.Parallel()
		up := newUpstream(t, upTLS, ok(new(atomic.Int32)))
		cfg := testConfig(up)
		cfg.Upstream = &url.URL{Scheme: "http", Host: cfg.Upstream.Host}
		tp := startProxy(t, cfg, watch)
		logged(t, tp, "cells speaks TLS where CELLS_UPSTREAM says http")
		time.Sleep(5 * every)
		if n := strings.Count(tp.Log.String(), "cells speaks TLS"); n != 1 || strings.Contains(tp.Log.String(), "cells answers") {
			t.Errorf("want the warning once and no \"cells answers\", got %d warnings:\n%s", n, tp.Log)
		}
	})

	t.Run("certificate not trusted", func(t *testing.T) {
		t.Parallel()
		cfg := testConfig(newUpstream(t, upTLS, ok(new(atomic.Int32))))
		cfg.UpstreamCAFile = "" // the system's roots, which do not hold Cells' CA
		tp := startProxy(t, cfg, watch)
		const warning = "cells unreachable: upstream certificate not trusted: set CELLS_UPSTREAM_CA_FILE"
		logged(t, tp, warning)
		// Past the probe's cache: probed again, and not logged again.
		time.Sleep(readyCache + 5*every)
		if n := strings.Count(tp.Log.String(), warning); n != 1 {
			t.Errorf("logged %d times, want once while it lasts:\n%s", n, tp.Log)
		}
	})

	// The loop, through the public port (CELLS_UPSTREAM the public https
	// URL) or through the redirect port (the public http:// URL, whose
	// 301 or 404 the probe took for Cells' answer). The probe's own
	// requests get no access line: the ERROR says it once, where an access
	// line would come every probe.
	for _, port := range []string{"public", "redirect"} {
		t.Run("loop through the "+port+" port", func(t *testing.T) {
			t.Parallel()
			relay := newLoopRelay(t)
			cfg := relay.config(port == "public")
			cfg.TLS, cfg.AccessLog = true, true
			tp := startProxy(t, cfg, func(s *Server) {
				to := s.Addr()
				if port == "redirect" {
					to = s.RedirectAddr()
				}
				relay.target.Store(to.String())
				watch(s)
			})
			logged(t, tp, "CELLS_UPSTREAM leads back to cells-proxy itself")
			res, err := tp.H1.Get(tp.URL + "/a/frontend/state")
			if err != nil {
				t.Fatal(err)
			}
			res.Body.Close()
			if res.StatusCode != http.StatusLoopDetected {
				t.Errorf("the first request = %d, want 508 with no /readyz ever asked", res.StatusCode)
			}
			logged(t, tp, "path=/a/frontend/state")
			if n := strings.Count(tp.Log.String(), "msg=request"); n != 1 {
				t.Errorf("%d access lines, want the client's alone:\n%s", n, tp.Log)
			}
		})
	}
}

// TestReadyzCellsStarting: a Cells that is still starting answers its main
// port with 303 to starting.html. That is an answer, but not "ready": the
// proxy says 503, and the healthcheck says why.
func TestReadyzCellsStarting(t *testing.T) {
	var started atomic.Bool
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !started.Load() {
			http.Redirect(w, r, "/starting.html", http.StatusSeeOther)
			return
		}
		io.WriteString(w, "ok")
	}))
	tp := startProxy(t, testConfig(up))
	if got, want := readyz(t, tp), http.StatusServiceUnavailable; got != want {
		t.Errorf("/readyz while Cells answers 303 to starting.html = %d, want %d", got, want)
	}
	if _, err := Probe(context.Background(), tp.HealthAddr().String()); err == nil || !strings.Contains(err.Error(), "starting") {
		t.Errorf("healthcheck while Cells starts: %v, want a line saying Cells is starting", err)
	}
	// The control, on a proxy of its own (the first keeps its answer for
	// readyCache): the same Cells, started, is ready.
	started.Store(true)
	if got, want := readyz(t, startProxy(t, testConfig(up))), http.StatusOK; got != want {
		t.Errorf("/readyz once Cells serves = %d, want %d", got, want)
	}
}
