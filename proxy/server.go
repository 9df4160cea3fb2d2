package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/soheilhy/cmux"
)

// Server is cells-proxy: its listeners and the forwarder behind them.
type Server struct {
	cfg *Config
	log *slog.Logger
	fwd *forwarder
	tls *tls.Config // nil when PROXY_TLS=off

	cert      atomic.Pointer[tls.Certificate]
	certFiles *certFiles         // nil with the self-signed certificate
	renewal   *selfSignedRenewal // nil unless the self-signed certificate is served
	draining  atomic.Bool

	// Set by Listen.
	mainLn, grpcLn, httpLn, healthLn net.Listener

	// baseCtx is every request's parent; cancelling it with errShutdown
	// ends the exchanges still running when the drain deadline passes.
	baseCtx    context.Context
	cancelBase context.CancelCauseFunc

	// cut ends the drain at once (Cut).
	cut      context.Context
	cutDrain context.CancelFunc

	health *health
	front  atomic.Pointer[h1Front] // the public port's HTTP/1.1 connections; set by Run
	// pending is Run's connections not yet matched or with no request
	// begun (matching); set by Run, for tests to see what it holds.
	pending atomic.Pointer[matching]

	// grpcGrace is how much of the drain gRPC calls get (grpcDrainGrace).
	grpcGrace time.Duration
	// handshake bounds a new connection's TLS handshake and first bytes
	// (handshakeTimeout).
	handshake time.Duration
	// watchEvery spaces the probes of Cells from the start until it
	// answers (health.watchStart); 0: none (tests that count requests).
	watchEvery time.Duration
	// keepAlive, pingAfter and pingWait are the servers' IdleTimeout and
	// HTTP/2 SendPingTimeout and PingTimeout (keepAliveTimeout,
	// h2PingAfter, h2PingWait). Tests change them.
	keepAlive, pingAfter, pingWait time.Duration
}

// grpcDrainGrace is how long gRPC calls may still run once the drain has
// begun. Cells Sync's StreamChanges never ends by itself: waited for, it
// would hold every stop for the whole PROXY_SHUTDOWN_TIMEOUT, the public
// port closed all the while. Ended with UNAVAILABLE, Sync reconnects, as
// it does when the network drops. Its calls last well under a second.
const grpcDrainGrace = 5 * time.Second

// New checks what the configuration names on disk (certificates, CA file)
// and builds the server. It opens no socket.
func New(cfg *Config, log *slog.Logger) (*Server, error) {
	// The files the configuration names are read here; every one that
	// cannot be is reported, as Load reports every bad variable.
	var files []error
	var selfSigned []string // the names of the self-signed certificate, if one is served
	fwd, err := newForwarder(cfg, log)
	if err != nil {
		files = append(files, err)
	}
	s := &Server{cfg: cfg, log: log, fwd: fwd, grpcGrace: grpcDrainGrace, handshake: handshakeTimeout, watchEvery: startProbeEvery,
		keepAlive: keepAliveTimeout, pingAfter: h2PingAfter, pingWait: h2PingWait}
	s.baseCtx, s.cancelBase = context.WithCancelCause(context.Background())
	s.cut, s.cutDrain = context.WithCancel(context.Background())
	if cfg.TLS || cfg.GRPCAddr != "" {
		if cfg.CertFile != "" {
			s.certFiles = &certFiles{certFile: cfg.CertFile, keyFile: cfg.KeyFile, names: cfg.ServerNames, log: log, cert: &s.cert}
			if _, err := s.certFiles.load(true); err != nil {
				files = append(files, err)
			}
		} else {
			selfSigned = append([]string{"localhost", "127.0.0.1", "::1"}, cfg.ServerNames...)
			cert, err := SelfSigned(selfSigned...)
			if err != nil {
				return nil, err
			}
			s.cert.Store(&cert)
			s.renewal = &selfSignedRenewal{names: selfSigned, cert: &s.cert, log: log}
		}
		s.tls = s.tlsConfig()
	} else if cfg.CertFile != "" {
		// Nothing serves TLS: the pair is unused, but a path that does
		// not load is still the operator's to know about now, not when
		// TLS is turned back on.
		unused := &certFiles{certFile: cfg.CertFile, keyFile: cfg.KeyFile, log: log, cert: new(atomic.Pointer[tls.Certificate])}
		if _, err := unused.load(true); err != nil {
			files = append(files, err)
		} else {
			log.Warn("TLS_CERT_FILE and TLS_KEY_FILE are not used: PROXY_TLS=off and no PYDIO_GRPC_EXTERNAL")
		}
	}
	if err := checkACMEWebroot(cfg.ACMEWebroot); err != nil {
		files = append(files, err)
	}
	if len(files) > 0 {
		return nil, &FileError{errors.Join(files...)}
	}
	// What is served is logged once the start cannot fail on a file: a
	// "serving" line above the line that stops the start was false.
	switch {
	case s.certFiles != nil:
		s.certFiles.logServed("start")
	case selfSigned != nil:
		log.Warn("no TLS_CERT_FILE: serving a self-signed certificate; browsers and Cells Sync will not trust it", "names", selfSigned)
	}
	s.health = newHealth(s)
	for _, v := range cfg.Ignored {
		attrs := []any{"variable", v.Name}
		if v.Meant != "" {
			attrs = append(attrs, "did_you_mean", v.Meant)
		}
		log.Warn("not a cells-proxy variable, ignored: cells-proxy env lists them", attrs...)
	}
	for _, w := range cfg.Warnings {
		attrs := []any{"variable", w.Variable, "value", w.Value}
		if w.TakenAs != "" {
			attrs = append(attrs, "taken_as", w.TakenAs)
		}
		if w.Fix != "" {
			attrs = append(attrs, "fix", w.Fix)
		}
		log.Warn(w.Msg, attrs...)
	}
	switch {
	case !cfg.UpstreamInsecure:
	case cfg.Upstream.Scheme == "http" && (cfg.GRPCUpstream == nil || cfg.GRPCUpstream.Scheme == "h2c"):
		log.Warn("CELLS_UPSTREAM_INSECURE=true does nothing: no connection to Cells uses TLS (http:// CELLS_UPSTREAM, gRPC in clear); unset it")
	default:
		log.Warn("CELLS_UPSTREAM_INSECURE=true: the upstream certificate is not verified")
	}
	if cfg.GRPCUpstream == nil {
		log.Warn("no gRPC upstream: Cells Sync will not work; set PYDIO_GRPC_EXTERNAL, or use an https CELLS_UPSTREAM")
	}
	return s, nil
}

