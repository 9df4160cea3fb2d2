package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http/httpguts"
)

// Errors that end an exchange on the proxy's side, recorded as the cause of
// the request context so that the error handler can tell them apart from a
// client that went away.
var (
	errIdle         = errors.New("no byte moved for PROXY_IDLE_TIMEOUT")
	errGRPCDeadline = errors.New("grpc-timeout expired")
	errShutdown     = errors.New("proxy shutting down")
)

// forwarder sends requests to Cells: HTTP (and websockets) to the main
// upstream, gRPC to the gRPC upstream.
type forwarder struct {
	cfg   *Config
	log   *slog.Logger
	proto string // X-Forwarded-Proto told to Cells for untrusted peers

	httpTarget    *url.URL
	httpTransport *upstreamTransport // http.Transport, renewed when CELLS_UPSTREAM_CA_FILE changes
	httpUp        *h1Upstream        // small requests and websocket handshakes; the rest to httpTransport
	http          *httputil.ReverseProxy

	grpcTarget *url.URL      // nil: no gRPC upstream
	grpcUp     *grpcUpstream // HTTP/2 to Cells' gRPC port; calls go through callGRPC
	// grpcCut ends when the drain's gRPC grace has passed: a call still
	// writing to its client (one that stopped reading) is cut.
	grpcCut context.Context
	cutGRPC context.CancelFunc

	ws *tunnels

	// ca is CELLS_UPSTREAM_CA_FILE, kept current; nil: none (the system
	// roots, or CELLS_UPSTREAM_INSECURE).
	ca *upstreamCA

	// probeToken marks the readiness probe's request (probeHeader), so
	// that one arriving back here is recognised; random per process.
	probeToken string
	// looping: the last readiness probe came back here; every request is
	// refused until a probe finds otherwise.
	looping atomic.Bool
	// portSeen: a request has named the port clients reach the proxy on,
	// and checkRedirectPort has compared it with PROXY_REDIRECT_HTTPS_PORT.
	portSeen atomic.Bool

	// live counts the exchanges begun and not yet finished (their access
	// line written), websocket tunnels included: the drain waits for them.
	live atomic.Int64
}

func newForwarder(cfg *Config, log *slog.Logger) (*forwarder, error) {
	inClear := cfg.Upstream != nil && cfg.Upstream.Scheme == "http" && (cfg.GRPCUpstream == nil || cfg.GRPCUpstream.Scheme == "h2c")
	ca, err := newUpstreamCA(cfg.UpstreamCAFile, log)
	if err != nil {
		if inClear {
			// Topology B: a Cells run with CELLS_SITE_NO_TLS=1 writes
			// no certs/rootCA.pem, and a restarted proxy would wait
			// for it for ever.
			err = fmt.Errorf("%w; nothing uses it with an http:// CELLS_UPSTREAM and gRPC in clear: unset CELLS_UPSTREAM_CA_FILE", err)
		}
		return nil, err
	}
	if inClear {
		// Topology B: no connection to Cells verifies a certificate
		// (Validate warns that the file does nothing). Not watched:
		// Cells may remove or rewrite it, which is no news, and its
		// lines would say it "keeps verifying Cells".
		ca = nil
	}
	f := &forwarder{cfg: cfg, log: log, proto: "https", ws: newTunnels(), probeToken: rand.Text(), ca: ca}
	f.grpcCut, f.cutGRPC = context.WithCancel(context.Background())
	if !cfg.TLS {
		f.proto = "http"
	}
	upTLS := func(u *url.URL, alpn ...string) *tls.Config {
		name := cfg.UpstreamServerName
		if name == "" {
			name = u.Hostname()
		}
		c := &tls.Config{
			ServerName:         name,
			InsecureSkipVerify: cfg.UpstreamInsecure,
			MinVersion:         tls.VersionTLS12,
			NextProtos:         alpn,
			// Resumption saves a full handshake when a pooled
			// connection is replaced.
			ClientSessionCache: tls.NewLRUClientSessionCache(64),
		}
		if ca != nil {
			// Every connection to Cells, HTTP/1.1, websocket, gRPC
			// and the readiness probe's, is made with one of these:
			// all verify with the CA file as it is now.
			ca.configure(c, name)
		}
		return c
	}
	dialer := &net.Dialer{
		// Cells is next door: a connect that takes this long will not succeed.
		Timeout:   10 * time.Second,
		KeepAlive: 30 * time.Second,
	}

	f.httpTarget = cfg.Upstream
	tr := &http.Transport{
		DialContext:     dialer.DialContext,
		TLSClientConfig: upTLS(cfg.Upstream, "http/1.1"),
		// A stuck TLS handshake with Cells is an upstream failure (502), not
		// something to wait for.
		TLSHandshakeTimeout: 10 * time.Second,
		// Pass bodies as they are: never add Accept-Encoding and decompress.
		DisableCompression: true,
		// Keep enough connections for a busy web UI; Cells is one host.
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 1024,
		// Close pooled connections before Cells (Go's default 90 s idle
		// timeout on its side too) would, so a reused one is rarely dead.
		IdleConnTimeout: 60 * time.Second,
		// S3 clients send Expect: 100-continue. Wait this long for Cells'
		// 100 before sending the body anyway, as curl does.
		ExpectContinueTimeout: time.Second,
		// No ResponseHeaderTimeout: the exchange watchdog cuts an exchange
		// in which nothing moves for PROXY_IDLE_TIMEOUT, which also covers
		// a Cells that takes long to answer after a large upload.
		ReadBufferSize:  32 << 10,
		WriteBufferSize: 32 << 10,
		// Cells' largest headers are cookies and JWTs; Go's default is
		// 10 MB. h1Upstream applies the same limit.
		MaxResponseHeaderBytes: 1 << 20,
	}
	// One connection per exchange: websocket and idle handling stay per
	// request, and Cells' HTTP/1.1 server is what its docs proxy to.
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP1(true)
	f.httpUp = newH1Upstream(f.httpTarget, tr, dialer)
	// The Transport's connections batch uploads (upload.go).
	if f.httpUp.tls != nil {
		tr.DialTLSContext = f.httpUp.dialUpload
	} else {
		tr.DialContext = f.httpUp.dialUpload
	}
	f.httpTransport = newUpstreamTransport(tr)
	f.httpUp.fallback = f.httpTransport
	f.http = f.reverseProxy(f.httpTarget, f.httpTransport)

	if u := cfg.GRPCUpstream; u != nil {
		target := &url.URL{Scheme: "https", Host: u.Host}
		var conf *tls.Config
		if u.Scheme == "h2c" {
			target.Scheme = "http"
		} else {
			conf = upTLS(u, "h2")
		}
		f.grpcTarget = target
		f.grpcUp = newGRPCUpstream(hostPortDefault(target), conf, dialer)
	}
	// A change of CELLS_UPSTREAM_CA_FILE retires the connections made
	// before it (upstreamCA), on each path that verifies with it.
	if ca != nil && f.httpUp.tls != nil {
		f.httpUp.ca = ca
		ca.onChange(f.httpUp.dropStale, f.httpTransport.renew)
	}
	if ca != nil && f.grpcUp != nil && f.grpcUp.tls != nil {
		f.grpcUp.ca = ca
		ca.onChange(f.grpcUp.dropStale)
	}
	return f, nil
}

