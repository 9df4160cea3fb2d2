package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestHealthcheckSlowCellsSilentGRPCPort: topology B, Cells slow to answer
// its front page (1.7 s, within the probe's 2 s) and its gRPC port dropping
// SYNs (a firewall, a full accept queue). The probe's HTTP request and its
// gRPC dial each stayed within their own bound, but one after the other
// they took 2.7 s, past the healthcheck's 2.5 s: `cells-proxy healthcheck`
// printed "proxy not answering ... context deadline exceeded" while Cells
// was fine, and Docker could record a timeout. The whole probe now runs
// under one deadline, so the healthcheck gets the real answer; a gRPC port
// that did not answer in the time left is not called refused.
func TestHealthcheckSlowCellsSilentGRPCPort(t *testing.T) {
	// Long enough that a dial with the second the gRPC check used to
	// have ends past ProbeTimeout, short enough that Cells still answers
	// within the probe's deadline, 300 ms later.
	const delay = ProbeTimeout - 800*time.Millisecond
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("User-Agent") == "cells-proxy-healthcheck" {
			select {
			case <-time.After(delay):
			case <-r.Context().Done():
				return
			}
		}
		io.WriteString(w, "ok")
	}))
	cfg := testConfig(up)
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: silentAddr(t)}
	tp := startProxy(t, cfg)

	got, err := Probe(context.Background(), tp.HealthAddr().String())
	if err != nil || !strings.HasPrefix(got, "ok: ") {
		t.Fatalf("healthcheck = %q, %v; want \"ok: ...\"", got, err)
	}
	if strings.Contains(got, "Cells Sync cannot connect") || strings.Contains(tp.Log.String(), "refuses connections") {
		t.Errorf("a gRPC port that did not answer in time was called refused: %q\n%s", got, tp.Log)
	}
}

// silentAddr is a 127.0.0.1 address where a connection attempt hangs, as
// behind a firewall that drops SYNs: a listener that never accepts, its
// accept queue full (Linux then drops the SYN). The test is skipped if a
// dial there does not hang.
func silentAddr(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	// A backlog of 0 holds a connection or two; each dial that completes
	// fills it further, until one hangs.
	d := &net.Dialer{Timeout: 200 * time.Millisecond}
	for range 8 {
		c, err := d.Dial("tcp", addr)
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			return addr
		}
		if err != nil {
			t.Skipf("filling the accept queue of %s: %v", addr, err)
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Skipf("a dial to %s with its accept queue full does not hang on this kernel", addr)
	return ""
}