// FileError is returned by New when a file the configuration names cannot
// be read or does not hold what it should: the operator's to fix, like a bad
// variable. Its message has one line per problem, each naming the variable.
type FileError struct{ Err error }

func (e *FileError) Error() string { return e.Err.Error() }
func (e *FileError) Unwrap() error { return e.Err }

// tlsConfig is the public TLS policy: TLS 1.2 and 1.3, forward-secret AEAD
// suites only, ALPN h2, http/1.1 and http/1.0 (grpc-go refuses a server
// without h2; curl --http1.0 offers http/1.0 alone, and Go's TLS server
// refuses a client that offers nothing it lists).
func (s *Server) tlsConfig() *tls.Config {
	c := &tls.Config{
		MinVersion: tls.VersionTLS12,
		CipherSuites: []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
			tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
		},
		NextProtos: []string{"h2", "http/1.1", "http/1.0"},
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			cert := s.cert.Load()
			if s.certFiles != nil {
				s.certFiles.checkName(hello.ServerName, cert)
			}
			if s.renewal != nil {
				cert = s.renewal.current(cert)
			}
			return cert, nil
		},
	}
	// A session ticket names the certificate served when it was issued,
	// and resumes only while that one is served, as nginx ties its
	// sessions to its certificates (ngx_ssl_session_id_context). A
	// resumed session shows the client the certificate of its first
	// handshake: without this, clients kept seeing the certificate a
	// reload had replaced for as long as their ticket lived (7 days).
	c.WrapSession = func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
		ss.Extra = append(ss.Extra, s.certMark())
		return c.EncryptTicket(cs, ss)
	}
	c.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
		ss, err := c.DecryptTicket(identity, cs)
		if ss == nil || err != nil {
			return ss, err
		}
		if n := len(ss.Extra); n == 0 || !bytes.Equal(ss.Extra[n-1], s.certMark()) {
			return nil, nil // a full handshake, with the certificate now served
		}
		return ss, nil
	}
	return c
}

// certMark identifies the certificate served now, for session tickets.
func (s *Server) certMark() []byte {
	sum := sha256.Sum256(s.cert.Load().Certificate[0])
	return sum[:]
}

// Listen opens every configured listener. Run calls it when it was not
// called before; tests call it first to learn the ports.
func (s *Server) Listen() error {
	var errs []error
	listen := func(name, addr string) net.Listener {
		if addr == "" {
			return nil
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w%s", name, err, listenFix(name, err)))
			return nil
		}
		return ln
	}
	s.mainLn = listen("PROXY_HTTPS_ADDR", s.cfg.HTTPSAddr)
	grpcVar := s.cfg.GRPCVar
	if grpcVar == "" {
		grpcVar = "PYDIO_GRPC_EXTERNAL"
	}
	s.grpcLn = listen(grpcVar, s.cfg.GRPCAddr)
	s.httpLn = listen("PROXY_HTTP_ADDR", s.cfg.HTTPAddr)
	s.healthLn = listen("PROXY_HEALTH_ADDR", s.cfg.HealthAddr)
	if err := errors.Join(errs...); err != nil {
		s.closeListeners()
		return err
	}
	return nil
}