func (f *forwarder) reverseProxy(target *url.URL, t http.RoundTripper) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { f.rewrite(pr, target) },
		Transport: t,
		// Stream: write every chunk as soon as it arrives (zips built on the
		// fly, server-sent events).
		FlushInterval: -1,
		BufferPool:    bufferPool{},
		// Its own lines are replaced: a response body that breaks
		// off is logged by cutShortBody, as on the direct path, and
		// the proxy's errors by errorHandler.
		ErrorLog:     log.New(io.Discard, "", 0),
		ErrorHandler: f.errorHandler,
		// As the direct path: http.Transport passes on a status below 100,
		// which net/http's WriteHeader panics on.
		ModifyResponse: func(res *http.Response) error {
			if res.StatusCode < 100 {
				return errStatus(res.StatusCode)
			}
			if err := checkFieldNames(res.Header); err != nil {
				return err
			}
			dropBodilessLength(res)
			// The exchange ended (the idle watchdog, the drain, the
			// client gone) before Cells' answer was taken. http.Transport
			// may still return one that Cells wrote to the body the proxy
			// had cut: a Go handler whose body read fails answers an
			// empty 200, which a stalled uploader would take for its
			// upload's result. The exchange's own ending answers instead.
			if ctx := res.Request.Context(); ctx.Err() != nil {
				return context.Cause(ctx)
			}
			if res.Body != http.NoBody && res.StatusCode != http.StatusSwitchingProtocols {
				ex, _ := res.Request.Context().Value(exchangeKey{}).(*exchange)
				res.Body = &cutShortBody{ReadCloser: res.Body, f: f, r: res.Request, res: res, ex: ex}
			}
			return nil
		},
	}
}

// rewrite builds the request Cells receives: same method, Host, request
// target bytes and query; forwarding headers replaced, not appended, unless
// the peer is a trusted proxy.
func (f *forwarder) rewrite(pr *httputil.ProxyRequest, target *url.URL) {
	in, out := pr.In, pr.Out
	out.URL.Scheme = target.Scheme
	out.URL.Host = target.Host
	setTarget(out.URL, requestPath(in))
	// ReverseProxy drops query parameters that url.ParseQuery rejects (a
	// ';' for one): S3 signatures cover the query, so restore it verbatim.
	out.URL.RawQuery = in.URL.RawQuery
	out.URL.ForceQuery = in.URL.ForceQuery
	out.Host = in.Host
	f.setForwarded(in, out)
	// A client's request trailers are not passed on, as on the gRPC path
	// (grpcStream.writeData says why). ReverseProxy's copy of the map was
	// taken before the body was read: Cells got the names without values.
	out.Trailer = nil
	if out.Body != nil && in.ProtoMajor == 1 {
		if sock := socketOf(in); sock != nil {
			out.Body = &sourceBody{ReadCloser: out.Body, sock: sock}
		}
	}
}

// requestPath is the path part of the request-target exactly as the client
// sent it. Go's URL parsing would re-encode raw UTF-8 and normalise escapes.
func requestPath(r *http.Request) string {
	uri := r.RequestURI
	if i := strings.IndexByte(uri, '?'); i >= 0 {
		uri = uri[:i]
	}
	if strings.HasPrefix(uri, "/") || uri == "*" {
		return uri
	}
	// Absolute form (GET http://host/path HTTP/1.1): keep the path bytes;
	// the named host is never contacted, only the upstream is.
	if _, rest, ok := strings.Cut(uri, "://"); ok {
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			return rest[i:]
		}
		return "/"
	}
	return r.URL.EscapedPath()
}

// setTarget makes u's request-target exactly p. URL.Opaque is written as is
// by both transports, except that an Opaque starting with "//" would become
// scheme-relative: such paths go through RawPath instead.
func setTarget(u *url.URL, p string) {
	if !strings.HasPrefix(p, "//") {
		u.Opaque = p
		return
	}
	u.Opaque = ""
	if dec, err := url.PathUnescape(p); err == nil {
		u.Path, u.RawPath = dec, p
	}
}

