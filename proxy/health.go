package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// health serves the health listener (PROXY_HEALTH_ADDR, loopback unless
// set otherwise, as for a kubelet that probes the pod's IP):
//
//	/livez   200 while the process answers, its drain included.
//	/readyz  200 when Cells answers on its main port; 503 while it is
//	         starting (303 to starting.html), down, or the proxy drains.
//
// `cells-proxy healthcheck` asks /readyz.
type health struct {
	s      *Server
	client *http.Client

	mu       sync.Mutex
	checked  time.Time
	ok       bool
	detail   string
	inflight chan struct{} // closed when the probe running ends; nil if none runs
	answered bool          // the last probe had Cells' own answer (probe)

	// warned is the misconfiguration last logged (warnTLS, warnLoop,
	// warnGRPC, or a fix of classify's), until a probe sees otherwise: each
	// is logged once while it lasts. Probes run one at a time (inflight),
	// so only the one running touches it.
	warned string
}

// The misconfigurations the probe recognises.
const (
	warnTLS  = "tls"
	warnLoop = "loop"
	warnGRPC = "grpc"
)

// probeHeader carries the forwarder's probeToken on the readiness probe's
// request to CELLS_UPSTREAM. A request that arrives on the public port with
// it is the probe come back: CELLS_UPSTREAM leads to cells-proxy itself
// (the public URL, Cells' CELLS_SITE_EXTERNAL, where Cells' own address was
// meant). The forwarder answers it 508 with the token, instead of sending
// it round again until the descriptors run out.
const probeHeader = "X-Cells-Proxy-Probe"

// loopAnswer is the 508's text, to the probe come back and, while the probe
// sees the loop, to every request.
const loopAnswer = "cells-proxy: CELLS_UPSTREAM leads back to cells-proxy"

// readyCache bounds how often a busy healthcheck reaches Cells.
const readyCache = 2 * time.Second

// probeTimeout bounds a readiness probe from its start to its answer, the
// request to Cells and the dial of its gRPC port together, within
// ProbeTimeout, so that the healthcheck prints why. Each step bounded on
// its own, a slow answer followed by a gRPC port dropping SYNs took longer,
// and the healthcheck printed its own timeout instead.
const probeTimeout = ProbeTimeout - 500*time.Millisecond

func newHealth(s *Server) *health {
	return &health{
		s: s,
		client: &http.Client{
			Transport: s.fwd.httpTransport,
			// A starting Cells redirects to starting.html: see it, do not follow.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
			// No Timeout of its own: probe's deadline bounds the request
			// with the rest of the probe.
		},
	}
}

