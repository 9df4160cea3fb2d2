package proxy

import (
	"log/slog"
	"net/http"
	"strconv"
	"time"
)

// redirect serves the plain HTTP port: 301 to the same target on https
// for GET and HEAD, 308 for every other method, never contacting Cells. A
// Host outside PROXY_SERVER_NAMES gets 404, as nginx's default server in
// the classic setup.
func (s *Server) redirect(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	cw := &countingWriter{ResponseWriter: w}
	if s.fwd.probeCameBack(r) {
		// The readiness probe: CELLS_UPSTREAM is the public http://
		// URL, which leads here. Answered as the public port answers
		// it (probeHeader), so that the probe says so rather than
		// taking the redirect for Cells' answer.
		w.Header().Set(probeHeader, s.fwd.probeToken)
		http.Error(w, loopAnswer, http.StatusLoopDetected)
		return
	}
	status := s.redirectTo(cw, r)
	if r.Method == http.MethodHead {
		cw.n = 0 // net/http discards a HEAD response's body
	}
	if s.cfg.AccessLog {
		// The access log's line, as for the proxied requests.
		s.log.LogAttrs(r.Context(), slog.LevelInfo, "request",
			slog.String("proto", "redirect"),
			slog.String("method", r.Method),
			slog.String("host", r.Host),
			slog.String("path", redactPath(r)),
			slog.Int("status", status),
			slog.Int64("bytes_in", 0),
			slog.Int64("bytes_out", cw.n),
			slog.Duration("duration", time.Since(start)),
			slog.String("client", r.RemoteAddr),
		)
	}
}

// countingWriter counts the body bytes written, for the access log.
type countingWriter struct {
	http.ResponseWriter
	n int64
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

// redirectTo answers r and returns the status.
func (s *Server) redirectTo(w http.ResponseWriter, r *http.Request) int {
	if s.cfg.ACMEWebroot != "" && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		// On any Host: the name being validated may not be in
		// PROXY_SERVER_NAMES yet, and a token is public.
		if token, ok := acmeToken(r.URL.Path); ok {
			return s.serveChallenge(w, r, token)
		}
	}
	host, known := hostOnly(r.Host), s.fwd.hostAllowed(r.Host)
	switch {
	case r.Host == "" && r.ProtoMajor == 1 && r.ProtoMinor == 0 && len(s.cfg.ServerNames) > 0:
		// HTTP/1.0 has no Host field: the site's first name, as the
		// public port gives it, and as nginx's $host falls back to
		// server_name. A health check (HAProxy's "OPTIONS / HTTP/1.0")
		// then sees a redirect, not a 404.
		host, known = s.cfg.ServerNames[0], true
	case host == "":
		// No name to send the client to (an HTTP/1.1 empty Host, an
		// HTTP/2 preface in clear): the 404 below blamed
		// PROXY_SERVER_NAMES, even unset. Said as the public port says it.
		http.Error(w, "cells-proxy: missing Host", http.StatusBadRequest)
		return http.StatusBadRequest
	}
	if !known {
		// Said as the HTTPS port's 421 says it: the operator whose
		// browser tried http:// first learns which setting to change.
		http.Error(w, "cells-proxy: unknown host (PROXY_SERVER_NAMES)", http.StatusNotFound)
		return http.StatusNotFound
	}
	target := "https://" + bracketIPv6(host)
	if p := s.cfg.RedirectPort; p != 443 {
		target += ":" + strconv.Itoa(p)
	}
	uri := r.RequestURI
	if len(uri) == 0 || uri[0] != '/' {
		uri = requestPath(r)
		if uri == "*" {
			// GET * names no resource (net/http answers OPTIONS *
			// itself), and https://host* would be no URL.
			uri = "/"
		}
		if r.URL.RawQuery != "" {
			uri += "?" + r.URL.RawQuery
		}
	}
	w.Header().Set("Location", target+uri)
	// 301 is what nginx's classic "return 301" gives and what every client
	// caches. For other methods clients may, and Go's http.Client, curl -L
	// and browsers do, follow a 301 with a GET and no body: an upload sent
	// to http:// would be dropped without an error. 308 (RFC 9110 §15.4.9)
	// makes them send the same method and body again to https, as
	// httprouter and Traefik do.
	status := http.StatusMovedPermanently
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		status = http.StatusPermanentRedirect
	}
	w.WriteHeader(status)
	return status
}

func bracketIPv6(host string) string {
	for i := 0; i < len(host); i++ {
		if host[i] == ':' {
			return "[" + host + "]"
		}
	}
	return host
}