func (f *forwarder) trusted(a netip.Addr) bool {
	for _, p := range f.cfg.TrustedProxies {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// forwarded is what cells-proxy tells Cells about a request's client: the
// values of X-Forwarded-For, X-Real-IP, X-Forwarded-Proto and
// X-Forwarded-Host. ok is false when the peer's address is unknown: then
// none is sent.
type forwarded struct {
	xff, realIP, proto, host string
	ok                       bool
}

// forwardedFor computes them. Cells takes the first X-Forwarded-For entry
// as the client and believes it, so a client's own value reaches Cells only
// from a peer in PROXY_TRUSTED_PROXIES, and then only from the client on:
// a load balancer appends to what its client sent, and what lies left of
// the client's address is the client's to write.
func (f *forwarder) forwardedFor(in *http.Request) forwarded {
	ap, err := netip.ParseAddrPort(in.RemoteAddr)
	if err != nil {
		return forwarded{}
	}
	// A link-local peer's zone (fe80::1%eth0) is the proxy's interface:
	// no trusted CIDR can name it, and Cells does not parse it.
	peer := ap.Addr().Unmap().WithZone("")
	client := peer.String()
	fw := forwarded{xff: client, proto: f.proto, host: in.Host, ok: true}
	if len(f.cfg.TrustedProxies) > 0 && f.trusted(peer) {
		if prior := in.Header.Values("X-Forwarded-For"); len(prior) > 0 {
			if chain := f.realChain(strings.Split(strings.Join(prior, ","), ",")); len(chain) > 0 {
				client = chain[0]
				fw.xff = strings.Join(chain, ", ") + ", " + fw.xff
			}
		}
		if p := in.Header.Get("X-Forwarded-Proto"); p == "http" || p == "https" {
			fw.proto = p
		}
		if h := in.Header.Get("X-Forwarded-Host"); h != "" {
			fw.host = h
		}
	}
	fw.realIP = client
	return fw
}

// setForwarded writes the forwarding headers into out, replacing the
// client's X-Real-IP; Forwarded and X-Forwarded-* are already removed.
func (f *forwarder) setForwarded(in, out *http.Request) {
	out.Header.Del("X-Real-Ip")
	fw := f.forwardedFor(in)
	if !fw.ok {
		return
	}
	out.Header.Set("X-Forwarded-For", fw.xff)
	out.Header.Set("X-Real-Ip", fw.realIP)
	out.Header.Set("X-Forwarded-Proto", fw.proto)
	out.Header.Set("X-Forwarded-Host", fw.host)
}

// realChain walks the X-Forwarded-For entries a trusted peer sent from the
// right, past the trusted proxies, to the client: the first address that is
// not one (nginx's real_ip_recursive), or the leftmost if all are. It
// returns the entries from the client on, the client first; none when an
// entry on the way is not an address, and the peer is then the client.
func (f *forwarder) realChain(entries []string) []string {
	var chain []string
	for i := len(entries) - 1; i >= 0; i-- {
		a, ok := xffAddr(strings.TrimSpace(entries[i]))
		if !ok {
			return nil
		}
		chain = append(chain, a.String())
		if !f.trusted(a) {
			break
		}
	}
	slices.Reverse(chain)
	return chain
}

// xffAddr reads an X-Forwarded-For entry: an address, or one with a port
// (203.0.113.7:52311, [2001:db8::7]:52311, as Azure's gateway writes
// them), or an IPv6 address in brackets. Cells gets the address alone.
func xffAddr(s string) (netip.Addr, bool) {
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), true
	}
	if v6, ok := strings.CutPrefix(s, "["); ok {
		if a, err := netip.ParseAddr(strings.TrimSuffix(v6, "]")); err == nil && strings.HasSuffix(v6, "]") {
			return a.Unmap(), true
		}
	}
	return netip.Addr{}, false
}

// isGRPC reports whether r is a gRPC call: HTTP/2 and a gRPC content type,
// the same test Cells uses to split its own port.
func isGRPC(r *http.Request) bool {
	if r.ProtoMajor != 2 {
		return false
	}
	// application/grpc, +proto, +json, ;charset: as grpc-go and Envoy
	// read it. application/grpc-web is for browsers and Cells' HTTP side,
	// as it is over HTTP/1.1.
	rest, ok := strings.CutPrefix(r.Header.Get("Content-Type"), "application/grpc")
	return ok && (rest == "" || rest[0] == '+' || rest[0] == ';')
}

// isWebSocket reports whether r asks to upgrade to a websocket. It is the
// only upgrade cells-proxy forwards: h2c and anything else are dropped.
func isWebSocket(r *http.Request) bool {
	return r.ProtoMajor == 1 &&
		httpguts.HeaderValuesContainsToken(r.Header["Connection"], "upgrade") &&
		httpguts.HeaderValuesContainsToken(r.Header["Upgrade"], "websocket")
}

// errorHandler answers for a request that did not reach Cells, or whose
// response broke before its header. Responses from Cells, errors included,
// are never replaced.
func (f *forwarder) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	status, msg, fix := f.classify(r, err)
	if errors.Is(context.Cause(r.Context()), errIdle) {
		// The watchdog may have set a read deadline on the connection,
		// which cancels its context: it cannot carry another request.
		closeAfter(w, r)
	}
	if ex, ok := w.(*exchange); ok && ex.bodyFailed.Load() {
		// Reading the client's body failed (a malformed chunk, a client
		// that stopped mid-body): the request is at fault, not Cells, and
		// the connection cannot carry another request.
		switch {
		case status == http.StatusBadGateway:
			status, msg = http.StatusBadRequest, "cells-proxy: malformed or incomplete request body"
		case errors.Is(context.Cause(r.Context()), errIdle):
			// The watchdog stopped a read of the body: the client
			// sent nothing for the idle timeout (nginx's 408).
			status, msg = http.StatusRequestTimeout, "cells-proxy: request body stalled (PROXY_IDLE_TIMEOUT)"
		}
		closeAfter(w, r)
	}
	if status == 0 {
		// The client went away: nobody to answer. Recorded for the access log.
		if ex, ok := w.(*exchange); ok {
			ex.status = statusClientClosed
		}
		// Abort rather than return: should the connection still be there,
		// returning would let net/http answer an empty 200.
		panic(http.ErrAbortHandler)
	}
	if status >= 500 && !errors.Is(err, errShutdown) && !errors.Is(context.Cause(r.Context()), errShutdown) {
		// The drain's own endings are not Cells failing. One line per
		// request: the fix, when the configuration is the cause.
		switch {
		case fix != "":
			f.log.Error(fix, "method", r.Method, "host", r.Host, "path", redactPath(r), "status", status, "err", logErr(err))
		case status == http.StatusGatewayTimeout && isGRPC(r) && grpcDeadline(r.Context()):
			// The client's own deadline (grpc-timeout) passed: its
			// choice, not Cells or the proxy failing.
			f.log.Info("call's deadline passed before Cells answered", "method", r.Method, "host", r.Host, "path", redactPath(r), "err", logErr(err))
		default:
			f.log.Warn("upstream error", "method", r.Method, "host", r.Host, "path", redactPath(r), "status", status, "err", logErr(err))
		}
	}
	if isGRPC(r) {
		code := grpcCode(status)
		var reset h2StreamReset
		var fault h2StreamFault
		switch {
		case status == http.StatusGatewayTimeout && !grpcDeadline(r.Context()):
			// Cells did not answer in time (a connection or handshake
			// that never completes), but the call set no deadline
			// that passed: UNAVAILABLE, which clients retry, as gRPC
			// maps HTTP's 504.
			code = 14
		case status == http.StatusBadGateway && errors.As(err, &reset):
			// Cells reset the call before its response header: the
			// code grpc-go's client gives for the reset, not the
			// UNAVAILABLE of a Cells out of reach, which would have
			// the client send again a call Cells may have started on.
			code, msg = reset.grpcCode(), reset.Error()
		case status == http.StatusBadGateway && errors.As(err, &fault):
			// Cells answered, but with a head HTTP/2 forbids: INTERNAL,
			// as grpc-go's client says of it connected to Cells.
			code, msg = 13, fault.Error()
		}
		writeGRPCStatus(w, code, msg)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	io.WriteString(w, msg+"\n")
}