// listenFix is what an operator can do about a listener that failed, the
// two causes one meets in a container: the port is taken, or it is below
// 1024 and the process (the image's non-root user) may not bind it.
func listenFix(name string, err error) string {
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return ": another process listens there (an nginx left in front of Cells?): stop it, or set " + name + " to a free port"
	case errors.Is(err, syscall.EACCES):
		return ": a port below 1024 needs root, CAP_NET_BIND_SERVICE or a lower net.ipv4.ip_unprivileged_port_start (Docker lowers it except with host networking): listen above 1024, as the defaults :8443 and :8080 do, and publish 443 and 80 to them (-p 443:8443 -p 80:8080)"
	}
	return ""
}

func (s *Server) closeListeners() {
	for _, ln := range []net.Listener{s.mainLn, s.grpcLn, s.httpLn, s.healthLn} {
		if ln != nil {
			ln.Close()
		}
	}
}

// Addr is the public listener's address, once Listen has run.
func (s *Server) Addr() net.Addr { return addrOf(s.mainLn) }

// GRPCAddr is the dedicated gRPC listener's address, or nil.
func (s *Server) GRPCAddr() net.Addr { return addrOf(s.grpcLn) }

// RedirectAddr is the plain HTTP listener's address, or nil.
func (s *Server) RedirectAddr() net.Addr { return addrOf(s.httpLn) }

// HealthAddr is the health listener's address, or nil.
func (s *Server) HealthAddr() net.Addr { return addrOf(s.healthLn) }

func addrOf(ln net.Listener) net.Addr {
	if ln == nil {
		return nil
	}
	return ln.Addr()
}

// newHTTPServer sets up an http.Server with the timeouts every listener
// shares. There is deliberately no ReadTimeout or WriteTimeout: uploads of
// several GB and gRPC streams that live for hours cross these servers; the
// exchange watchdog and PROXY_WS_IDLE_TIMEOUT bound idleness instead.
func (s *Server) newHTTPServer(h http.Handler, protos func(*http.Protocols)) *http.Server {
	srv := &http.Server{
		Handler: h,
		// Slowloris: the request line and headers must all arrive in time
		// (PROXY_READ_HEADER_TIMEOUT). net/http's HTTP/2 server does not
		// read it: h2conn bounds an HTTP/2 header block with it.
		ReadHeaderTimeout: s.readHeaderTimeout(),
		// Keep-alive between requests, as nginx's keepalive_timeout.
		// On HTTP/2 it is also what closes a connection whose client
		// sends nothing after its preface and SETTINGS, as nginx's
		// keepalive_timeout does once it has read them: a preconnected
		// browser connection gets the same 75 s as one that has served
		// requests.
		IdleTimeout: s.keepAlive,
		// Cells' cookies and JWTs fit well within the default 64 KiB; nginx
		// allows 32 KiB. The HTTP/2 server derives SETTINGS_MAX_HEADER_LIST_SIZE
		// from it and closes a connection whose CONTINUATION frames go past it.
		MaxHeaderBytes: s.maxHeaderBytes(),
		ErrorLog:       serverErrorLog(s.log),
		BaseContext:    func(net.Listener) context.Context { return s.baseCtx },
		// Per-connection state for the HTTP/2 rapid-reset guard (forward.go).
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			return context.WithValue(ctx, connGuardKey{}, &connGuard{conn: c})
		},
		HTTP2: &http.HTTP2Config{
			// Enough for a browser's page load and Cells Sync's calls.
			MaxConcurrentStreams: 250,
			// The RFC 9113 default frame size, as nginx and Envoy keep
			// it: Go's 1 MiB buys a client nothing but more memory held
			// per frame read, and a HEADERS frame above it is a
			// connection error (RFC 9113 §4.2, h2spec 4.2/3).
			MaxReadFrameSize: maxFrameSize,
			// h2conn decodes every header block in step with the server,
			// with the same table size.
			MaxDecoderHeaderTableSize: hpackTableSize,
			// Large windows keep uploads and gRPC bulk streams moving on
			// links with latency; memory is taken only as data arrives.
			MaxReceiveBufferPerConnection: 8 << 20,
			MaxReceiveBufferPerStream:     4 << 20,
			// Keep NAT paths of idle Cells Sync connections open and
			// notice dead clients.
			SendPingTimeout: s.pingAfter,
			PingTimeout:     s.pingWait,
		},
	}
	srv.Protocols = new(http.Protocols)
	protos(srv.Protocols)
	return srv
}

// handshakeTimeout bounds a new connection's TLS handshake and first bytes
// on both TLS ports.
const handshakeTimeout = 10 * time.Second

// keepAliveTimeout is nginx's keepalive_timeout default; h2PingAfter and
// h2PingWait are how long an HTTP/2 connection may read no frame before the
// server sends a PING, and then wait for its answer.
const (
	keepAliveTimeout = 75 * time.Second
	h2PingAfter      = 60 * time.Second
	h2PingWait       = 20 * time.Second
)