func (h *health) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	draining := h.s.draining.Load()
	switch r.URL.Path {
	case "/livez":
		// Alive while it drains too: the drain finishes uploads and
		// calls in flight, and a liveness probe that failed then would
		// have an orchestrator kill the process, and cut them. /readyz
		// is the one that takes it out of rotation.
		if draining {
			fmt.Fprintln(w, "ok: draining")
			return
		}
		fmt.Fprintln(w, "ok")
	case "/readyz":
		if draining {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		ok, detail := h.ready(r.Context())
		if !ok {
			http.Error(w, detail, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, detail)
	default:
		http.NotFound(w, r)
	}
}

// ready is the cached answer, or that of a probe that the callers arriving
// while it runs share. The probe runs under none of their contexts: a
// healthcheck that gives up must not make the others' answer "context
// canceled" while Cells is fine. Each caller stops waiting when its own
// context ends.
func (h *health) ready(ctx context.Context) (bool, string) {
	h.mu.Lock()
	if time.Since(h.checked) < readyCache {
		defer h.mu.Unlock()
		return h.ok, h.detail
	}
	done := h.inflight
	if done == nil {
		done = make(chan struct{})
		h.inflight = done
		go func() {
			// Its own deadline (probeTimeout) bounds it; the stop ends it.
			ok, detail, answered := h.probe(h.s.baseCtx)
			h.mu.Lock()
			h.ok, h.detail, h.answered, h.checked, h.inflight = ok, detail, answered, time.Now(), nil
			h.mu.Unlock()
			close(done)
		}()
	}
	h.mu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
		return false, "readiness probe abandoned: " + ctx.Err().Error()
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ok, h.detail
}

// probe asks Cells for its front page, as a browser would; answered: Cells
// itself answered, neither starting nor failing (a 5xx), or with the 400
// of its TLS port to a request in clear.
func (h *health) probe(ctx context.Context) (ok bool, detail string, answered bool) {
	// One deadline for all the steps: the gRPC dial, after Cells
	// answered, gets what is left.
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	up := h.s.cfg.Upstream
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, up.String()+"/", nil)
	if err != nil {
		return false, err.Error(), false
	}
	if names := h.s.cfg.ServerNames; len(names) > 0 {
		req.Host = bracketIPv6(names[0])
	}
	req.Header.Set("User-Agent", "cells-proxy-healthcheck")
	req.Header.Set(probeHeader, h.s.fwd.probeToken)
	res, err := h.client.Do(req)
	if err != nil {
		// A setting the likely cause: the fix that the request log
		// gives, not Go's error alone.
		if _, _, fix := h.s.fwd.classify(req, err); fix != "" {
			// A setting, not Cells being down: logged once while it
			// lasts, as the misconfigurations below, so that the start
			// (watchStart) says it before a client meets it.
			if h.warned != fix {
				h.s.log.Warn("cells unreachable: "+fix, "upstream", up.Host)
			}
			h.warned = fix
			return false, "cells unreachable: " + fix, false
		}
		return false, "cells unreachable: " + err.Error(), false
	}
	// Cells keeps TLS (its default) where CELLS_UPSTREAM says http: every
	// client would get this 400 from it.
	tlsPort := up.Scheme == "http" && res.StatusCode == http.StatusBadRequest && startsWith(res.Body, plainToTLS)
	loop := res.StatusCode == http.StatusLoopDetected && res.Header.Get(probeHeader) == h.s.fwd.probeToken
	res.Body.Close()
	loc := res.Header.Get("Location")
	starting := res.StatusCode >= 300 && res.StatusCode < 400 && strings.Contains(loc, "starting")
	answers := !starting && !tlsPort && !loop && res.StatusCode < 500
	answered = answers || tlsPort
	// Each misconfiguration is logged once while it lasts, not at every
	// probe (every 10 s with the image's HEALTHCHECK): /readyz repeats it
	// to whoever asks.
	warn := ""
	switch {
	case tlsPort:
		warn = warnTLS
	case loop:
		warn = warnLoop
	case answers && h.grpcRefused(ctx):
		warn = warnGRPC
	}
	first := warn != "" && warn != h.warned
	h.warned = warn
	h.s.fwd.looping.Store(loop)
	switch {
	case starting:
		return false, "cells is starting", answered
	case tlsPort:
		if first {
			h.s.log.Warn("cells speaks TLS where CELLS_UPSTREAM says http, and clients get its 400: set CELLS_UPSTREAM=https://, with CELLS_UPSTREAM_CA_FILE, or run Cells with CELLS_SITE_NO_TLS=1", "upstream", up.Host)
		}
		return false, "cells speaks TLS on " + up.Host + ": set CELLS_UPSTREAM=https://" + up.Host + " (and CELLS_UPSTREAM_CA_FILE), or run Cells with CELLS_SITE_NO_TLS=1", answered
	case loop:
		if first {
			h.s.log.Error("CELLS_UPSTREAM leads back to cells-proxy itself: requests are refused with 508 until it is set to Cells' own address, such as https://cells:8080, not the public URL", "upstream", up.Host)
		}
		return false, "CELLS_UPSTREAM=" + up.String() + " leads back to cells-proxy itself: set it to Cells' own address, such as https://cells:8080", answered
	case res.StatusCode >= 500:
		return false, fmt.Sprintf("cells answers %d", res.StatusCode), answered
	case warn == warnGRPC:
		// Ready all the same: browsers and cec work; only Cells Sync
		// cannot connect.
		addr := h.s.fwd.grpcUp.addr
		_, port, _ := net.SplitHostPort(addr)
		if first {
			h.s.log.Warn("Cells answers on CELLS_UPSTREAM but refuses connections on its gRPC port, and Cells Sync cannot connect: start Cells with CELLS_GRPC_EXTERNAL="+port+", or set CELLS_GRPC_UPSTREAM to the port it serves gRPC on", "grpc_upstream", addr)
		}
		return true, fmt.Sprintf("ok: cells answers %d; but its gRPC port %s refuses connections: Cells Sync cannot connect", res.StatusCode, addr), answered
	}
	return true, fmt.Sprintf("ok: cells answers %d", res.StatusCode), answered
}