// closeAfter makes an HTTP/1 connection close after this answer. On
// HTTP/2 only the request's stream is done with (the server resets an
// unread body): there net/http would take Connection: close for a GOAWAY
// to the whole connection, which a browser shares between its tabs.
func closeAfter(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor == 1 {
		w.Header().Set("Connection", "close")
		if ex, ok := w.(*exchange); ok {
			ex.closeConn = true
		}
	}
}

// statusClientClosed is nginx's 499, used only in the access log.
const statusClientClosed = 499

// classify maps a transport error to the status the client gets (0 when
// the client itself has gone) and its message, and says what to change
// when the proxy's configuration is the likely cause (fix).
func (f *forwarder) classify(r *http.Request, err error) (status int, msg, fix string) {
	ctx := r.Context()
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errIdle):
		return http.StatusGatewayTimeout, "cells-proxy: upstream timed out (PROXY_IDLE_TIMEOUT)", ""
	case grpcDeadline(ctx):
		return http.StatusGatewayTimeout, "cells-proxy: deadline exceeded waiting for upstream", ""
	case errors.Is(cause, errShutdown):
		return http.StatusServiceUnavailable, "cells-proxy: shutting down", ""
	case ctx.Err() != nil:
		return 0, "", ""
	}
	var maxBytes *http.MaxBytesError
	var unknownAuthority x509.UnknownAuthorityError
	var hostname x509.HostnameError
	var clear tls.RecordHeaderError
	var invalid x509.CertificateInvalidError
	var netErr net.Error
	switch {
	case errors.Is(err, errShutdown):
		// The drain ended the gRPC calls (grpcDrainGrace).
		return http.StatusServiceUnavailable, "cells-proxy: shutting down", ""
	case errors.As(err, &maxBytes):
		return http.StatusRequestEntityTooLarge, "cells-proxy: request body larger than PROXY_MAX_BODY_SIZE", ""
	case errors.Is(err, errHeaderListSize):
		return http.StatusRequestHeaderFieldsTooLarge, "cells-proxy: request head larger than Cells accepts", ""
	case errors.As(err, &unknownAuthority), errors.As(err, &hostname):
		return http.StatusBadGateway, "cells-proxy: upstream certificate not trusted",
			"upstream certificate not trusted: set CELLS_UPSTREAM_CA_FILE (Cells' certs/rootCA.pem) or CELLS_UPSTREAM_SERVER_NAME, or CELLS_UPSTREAM_INSECURE=true"
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return http.StatusBadGateway, "cells-proxy: upstream certificate expired or not yet valid",
			"upstream certificate expired or not yet valid: renew Cells' certificate or set the clock right, or CELLS_UPSTREAM_INSECURE=true"
	case errors.As(err, &clear), errors.Is(err, http.ErrSchemeMismatch):
		// Cells runs with CELLS_SITE_NO_TLS=1 (or a gRPC port in clear)
		// where the proxy was told https: the error alone says only that
		// a record does not look like TLS (http.Client, the readiness
		// probe's, makes that ErrSchemeMismatch).
		return http.StatusBadGateway, "cells-proxy: upstream does not speak TLS",
			"cells does not speak TLS where cells-proxy was told https: for a Cells run with CELLS_SITE_NO_TLS=1, set CELLS_UPSTREAM=http://… and PYDIO_GRPC_EXTERNAL to the gRPC port Cells was given (its CELLS_GRPC_EXTERNAL), which Cells Sync dials; a CELLS_GRPC_UPSTREAM takes h2c://…"
	case errors.Is(err, syscall.ECONNREFUSED):
		return http.StatusBadGateway, "cells-proxy: upstream refused the connection", ""
	case errors.As(err, &netErr) && netErr.Timeout():
		return http.StatusGatewayTimeout, "cells-proxy: upstream timed out", ""
	}
	return http.StatusBadGateway, "cells-proxy: upstream unavailable", ""
}

// grpcDeadline reports whether ctx ended at the call's own deadline.
func grpcDeadline(ctx context.Context) bool {
	return errors.Is(context.Cause(ctx), errGRPCDeadline) || pastDeadline(ctx)
}

// grpcCode maps the proxy's HTTP status to a gRPC status code
// (https://github.com/grpc/grpc/blob/master/doc/statuscodes.md).
func grpcCode(status int) int {
	switch status {
	case http.StatusGatewayTimeout:
		return 4 // DEADLINE_EXCEEDED
	case http.StatusRequestEntityTooLarge, http.StatusRequestHeaderFieldsTooLarge:
		return 8 // RESOURCE_EXHAUSTED
	case http.StatusMisdirectedRequest:
		return 12 // UNIMPLEMENTED: no such service here
	case http.StatusBadRequest:
		return 13 // INTERNAL, as gRPC maps HTTP's 400
	}
	return 14 // UNAVAILABLE
}

// writeGRPCStatus answers a gRPC call with a trailers-only response, the
// form grpc-go clients read a status from. HTTP status 200 is what the gRPC
// protocol requires even for errors.
func writeGRPCStatus(w http.ResponseWriter, code int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "application/grpc")
	h.Set("Grpc-Status", strconv.Itoa(code))
	h.Set("Grpc-Message", grpcEscape(msg))
	w.WriteHeader(http.StatusOK)
}

// grpcEscape percent-encodes a grpc-message as the gRPC HTTP/2 spec asks.
func grpcEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= ' ' && c <= '~' && c != '%' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

// grpcBroken is the gRPC status a call gets when its stream from Cells
// breaks before its end: DEADLINE_EXCEEDED once the caller's deadline has
// passed; for a stream Cells reset, the code grpc-go's client derives from
// the reset (h2StreamReset.grpcCode); INTERNAL for a stream the proxy
// reset because Cells broke HTTP/2 on it (h2StreamFault, trailers without
// END_STREAM or DATA beyond its window); otherwise, the connection to Cells
// lost or the proxy shutting down, UNAVAILABLE, as grpc-go's client gives
// for a transport that closes. ok is false when the client is gone: nobody
// to tell.
func grpcBroken(ctx context.Context, err error) (code int, msg string, ok bool) {
	var reset h2StreamReset
	var fault h2StreamFault
	switch cause := context.Cause(ctx); {
	case errors.Is(cause, errGRPCDeadline), pastDeadline(ctx):
		return 4, "cells-proxy: deadline exceeded", true
	case errors.Is(cause, errShutdown):
		return 14, "cells-proxy: shutting down", true
	case ctx.Err() != nil:
		return 0, "", false
	case errors.Is(err, errShutdown):
		return 14, "cells-proxy: shutting down", true
	case errors.As(err, &reset):
		return reset.grpcCode(), reset.Error(), true
	case errors.As(err, &fault):
		return 13, fault.Error(), true // INTERNAL, as for a reset
	}
	return 14, "cells-proxy: upstream stream broke: " + err.Error(), true
}