// maxFrameSize is the HTTP/2 servers' SETTINGS_MAX_FRAME_SIZE.
const maxFrameSize = 16 << 10

// readHeaderTimeout is PROXY_READ_HEADER_TIMEOUT, 30 s if unset.
func (s *Server) readHeaderTimeout() time.Duration {
	if d := s.cfg.ReadHeaderTimeout; d > 0 {
		return d
	}
	return 30 * time.Second
}

func (s *Server) maxHeaderBytes() int {
	if s.cfg.MaxHeaderBytes > 0 {
		return s.cfg.MaxHeaderBytes
	}
	return 64 << 10
}

// h2Listener puts h2conn's filter in front of an HTTP/2 server. Its HPACK
// strings may be as long as net/http's (MaxHeaderBytes and 4 KiB) and more;
// its header list limit is the server's, to the byte. A header block must
// end within PROXY_READ_HEADER_TIMEOUT, on the gRPC port too (whose
// server's ReadHeaderTimeout bounds the handshake instead).
func (s *Server) h2Listener(ln net.Listener) net.Listener {
	return h2Listener{Listener: ln, maxFrame: maxFrameSize, maxString: 2*s.maxHeaderBytes() + 8<<10,
		maxList: h2MaxHeaderList(s.maxHeaderBytes()), readHeader: s.readHeaderTimeout(), stall: s.h2WriteStall()}
}

// h2SendTimeout is nginx's send_timeout: an HTTP/2 client whose socket
// takes no byte for this long is gone or hostile, and its connection is
// closed (writeBehind).
const h2SendTimeout = 60 * time.Second

// h2WriteStall is h2SendTimeout, or PROXY_IDLE_TIMEOUT if that is shorter:
// an exchange whose client has not taken a byte for that long is cut, and
// on HTTP/2 only closing the connection frees its handler.
func (s *Server) h2WriteStall() time.Duration {
	if d := s.cfg.IdleTimeout; d > 0 && d < h2SendTimeout {
		return d
	}
	return h2SendTimeout
}

// h2MaxHeaderList is the header list limit, in RFC 9113's measure, that
// net/http's HTTP/2 server derives from MaxHeaderBytes and advertises as
// SETTINGS_MAX_HEADER_LIST_SIZE: 32 bytes more for each of ten fields
// (http2adjustHTTP1MaxHeaderSize). TestH2OversizedHeaders fails if it
// drifts from net/http's.
func h2MaxHeaderList(maxHeaderBytes int) int {
	return maxHeaderBytes + 10*32
}

// drainer is a server that Run drains: an http.Server, or the HTTP/1.1
// front.
type drainer interface {
	Shutdown(context.Context) error
	Close() error
}

// serverErrorLog is net/http's ErrorLog for the proxy's servers. What it
// says about clients (a TLS handshake cut short, a bad HTTP/2 preface) is
// at debug: any client can make such lines. A handler's panic, with its
// stack, is at error, as the HTTP/1.1 front logs it.
func serverErrorLog(l *slog.Logger) *log.Logger {
	return log.New(errorLogWriter{l}, "", 0)
}

type errorLogWriter struct{ l *slog.Logger }

func (w errorLogWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSuffix(string(p), "\n")
	level := slog.LevelDebug
	if strings.Contains(msg, "panic serving") {
		level = slog.LevelError
	}
	w.l.Log(context.Background(), level, msg)
	return len(p), nil
}

// inTurn drains its servers one after the other. Those that wait their
// turn stop keep-alive at once: their idle connections close, and the
// requests they still serve are answered with Connection: close, as
// Shutdown would, while their listener stays open for what comes to them.
type inTurn []drainer