// startProbeEvery spaces watchStart's probes while Cells does not answer.
const startProbeEvery = 5 * time.Second

// watchStart probes Cells from the start until it answers, as the image's
// HEALTHCHECK does every 10 s: a proxy run without one (systemd, a compose
// file without a healthcheck) learns at once what only /readyz would tell,
// and logs it: CELLS_UPSTREAM leading back to the proxy (which arms the
// loop guard before a request goes round), TLS where it says http, Cells
// Sync's port refused. Once Cells has answered, a line says so and the
// probes stop: /readyz probes on demand as before. Unreachable, starting
// or failing, Cells is asked again, without a log line.
func (h *health) watchStart(ctx context.Context, every time.Duration) {
	for {
		ok, detail := h.ready(ctx)
		h.mu.Lock()
		answered := h.answered
		h.mu.Unlock()
		if answered {
			if ok {
				h.s.log.Info("cells answers", "upstream", h.s.cfg.Upstream.Host, "detail", detail)
			}
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

// grpcRefused reports whether Cells' gRPC port, when it is not CELLS_UPSTREAM's
// (topology B: Cells in clear, gRPC on the port of its CELLS_GRPC_EXTERNAL),
// refuses connections while the main port answers: Cells was not given
// that port, the usual reason why Cells Sync cannot connect in that setup.
// A connection that sends nothing is what grpc-go's server ignores without
// a log line (load balancers' TCP checks). A dial that runs out of time
// (SYNs dropped, or the probe's deadline reached) is no refusal: it says
// nothing of the port, and is not warned about.
func (h *health) grpcRefused(ctx context.Context) bool {
	u := h.s.fwd.grpcUp
	if u == nil || h.s.cfg.GRPCUpstream.Host == h.s.cfg.Upstream.Host {
		return false
	}
	// At most a second, and within the probe's deadline (ctx): a refusal
	// comes back at once.
	c, err := (&net.Dialer{Timeout: time.Second}).DialContext(ctx, "tcp", u.addr)
	if err != nil {
		return errors.Is(err, syscall.ECONNREFUSED)
	}
	c.Close()
	return false
}

// plainToTLS begins the body of the 400 that Go's TLS servers, Cells' among
// them, answer to a request sent in clear (net/http's conn.serve).
const plainToTLS = "Client sent an HTTP request to an HTTPS server"

// startsWith reports whether r begins with prefix.
func startsWith(r io.Reader, prefix string) bool {
	b := make([]byte, len(prefix))
	n, _ := io.ReadFull(r, b)
	return string(b[:n]) == prefix
}

// ProbeTimeout bounds Probe below the 3 s the image's HEALTHCHECK and the
// compose file give the command: past that Docker kills it and records a
// timeout, and the operator never sees the line saying what is wrong.
const ProbeTimeout = 2500 * time.Millisecond

// Probe is what `cells-proxy healthcheck` runs: it asks the health listener
// of a running proxy whether it is ready.
func Probe(ctx context.Context, healthAddr string) (string, error) {
	if healthAddr == "" {
		return "", fmt.Errorf("PROXY_HEALTH_ADDR is off: nothing to ask; set it (default 127.0.0.1:8099), or disable the container's healthcheck (compose: healthcheck: disable: true)")
	}
	host, port, err := net.SplitHostPort(healthAddr)
	if err != nil {
		return "", fmt.Errorf("PROXY_HEALTH_ADDR %q: %w", healthAddr, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	// The listener takes a service name as its port (net.Listen looks
	// :http up as :80), as the other listeners do; a URL takes only a
	// number, and the same lookup gives it.
	p, err := net.LookupPort("tcp", port)
	if err != nil {
		return "", fmt.Errorf("PROXY_HEALTH_ADDR %q: %w", healthAddr, err)
	}
	port = strconv.Itoa(p)
	ctx, cancel := context.WithTimeout(ctx, ProbeTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(host, port)+"/readyz", nil)
	if err != nil {
		return "", err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("proxy not answering on %s: %w", healthAddr, err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, 512))
	msg := strings.TrimSpace(string(body))
	if res.StatusCode != http.StatusOK {
		return "", fmt.Errorf("not ready: %s", msg)
	}
	return msg, nil
}