// pastDeadline reports whether the gRPC call's deadline (grpc-timeout) has
// passed. grpc-go's server resets a call (RST_STREAM CANCEL) when its copy
// of the deadline passes, which can beat the proxy's own timer by a hair:
// as grpc-go's client does, a failure after the deadline is
// DEADLINE_EXCEEDED, not UNAVAILABLE.
func pastDeadline(ctx context.Context) bool {
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d)
}

// parseGRPCTimeout reads the grpc-timeout header: up to 8 digits and a unit.
func parseGRPCTimeout(s string) (time.Duration, bool) {
	if len(s) < 2 || len(s) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(s[:len(s)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	var unit time.Duration
	switch s[len(s)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, false
	}
	if n > int64(math.MaxInt64/unit) {
		// Eight digits of hours pass what a Duration holds: grpc-go
		// takes the longest one, which is no deadline in practice;
		// the proxy sets none (Cells gets the header as it came).
		return 0, false
	}
	return time.Duration(n) * unit, true
}

// grpcTimeoutUnits are grpc-timeout's units, finest first.
var grpcTimeoutUnits = [...]struct {
	d    time.Duration
	name string
}{
	{time.Nanosecond, "n"}, {time.Microsecond, "u"}, {time.Millisecond, "m"},
	{time.Second, "S"}, {time.Minute, "M"}, {time.Hour, "H"},
}

// encodeGRPCTimeout writes d, which must be positive, as a grpc-timeout:
// at most 8 digits and a unit (gRPC's PROTOCOL-HTTP2.md), in the finest
// unit d fits in, rounded up, as grpc-go's client encodes it
// (internal/grpcutil/encode_duration.go). Rounded down, a call with time
// left could reach Cells as "0n", already expired, or expire there before
// its client gives up on it.
func encodeGRPCTimeout(d time.Duration) string {
	units := grpcTimeoutUnits[:]
	for _, u := range units[:len(units)-1] {
		if n := ceilDiv(d, u.d); n <= 99999999 {
			return strconv.FormatInt(n, 10) + u.name
		}
	}
	// The longest Duration is about 2.6 million hours: in hours, any d
	// fits.
	return strconv.FormatInt(ceilDiv(d, time.Hour), 10) + "H"
}

// ceilDiv is d/unit rounded up, without the overflow of (d+unit-1)/unit.
func ceilDiv(d, unit time.Duration) int64 {
	n := int64(d / unit)
	if d%unit > 0 {
		n++
	}
	return n
}

// bufferPool lends ReverseProxy the 32 KiB copy buffers, so a download
// does not allocate one per request.
type bufferPool struct{}

// copyBuffers holds arrays, not slices: putting a slice in a sync.Pool
// boxes its header, an allocation on every Put.
var copyBuffers = newPool(func() *[32 << 10]byte { return new([32 << 10]byte) })

func (bufferPool) Get() []byte { return copyBuffers.Get()[:] }

func (bufferPool) Put(b []byte) {
	if cap(b) >= 32<<10 {
		copyBuffers.Put((*[32 << 10]byte)(b[:32<<10]))
	}
}

// ServeHTTP is the handler of the public port: every request goes to Cells,
// gRPC calls to the gRPC upstream, websockets through a tunnel, the rest
// through the HTTP reverse proxy. Nothing is routed by path: Cells registers
// its routes at run time.
func (f *forwarder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.serve(w, r, false)
}

// grpcHandler serves the dedicated gRPC port (PYDIO_GRPC_EXTERNAL): every
// request is a gRPC call for the gRPC upstream.
func (f *forwarder) grpcHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { f.serve(w, r, true) })
}