func (q inTurn) Shutdown(ctx context.Context) error {
	for _, d := range q[1:] {
		if srv, ok := d.(*http.Server); ok {
			srv.SetKeepAlivesEnabled(false)
		}
	}
	var first error
	for _, d := range q {
		if err := d.Shutdown(ctx); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (q inTurn) Close() error {
	var first error
	for _, d := range q {
		if err := d.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// serving tracks the servers that Run must drain.
type serving struct {
	servers []drainer
	errc    chan error
	wg      sync.WaitGroup
}

// serve runs srv on ln, to be drained by Run.
func (sv *serving) serve(srv *http.Server, ln net.Listener) {
	sv.servers = append(sv.servers, srv)
	sv.start(srv, ln)
}

// start runs srv on ln; the caller has Run drain it.
func (sv *serving) start(srv *http.Server, ln net.Listener) {
	sv.wg.Go(func() {
		if err := srv.Serve(ln); !isClosed(err) {
			sv.errc <- fmt.Errorf("serving %s: %w", ln.Addr(), err)
		}
	})
}

// isClosed recognises the errors of a listener closed on purpose.
func isClosed(err error) bool {
	return err == nil || errors.Is(err, http.ErrServerClosed) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, cmux.ErrListenerClosed) || errors.Is(err, cmux.ErrServerClosed)
}

// Run serves until ctx ends, then shuts down in this order: readiness turns
// 503 and listeners stop accepting; in-flight requests get
// PROXY_SHUTDOWN_TIMEOUT to finish (HTTP/2 clients get GOAWAY); websockets
// are closed with 1001; whatever still runs is cancelled and closed.
func (s *Server) Run(ctx context.Context) error {
	if s.mainLn == nil {
		if err := s.Listen(); err != nil {
			return err
		}
	}
	sv := &serving{errc: make(chan error, 8)}

	// The public port: TLS, then cmux sends the HTTP/2 preface to an
	// HTTP/2-only server and everything else to an HTTP/1 server. Behind
	// cmux the connection is no *tls.Conn, so the HTTP/2 server runs as
	// "unencrypted" HTTP/2 over the already-decrypted stream.
	// Under TLS, a socket that tells an upload's copy when it would wait
	// (upload.go).
	acceptDone := make(chan struct{})
	var root net.Listener = &retryListener{Listener: socketListener{s.mainLn}, log: s.log, done: acceptDone}
	if s.tls != nil && s.cfg.TLS {
		root = tls.NewListener(root, s.tls)
	}
	pending := &matching{conns: make(map[net.Conn]struct{})}
	s.pending.Store(pending)
	mux := cmux.New(pending.listener(root))
	// A connection must finish its TLS handshake and show its first bytes
	// within this, or it is dropped before it costs a server goroutine.
	mux.SetReadTimeout(s.handshake)
	// A TLS connection that agreed h2 in ALPN speaks HTTP/2 whatever its
	// first bytes (RFC 9113 §3.3): a bad preface must end the connection,
	// not reach the HTTP/1 server as a request to answer with 400. Without
	// ALPN, and in cleartext, the preface decides.
	h2ln := mux.MatchWithWriters(pending.matched(alpnH2), pending.matched(preface(cmux.HTTP2())))
	// Every other connection that has shown a byte in time is HTTP/1's.
	// One that has not (a failed handshake, a silent client) matches
	// nothing and cmux closes it: handed on, it would wait
	// PROXY_READ_HEADER_TIMEOUT more for a request. It leaves pending
	// either way.
	h1ln := mux.MatchWithWriters(pending.last(preface(shows)))
	var public http.Handler = s.fwd
	if s.cfg.TLS && s.cfg.HSTS != "" {
		public = hsts(public, s.cfg.HSTS)
	}
	sv.serve(s.newHTTPServer(public, func(p *http.Protocols) { p.SetUnencryptedHTTP2(true) }), s.h2Listener(h2ln))
	// HTTP/1.1: the front serves the direct path's requests and hands a
	// connection to net/http's server at its first other one.
	h1srv := s.newHTTPServer(public, func(p *http.Protocols) { p.SetHTTP1(true) })
	front := newH1Front(public, s.baseCtx, s.log, h1srv.ReadHeaderTimeout, h1srv.IdleTimeout, h1ln.Addr())
	s.front.Store(front)
	sv.start(h1srv, front.slow)
	// The front hands connections over until it has drained: a request
	// whose head was still arriving when the drain began may turn out to
	// be net/http's (an upload, an upgrade), which must then serve it.
	sv.servers = append(sv.servers, inTurn{front, h1srv})
	sv.wg.Go(func() {
		if err := front.Serve(h1ln); !isClosed(err) {
			sv.errc <- fmt.Errorf("serving %s: %w", h1ln.Addr(), err)
		}
	})
	sv.wg.Go(func() {
		if err := mux.Serve(); !isClosed(err) {
			sv.errc <- fmt.Errorf("accepting on %s: %w", s.mainLn.Addr(), err)
		}
	})
	s.log.Info("listening", "addr", s.mainLn.Addr().String(), "tls", s.cfg.TLS, "upstream", s.cfg.Upstream.String())

	if s.grpcLn != nil {
		// The dedicated gRPC port (the classic nginx 33060): always TLS and
		// HTTP/2, every request to the gRPC upstream.
		// As behind cmux, the TLS is ours and the HTTP/2 server runs as
		// "unencrypted" HTTP/2 behind h2conn. ALPN offers h2 alone.
		srv := s.newHTTPServer(s.fwd.grpcHandler(), func(p *http.Protocols) { p.SetUnencryptedHTTP2(true) })
		// No cmux here: the TLS handshake happens inside net/http's peek
		// at the preface, which ReadHeaderTimeout bounds. Give it the
		// public port's 10 s, not PROXY_READ_HEADER_TIMEOUT (HTTP/2 does
		// not use it otherwise).
		srv.ReadHeaderTimeout = s.handshake
		tc := s.tls.Clone()
		tc.NextProtos = []string{"h2"}
		// net/http waits too when accepting fails, but logs it at debug.
		// Under TLS, the socket whose batch sends the records of each of
		// writeBehind's writes in one write(2), as on the public port.
		ln := &retryListener{Listener: socketListener{s.grpcLn}, log: s.log, done: acceptDone}
		srv.ConnState = pending.connState
		sv.serve(srv, s.h2Listener(tls.NewListener(ln, tc)))
		up := "none" // calls get UNAVAILABLE naming PYDIO_GRPC_EXTERNAL
		if s.cfg.GRPCUpstream != nil {
			up = s.cfg.GRPCUpstream.String()
		}
		s.log.Info("listening", "addr", s.grpcLn.Addr().String(), "grpc_upstream", up)
	}
	if s.httpLn != nil {
		srv := s.newHTTPServer(http.HandlerFunc(s.redirect), func(p *http.Protocols) { p.SetHTTP1(true) })
		// The redirect never reads a body, but net/http discards up to
		// 256 KiB of one before it answers, and without a deadline a
		// client that stalls in its body holds the connection for good:
		// the whole request, head and body, within the head's limit.
		srv.ReadTimeout = srv.ReadHeaderTimeout
		srv.ConnState = pending.unanswered
		sv.serve(srv, &retryListener{Listener: s.httpLn, log: s.log, done: acceptDone})
		s.log.Info("listening", "addr", s.httpLn.Addr().String(), "redirect_port", s.cfg.RedirectPort)
	}
	var healthSrv *http.Server
	if s.healthLn != nil {
		healthSrv = &http.Server{
			Handler: s.health,
			// Only healthchecks talk here (the local command, a kubelet);
			// they must not hang.
			ReadHeaderTimeout: 5 * time.Second,
			WriteTimeout:      10 * time.Second,
			ErrorLog:          serverErrorLog(s.log),
		}
		// The healthcheck's port warns too when descriptors run out: an
		// unhealthy container, and the operator is to know why.
		ln := &retryListener{Listener: s.healthLn, log: s.log, done: acceptDone}
		sv.wg.Go(func() {
			if err := healthSrv.Serve(ln); !isClosed(err) {
				sv.errc <- fmt.Errorf("serving %s: %w", ln.Addr(), err)
			}
		})
		s.log.Info("listening", "addr", s.healthLn.Addr().String(), "health", "/livez /readyz")
	}

	// A renewed certificate on disk is served without a restart.
	watchCtx, stopWatch := context.WithCancel(ctx)
	defer stopWatch()
	if s.certFiles != nil {
		sv.wg.Go(func() { s.certFiles.watch(watchCtx) })
	}
	// So is Cells' (CELLS_UPSTREAM_CA_FILE) re-issued under a new root.
	if s.fwd.ca != nil {
		sv.wg.Go(func() { s.fwd.ca.watch(watchCtx) })
	}
	// What /readyz would say of Cells is logged from the start.
	if s.watchEvery > 0 {
		sv.wg.Go(func() { s.health.watchStart(watchCtx, s.watchEvery) })
	}

	var runErr error
	select {
	case <-ctx.Done():
		s.log.Info("shutting down", "timeout", s.cfg.ShutdownTimeout.String())
	case runErr = <-sv.errc:
		s.log.Error("listener failed, shutting down", "err", runErr)
	}
	stopWatch()
	close(acceptDone)
	pending.closeAll()
	if s.shutdown(mux, sv.servers) && runErr == nil {
		runErr = ErrCut
	}
	if healthSrv != nil {
		healthSrv.Close()
	}
	sv.wg.Wait()
	return runErr
}

// ErrCut is Run's error when Cut ended the drain before what was in flight
// had finished.
var ErrCut = errors.New("drain cut short")

// Cut ends the drain now, as if PROXY_SHUTDOWN_TIMEOUT had passed: what
// still runs is cut and closed, and Run returns ErrCut. Called before the
// drain has begun, it makes the drain take no time. main calls it on a
// second SIGTERM or SIGINT.
func (s *Server) Cut() { s.cutDrain() }

// shutdown drains servers and reports whether Cut ended the drain.
func (s *Server) shutdown(mux cmux.CMux, servers []drainer) (cut bool) {
	s.draining.Store(true)
	// Stop accepting on every port at once; http.Server.Shutdown closes
	// its listener too, but cmux's children share one root listener.
	mux.Close()
	s.mainLn.Close()

	drainCtx, cancel := context.WithTimeout(s.cut, s.cfg.ShutdownTimeout)
	defer cancel()
	if up := s.fwd.grpcUp; up != nil && s.grpcGrace < s.cfg.ShutdownTimeout {
		// Uploads and downloads have the whole drain; gRPC calls only
		// the grace (grpcDrainGrace), then end with UNAVAILABLE.
		grace := time.AfterFunc(s.grpcGrace, func() {
			n := up.Close()
			s.fwd.cutGRPC()
			if n > 0 {
				s.log.Info("drain: gRPC calls still open end with UNAVAILABLE", "calls", n, "after", s.grpcGrace.String())
			}
		})
		defer grace.Stop()
	}
	var wg sync.WaitGroup
	for _, srv := range servers {
		wg.Go(func() {
			// Shutdown sends GOAWAY to HTTP/2 clients and waits for
			// in-flight requests; hijacked websockets are not waited for.
			// Its deadline passing, or Cut, is no failure.
			if err := srv.Shutdown(drainCtx); err != nil && !isClosed(err) && drainCtx.Err() == nil {
				s.log.Warn("shutdown", "err", err)
			}
		})
	}
	wg.Wait()
	cut = drainCtx.Err() != nil && s.cut.Err() != nil
	if cut {
		// Counted before the websockets close: they are in live too.
		ws := s.fwd.ws.count()
		s.log.Warn("drain cut short, closing remaining connections",
			"requests", s.fwd.live.Load()-int64(ws), "websockets", ws)
	}
	s.fwd.ws.closeAll()
	if drainCtx.Err() != nil {
		// The drain deadline passed: end what still runs. Cancelling with
		// a cause lets gRPC calls end with UNAVAILABLE rather than a reset.
		if !cut {
			s.log.Warn("drain deadline passed, closing remaining connections")
		}
		s.cancelBase(errShutdown)
		time.Sleep(50 * time.Millisecond)
		for _, srv := range servers {
			srv.Close()
		}
	}
	s.cancelBase(context.Canceled)
	// The exchanges cut above end on their own goroutines; each writes
	// its access line as it ends. Those are the lines an operator looks
	// for after a restart, so Run returns only once they are written.
	if n := s.fwd.waitExchanges(exchangesLinger); n > 0 {
		s.log.Warn("drain: exchanges still running at exit; their access lines are missing", "exchanges", n)
	}
	s.fwd.httpUp.CloseIdleConnections()
	if s.fwd.grpcUp != nil {
		s.fwd.grpcUp.Close()
	}
	s.log.Info("stopped")
	return cut
}

// exchangesLinger bounds the wait for the exchanges that the drain ended
// (lingerTimeout's 2 s): their connections are closed, so they end at once
// but for a handler stuck where no close reaches it.
const exchangesLinger = 2 * time.Second

// retryListener waits before accepting again when accepting failed for
// lack of descriptors or memory, from 5 ms doubling to 1 s, and warns, as
// net/http's servers do (nginx stops accepting for 500 ms). cmux, which
// accepts for the public port, retries such errors at once: a flood of
// connections that used up RLIMIT_NOFILE made it spin on a core until
// descriptors were freed. net/http's servers wait, but log it through
// ErrorLog, at debug (serverErrorLog); behind a retryListener they never see
// the error.
type retryListener struct {
	net.Listener
	log    *slog.Logger
	done   <-chan struct{} // closed when shutdown begins: no more waiting
	logged time.Time       // the last warning; cmux and net/http accept on one goroutine
}

func (l *retryListener) Accept() (net.Conn, error) {
	var delay time.Duration
	for {
		c, err := l.Listener.Accept()
		if err == nil || !(errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
			errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)) {
			return c, err
		}
		delay = min(max(2*delay, 5*time.Millisecond), time.Second)
		// At most a line a second: under a flood, each descriptor freed
		// is taken at once and the next accept fails again.
		if time.Since(l.logged) >= time.Second {
			l.logged = time.Now()
			l.log.Warn("accepting connections failed, retrying", "addr", l.Addr().String(), "err", err, "retry_in", delay.String())
		}
		select {
		case <-time.After(delay):
		case <-l.done:
			return nil, net.ErrClosed
		}
	}
}

// matching holds the public port's connections that cmux is still
// matching: their TLS handshake or first bytes have not arrived. They
// belong to no server yet, nothing in them is to drain, and the stop
// closes them: cmux's Serve waits for each until it is matched or its read
// deadline passes (handshakeTimeout), and a port scanner's silent
// connection, or a client's idle preconnect, held every stop for 10 s.
//
// It holds too the gRPC and the redirect ports' connections that have not
// begun a request (connState): no HTTP/2 preface read yet, or no request
// head. http.Server.Shutdown counts such a connection as idle only once it
// is 5 s old (golang/go#22682), and so held the stop that long. On the
// redirect port a request whose head or body is still arriving is dropped
// with them (unanswered): its answer would send the client to the public
// port, which no longer accepts.
type matching struct {
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
}

// listener tracks the connections that ln, cmux's root, accepts.
func (m *matching) listener(ln net.Listener) net.Listener { return matchingListener{ln, m} }

// matched is mw, forgetting the connections it matches. cmux passes a
// matcher the connection its root accepted as the writer.
func (m *matching) matched(mw cmux.MatchWriter) cmux.MatchWriter {
	return func(w io.Writer, r io.Reader) bool {
		if !mw(w, r) {
			return false
		}
		if c, ok := w.(net.Conn); ok {
			m.mu.Lock()
			delete(m.conns, c)
			m.mu.Unlock()
		}
		return true
	}
}

// connState is an http.Server's ConnState: it holds the connections that
// have not begun a request. net/http's HTTP/2 server leaves StateNew once
// it has read the preface, before it reads a frame.
func (m *matching) connState(c net.Conn, st http.ConnState) {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case st != http.StateNew:
		delete(m.conns, c)
	case m.closed:
		c.Close()
	default:
		m.conns[c] = struct{}{}
	}
}

// unanswered is connState for the redirect port: a connection is held
// too while its request is active, as its body may still be arriving
// (net/http discards it before answering). Its answer would send the
// client to the public port, which no longer accepts once the stop begins.
func (m *matching) unanswered(c net.Conn, st http.ConnState) {
	if st == http.StateActive {
		st = http.StateNew
	}
	m.connState(c, st)
}

// last is mw for the last matcher: a connection it does not match, cmux
// closes, so it leaves pending whatever mw says.
func (m *matching) last(mw cmux.MatchWriter) cmux.MatchWriter {
	return func(w io.Writer, r io.Reader) bool {
		ok := mw(w, r)
		if c, isConn := w.(net.Conn); isConn {
			m.mu.Lock()
			delete(m.conns, c)
			m.mu.Unlock()
		}
		return ok
	}
}

// closeAll closes the connections still matching or with no request
// begun, and from now on those that the root accepts or a server sees new.
func (m *matching) closeAll() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.closed = true
	for c := range m.conns {
		c.Close()
	}
	clear(m.conns)
}