func (f *forwarder) serve(w http.ResponseWriter, r *http.Request, grpcOnly bool) {
	f.live.Add(1) // f.finish ends it, here or when a tunnel ends
	ex := &exchange{ResponseWriter: w, start: time.Now(), declared: -1}
	switch {
	case grpcOnly || isGRPC(r):
		ex.kind = "grpc"
	case isWebSocket(r):
		ex.kind = "ws"
	case r.ProtoMajor == 2:
		ex.kind = "h2"
	default:
		ex.kind = "h1"
	}
	ctx := r.Context()
	if ex.kind == "h1" || ex.kind == "h2" {
		// Plain HTTP gets the idle watchdog; gRPC streams may stay
		// quiet for hours and websockets have their own idle limit.
		ctx = ex.watch(ctx, f.cfg.IdleTimeout)
	}
	// Work on a copy (made once, with the forwarding context): net/http
	// looks at its own request's Body after the handler, and when it is no
	// longer its Expect: 100-continue reader it waits to drain a body the
	// client holds back until a 100 that never comes (a refused S3 upload
	// then stalls for the client's timeout).
	r = r.WithContext(ctx)
	ex.req = r
	detached := false // a websocket tunnel finishes the exchange
	defer func() {
		if !detached {
			f.finish(ex, r)
		}
	}()
	if r.Context().Err() != nil {
		// The client already reset the stream: nothing to forward.
		return
	}

	if r.Host == "" && r.ProtoMajor == 1 && r.ProtoMinor == 0 && !grpcOnly && len(f.cfg.ServerNames) > 0 {
		// HTTP/1.0 has no Host field (RFC 1945); a client old enough to
		// leave it out is given the site's first name, as nginx gives it
		// its server_name, and as the readiness probe names the site.
		// Without PROXY_SERVER_NAMES the proxy has no name to give: the
		// request goes with CELLS_UPSTREAM's host (malformed lets it by).
		r.Host = bracketIPv6(f.cfg.ServerNames[0])
	}
	if msg := malformed(r); msg != "" {
		ex.refused = true
		closeAfter(ex, r)
		if ex.kind == "grpc" {
			writeGRPCStatus(ex, grpcCode(http.StatusBadRequest), "cells-proxy: "+msg)
			return
		}
		http.Error(ex, "cells-proxy: "+msg, http.StatusBadRequest)
		return
	}
	if f.probeCameBack(r) && ex.kind != "grpc" {
		// The readiness probe came back: nothing to forward (probeHeader
		// says why). Before the Host check: the probe's Host need not
		// be one of PROXY_SERVER_NAMES.
		ex.refused, ex.probe = true, true
		ex.Header().Set(probeHeader, f.probeToken)
		http.Error(ex, loopAnswer, http.StatusLoopDetected)
		return
	}
	if f.looping.Load() {
		// Every request would go round too, each a new connection,
		// until the descriptors run out: answer at once.
		ex.refused = true
		if ex.kind == "grpc" {
			writeGRPCStatus(ex, grpcCode(http.StatusBadGateway), loopAnswer)
			return
		}
		http.Error(ex, loopAnswer, http.StatusLoopDetected)
		return
	}
	if !f.hostAllowed(r.Host) {
		ex.refused = true
		if ex.kind == "grpc" {
			writeGRPCStatus(ex, grpcCode(http.StatusMisdirectedRequest), "cells-proxy: unknown host "+r.Host)
			return
		}
		http.Error(ex, "cells-proxy: unknown host (PROXY_SERVER_NAMES)", http.StatusMisdirectedRequest)
		return
	}

	if !grpcOnly && !f.portSeen.Load() {
		// Not on the PYDIO_GRPC_EXTERNAL port, whose number Sync names.
		f.checkRedirectPort(r.Host)
	}

	// CONNECT would make the proxy open a tunnel to wherever the client
	// names; Cells has no use for it (nginx refuses it too). Checked before
	// gRPC: on the dedicated port, or with a gRPC content type, it went to
	// Cells' gRPC port as a request no HTTP/2 server takes (RFC 9113 §8.5).
	if r.Method == http.MethodConnect {
		ex.refused = true
		ex.Header().Set("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, PROPFIND, PROPPATCH, MKCOL, COPY, MOVE, LOCK, UNLOCK")
		http.Error(ex, "cells-proxy: CONNECT is not supported", http.StatusMethodNotAllowed)
		return
	}

	if ex.kind == "grpc" {
		f.serveGRPC(ex, r)
		return
	}

	// Request smuggling: Go's HTTP/1 parser frames a request that carries
	// both Transfer-Encoding: chunked and Content-Length by the chunks and
	// drops Content-Length before the handler sees it, and it ignores
	// Transfer-Encoding on HTTP/1.0. A front that framed such a request the
	// other way would read the bytes after it differently; RFC 9112,
	// section 6.1 requires closing the connection after answering. The
	// proxy cannot tell whether the header was there, so it closes after
	// every chunked HTTP/1.1 request and every HTTP/1.0 request: Go takes
	// an HTTP/1.0 request with Transfer-Encoding and no Content-Length for
	// one without a body, and deletes the field, so the handler cannot
	// tell it from a plain GET; kept alive, the connection read the bytes
	// a front took for its chunks as the next request. Only HTTP/1.0
	// clients that asked for keep-alive lose it, which RFC 9112 never
	// promised them (appendix C.2.2).
	if len(r.TransferEncoding) > 0 || (r.ProtoMajor == 1 && r.ProtoMinor == 0) {
		closeAfter(ex, r)
	}

	// Upgrade is forwarded only as websocket: an h2c upgrade (or any other)
	// through the proxy would open a tunnel past every check here.
	if ex.kind != "ws" && r.Header.Get("Upgrade") != "" {
		r.Header.Del("Upgrade")
	}

	if r.ProtoMajor == 2 && r.ContentLength > 0 && r.Body != nil && r.Body != http.NoBody {
		r.Body = &streamEnd{ReadCloser: r.Body, left: r.ContentLength}
	}
	if max := f.cfg.MaxBodySize; max > 0 {
		if r.ContentLength > max {
			// Say so before reading anything; the connection closes
			// after, since the unread body cannot be skipped cheaply.
			ex.refused = true
			closeAfter(ex, r)
			http.Error(ex, "cells-proxy: request body larger than PROXY_MAX_BODY_SIZE", http.StatusRequestEntityTooLarge)
			return
		}
		if r.Body != nil && r.Body != http.NoBody {
			r.Body = http.MaxBytesReader(w, r.Body, max)
		}
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &countingBody{ReadCloser: r.Body, ex: ex}
		ex.bodyOpen.Store(true)
		if r.ProtoMajor == 2 && r.ContentLength == 0 {
			// Declared empty, its stream still open: as for streamEnd,
			// the request is complete only at END_STREAM, and DATA
			// before it makes it malformed (RFC 9113 §8.1.1). Neither
			// path reads a body of length 0: without this wait Cells
			// took such a request as a complete empty one.
			if err := streamEnded(r.Body); err != nil {
				ex.bodyFailed.Store(true) // the client's fault, whatever the error
				f.errorHandler(ex, r, err)
				return
			}
		}
	}

	if ex.kind == "ws" {
		detached = f.ws.serve(f, ex, r)
		return
	}
	if fastPath(r) {
		if ex.kind == "h2" {
			growStack()
		}
		f.direct(ex, r)
		return
	}
	if r.ProtoMajor == 1 && ex.bodyOpen.Load() {
		// Cells' answer and the upload go both ways at once. Otherwise
		// net/http's HTTP/1 server, as the answer's header goes out,
		// reads away what is left of the body (up to 256 KiB: bytes
		// http.Transport is copying to Cells) and closes it, under the
		// Transport's read for the body's end after its last byte,
		// which then closes the connection to Cells with the answer
		// still coming. The HTTP/1.1 front's own writer never reads the
		// body: ErrNotSupported there is as good.
		_ = http.NewResponseController(ex).EnableFullDuplex()
	}
	// ReverseProxy does not tell its ModifyResponse which ResponseWriter
	// the response goes to: cutShortBody needs it for the trailers.
	f.http.ServeHTTP(ex, r.WithContext(context.WithValue(r.Context(), exchangeKey{}, ex)))
}

// exchangeKey is the request context key under which ReverseProxy's
// response body finds the exchange.
type exchangeKey struct{}