type matchingListener struct {
	net.Listener
	m *matching
}

func (l matchingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return c, err
	}
	l.m.mu.Lock()
	if l.m.closed {
		c.Close()
	} else {
		l.m.conns[c] = struct{}{}
	}
	l.m.mu.Unlock()
	return c, nil
}

// alpnH2 matches a TLS connection that agreed h2 in ALPN and has sent its
// first byte. cmux hands a matcher the connection itself as its writer;
// cmux's read deadline bounds the handshake and that byte, which the HTTP/2
// server would otherwise wait for under PROXY_READ_HEADER_TIMEOUT.
func alpnH2(w io.Writer, r io.Reader) bool {
	tc, ok := w.(*tls.Conn)
	if !ok {
		return false
	}
	if err := tc.Handshake(); err != nil {
		answerPlainHTTP(err)
		return false
	}
	return tc.ConnectionState().NegotiatedProtocol == "h2" && shows(r)
}

// answerPlainHTTP answers a client that sent a plain HTTP request to a TLS
// port (http://host:443, a load balancer that does not speak TLS to the
// proxy) with a 400 that says so, as net/http's TLS servers do (Cells' own
// among them) and nginx does (its 497), rather than a closed connection and
// no word. err is the handshake's: the public port's runs in alpnH2, the
// gRPC port's in h2conn's first read; neither is net/http's to answer. The
// connection is closed after it.
func answerPlainHTTP(err error) {
	var re tls.RecordHeaderError
	if !errors.As(err, &re) || re.Conn == nil {
		return
	}
	switch string(re.RecordHeader[:]) {
	case "GET /", "HEAD ", "POST ", "PUT /", "OPTIO", "DELET", "PATCH", "PROPF":
		re.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		io.WriteString(re.Conn, "HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\nClient sent an HTTP request to an HTTPS server.\n")
	}
}