// finish ends an exchange: its watchdog, its access log line, and the
// HTTP/2 rapid-reset bookkeeping.
func (f *forwarder) finish(ex *exchange, r *http.Request) {
	ex.stop()
	if f.cfg.AccessLog && !ex.probe {
		ex.logAccess(f.log)
	}
	f.live.Add(-1)
	if g, ok := r.Context().Value(connGuardKey{}).(*connGuard); ok && r.ProtoMajor == 2 && !ex.refused {
		// Only a reset soon after the request counts: a browser that
		// cancels the requests of a page the user left, or a deadline,
		// comes later; an attacker holding each stream that long makes
		// no more requests than a client that lets them be answered. A
		// later cancel counts as nothing, not as an answer: it must not
		// buy the client more rapid resets.
		cancelled := r.Context().Err() != nil && (ex.status == 0 || ex.status == statusClientClosed)
		if !cancelled || time.Since(ex.start) < quickReset {
			g.done(cancelled, f.log, r.RemoteAddr)
		}
	}
}

// waitExchanges waits until every exchange has finished, for at most d,
// and returns how many are still running. A handler that the drain
// deadline cut returns once its connections are closed, and only then
// writes its access line: without this wait the process could exit first.
func (f *forwarder) waitExchanges(d time.Duration) int64 {
	deadline := time.Now().Add(d)
	for {
		n := f.live.Load()
		if n <= 0 || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond)
	}
}

func (f *forwarder) serveGRPC(ex *exchange, r *http.Request) {
	if f.grpcUp == nil {
		ex.refused = true
		writeGRPCStatus(ex, 14, "cells-proxy: no gRPC upstream: set PYDIO_GRPC_EXTERNAL to Cells' gRPC port or CELLS_GRPC_UPSTREAM")
		return
	}
	if r.Body != nil && r.Body != http.NoBody {
		r.Body = &countingBody{ReadCloser: r.Body, ex: ex}
	}
	// Honour the caller's deadline on the proxy too, so that a silent
	// upstream answers DEADLINE_EXCEEDED from here. Streams without one
	// may stay idle for hours (Cells Sync's StreamChanges).
	if d, ok := parseGRPCTimeout(r.Header.Get("Grpc-Timeout")); ok {
		ctx, cancel := context.WithTimeoutCause(r.Context(), d, errGRPCDeadline)
		defer cancel()
		r = r.WithContext(ctx)
	}
	// Once the drain's gRPC grace has passed, the side to Cells is closed;
	// but a handler may be blocked writing to a client that reads nothing
	// (its window full: a laptop gone to sleep), and would hold the drain.
	// A write deadline 1 s away gets it out, and leaves a client that does
	// read the time to get its UNAVAILABLE trailers. One AfterFunc per call.
	defer context.AfterFunc(f.grpcCut, func() {
		ex.mu.Lock()
		defer ex.mu.Unlock()
		if s := ex.grpc.Load(); s != nil && s.answered() {
			return // Cells' answer is complete: only the client's reading is left
		}
		if !ex.done.Load() {
			_ = http.NewResponseController(ex.ResponseWriter).SetWriteDeadline(time.Now().Add(time.Second))
		}
	})()
	// The call to Cells goes as deep as the direct path does (HPACK-encoding
	// the request head, then crypto/tls's Write): see growStack.
	growStack()
	f.callGRPC(ex, r)
}

// malformed says what makes r unfit to forward, for a 400, or "". net/http
// checks most of a request before the handler, not all of it: its HTTP/2
// server takes a content-length it cannot parse for 0, and would let the
// request reach Cells as an empty upload before it resets the stream when
// the body comes; and neither of its servers checks an :authority or Host
// much (net/http's client refuses some such values, which then looked like
// Cells failing, 502), nor that a port is a number (Cells builds its
// external URLs from Host, and PROXY_SERVER_NAMES compares the name only).
func malformed(r *http.Request) string {
	// net/http's HTTP/2 server takes any :method (the HTTP/1.1 front
	// refuses one that is not a token, as RFC 9110 §9.1 requires): such a
	// request failed as Cells' fault, 502 and a warning, or went to
	// Cells' gRPC port as it came.
	if !httpguts.ValidHeaderFieldName(r.Method) {
		return "invalid method"
	}
	if r.Host == "" && (r.ProtoMajor != 1 || r.ProtoMinor != 0) {
		// An HTTP/2 request without :authority or Host (RFC 9113 §8.3.1
		// requires one), or an HTTP/1.1 one with an empty Host, went to
		// Cells with CELLS_UPSTREAM's host in its place: Cells built links
		// and redirects to its internal address. nginx and net/http's
		// HTTP/1.1 server answer 400 too. HTTP/1.0 has no Host field,
		// and what sends it without one today is a health check (HAProxy's
		// default option httpchk is "OPTIONS / HTTP/1.0"), not a browser
		// that follows links: refused, it would mark the proxy down.
		return "missing Host"
	}
	host := r.Host
	if strings.ContainsFunc(host, func(c rune) bool { return c >= utf8.RuneSelf }) {
		// An HTTP/2 :authority outside ASCII, which net/http's client
		// sends in punycode (see direct.go): its ASCII is checked.
		host = strings.Map(func(c rune) rune {
			if c >= utf8.RuneSelf {
				return 'x'
			}
			return c
		}, host)
	}
	if !httpguts.ValidHostHeader(host) {
		return "invalid Host"
	}
	if _, port, err := net.SplitHostPort(r.Host); err == nil && port != "" && !isDigits(port) {
		return "invalid port in Host"
	}
	if !targetOK(r) {
		return "invalid request target"
	}
	if r.ProtoMajor == 2 {
		if vv := r.Header["Content-Length"]; len(vv) > 0 {
			for _, v := range vv {
				if !isDigits(v) || v != vv[0] {
					return "invalid content-length"
				}
			}
			// It takes a length past int64 for 0 too, and ignores the
			// length of a request whose HEADERS end the stream: such a
			// request has no body, and would reach Cells as an empty
			// upload (RFC 9113 §8.1.1 calls it malformed).
			if n, err := strconv.ParseInt(vv[0], 10, 64); err != nil || n != r.ContentLength {
				return "content-length does not match the body"
			}
		}
	}
	return ""
}