// shows reports whether the client has sent a byte before cmux's read
// deadline.
func shows(r io.Reader) bool {
	var b [1]byte
	n, _ := r.Read(b[:])
	return n > 0
}

// preface adapts a cmux.Matcher to MatchWithWriters.
func preface(m cmux.Matcher) cmux.MatchWriter {
	return func(_ io.Writer, r io.Reader) bool { return m(r) }
}

// hsts adds Strict-Transport-Security to every response of h that has none
// (Cells' own value wins). Only the TLS public port uses it: RFC 6797 §7.2
// forbids it over cleartext, where it would be ignored anyway.
func hsts(h http.Handler, value string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h.ServeHTTP(&hstsWriter{ResponseWriter: w, value: value}, r)
	})
}

type hstsWriter struct {
	http.ResponseWriter
	value string
	done  bool
}

// Unwrap lets http.ResponseController flush and hijack.
func (w *hstsWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *hstsWriter) WriteHeader(code int) {
	// Informational responses (100, 103) share the header map: wait for
	// the final one.
	if code >= 200 {
		w.set()
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *hstsWriter) Write(p []byte) (int, error) {
	w.set()
	return w.ResponseWriter.Write(p)
}

func (w *hstsWriter) set() {
	if w.done {
		return
	}
	w.done = true
	if h := w.Header(); h.Get("Strict-Transport-Security") == "" {
		h.Set("Strict-Transport-Security", w.value)
	}
}