// targetOK reports whether r's request-target is one Cells can be sent: a
// path, "*" for OPTIONS, or on HTTP/1.1 an absolute URL (RFC 9112, section
// 3.2.2), whose path goes to Cells. net/http takes other forms too: "a:b"
// parses as an opaque URL, and an HTTP/2 :path of "http://host/p" (RFC
// 9113, section 8.3.1, allows a path only); both used to reach Cells as
// another path ("/", "/p"). nginx refuses them with 400 as well. CONNECT's
// authority form is answered 405 further on. net/http's HTTP/2 server also
// lets a space through in :path (control bytes it refuses), which would
// split the request line to Cells; an HTTP/1.1 target cannot hold one.
func targetOK(r *http.Request) bool {
	uri := r.RequestURI
	if strings.IndexByte(uri, ' ') >= 0 {
		return false
	}
	switch {
	case strings.HasPrefix(uri, "/"), r.Method == http.MethodConnect:
		return true
	case uri == "*":
		return r.Method == http.MethodOptions
	case r.ProtoMajor == 1:
		return r.URL.Scheme != "" && r.URL.Host != "" && r.URL.Opaque == ""
	}
	return false
}

// isDigits reports whether s is one or more ASCII digits.
func isDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// probeCameBack reports whether r is this proxy's readiness probe, come
// back to it: it carries the probe's mark (probeHeader). The probe asks
// for "/": other requests do not pay the header lookup.
func (f *forwarder) probeCameBack(r *http.Request) bool {
	if r.RequestURI != "/" {
		return false
	}
	v := r.Header[probeHeader]
	return len(v) == 1 && v[0] == f.probeToken
}

// checkRedirectPort compares the port named in the Host of a request on
// the public port, the first that names one, with PROXY_REDIRECT_HTTPS_PORT,
// where the redirect port sends http:// clients, and warns once when they
// differ: an operator who publishes 8443 and leaves the default 443 has
// every http:// link redirected to a port nothing answers on. A Host
// without a port (443 for https) says nothing, and is not the last checked.
func (f *forwarder) checkRedirectPort(hostport string) {
	if f.cfg.HTTPAddr == "" || !f.cfg.TLS {
		f.portSeen.Store(true) // no redirects, or the port is a load balancer's
		return
	}
	i := strings.LastIndexByte(hostport, ':')
	if i < 0 || strings.HasSuffix(hostport, "]") {
		return
	}
	port, err := strconv.Atoi(hostport[i+1:])
	if err != nil || f.portSeen.Swap(true) || port == f.cfg.RedirectPort {
		return
	}
	f.log.Warn("HTTPS requests name a port other than PROXY_REDIRECT_HTTPS_PORT, to which the redirect port sends http:// clients: set PROXY_REDIRECT_HTTPS_PORT to the port users reach",
		"host", hostport, "redirect_port", f.cfg.RedirectPort)
}

// hostAllowed applies PROXY_SERVER_NAMES to a Host or :authority value.
func (f *forwarder) hostAllowed(hostport string) bool {
	if len(f.cfg.ServerNames) == 0 {
		return true
	}
	host, ok := serverName(hostport)
	if !ok {
		return false
	}
	for _, n := range f.cfg.ServerNames {
		if strings.EqualFold(host, n) {
			return true
		}
	}
	return false
}

// serverName is the host of a Host or :authority value in the form
// ServerNames holds it: without port or trailing dot, an IPv6 address
// without brackets and in its usual form (a client may write
// [2001:DB8:0::1]). ok is false for a host no client names a server by:
// brackets around anything but an IPv6 address, or unmatched, an IPv6
// address without them (RFC 3986, section 3.2.2), or a port that is not
// a number.
func serverName(hostport string) (host string, ok bool) {
	var port string
	if v6, ok := strings.CutPrefix(hostport, "["); ok {
		v6, rest, ok := strings.Cut(v6, "]")
		a, err := netip.ParseAddr(v6)
		if !ok || err != nil || !a.Is6() {
			return "", false
		}
		host = a.String()
		if rest != "" {
			if rest[0] != ':' {
				return "", false
			}
			port = rest[1:]
		}
	} else {
		host, port, _ = strings.Cut(hostport, ":")
		if strings.IndexByte(host, ']') >= 0 {
			return "", false
		}
		host = strings.TrimSuffix(host, ".")
	}
	return host, port == "" || isDigits(port)
}

// hostOnly strips the port (and IPv6 brackets) and a trailing dot.
func hostOnly(hostport string) string {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	} else {
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	}
	return strings.TrimSuffix(host, ".")
}

// connGuard counts, per client connection, the HTTP/2 requests the client
// cancelled before they were answered. net/http runs at most
// MaxConcurrentStreams handlers per connection (its CVE-2023-44487 fix),
// but a stream reset just after its HEADERS may still have reached Cells
// when its handler started first, and a client can do that in a loop. A
// connection that resets more than maxResets streams and more than twice
// as many as were answered is closed, as nginx does.
type connGuard struct {
	conn     net.Conn
	resets   atomic.Int64
	answered atomic.Int64
	closed   atomic.Bool
}

type connGuardKey struct{}

// quickReset is how soon after the request a cancel counts as a reset.
const quickReset = 100 * time.Millisecond

// maxResets is how many client-cancelled requests a connection may have
// before the ratio to answered ones is checked: browsers cancel requests
// when users navigate, Cells Sync cancels streams, but not by the hundred.
const maxResets = 100

func (g *connGuard) done(reset bool, log *slog.Logger, client string) {
	if !reset {
		g.answered.Add(1)
		return
	}
	n := g.resets.Add(1)
	if n > maxResets && n > 2*g.answered.Load() && g.closed.CompareAndSwap(false, true) {
		log.Warn("closing a connection that resets most of its requests (HTTP/2 rapid reset)", "client", client, "resets", n, "answered", g.answered.Load())
		// The socket itself: closing the connection above it waits for
		// a pending write, which a client that does not read can hold
		// up while net/http's server goes on reading its frames.
		if tcp := tcpConn(g.conn); tcp != nil {
			tcp.Close()
		}
		g.conn.Close()
	}
}

// growStack grows an HTTP/2 handler's stack while it is still shallow.
// Each HTTP/2 request runs on a goroutine of its own, started with the
// runtime's average stack size (4 KiB under load, 2 KiB at rest), and the
// direct path goes deeper than that when it reads and decrypts Cells'
// answer (about 4 KiB): the runtime would copy the stack from under that
// read, thirty frames to walk and adjust, about a tenth of the proxy's CPU
// for a small HTTP/2 GET. Here the copy is of the few frames above serve,
// and the pad takes the stack to 8 KiB at once. (Trimming the frames on
// that path instead does not get it under 4 KiB: most of them are
// net/http's and crypto/tls's.) gRPC calls grow the same way, while the
// request head to Cells is HPACK-encoded.
//
//go:noinline
func growStack() {
	var pad [3 << 10]byte
	keep(pad[:])
}

//go:noinline
func keep([]byte) {}
