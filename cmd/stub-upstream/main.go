// Command stub-upstream stands in for a Pydio Cells server in tests, in the
// Docker image test and in the benchmarks (bench/).
//
// Like Cells, its TLS port serves HTTP/1.1 and HTTP/2 and hands requests whose
// Content-Type starts with "application/grpc" to a gRPC server, everything
// else to an HTTP handler (pydio/cells common/server/caddy/mux/mux.go). It can
// also listen in plain HTTP/1.1 (Cells with CELLS_SITE_NO_TLS=1) and as a
// plaintext gRPC server (Cells' CELLS_GRPC_EXTERNAL port, h2c with prior
// knowledge).
//
// Usage:
//
//	stub-upstream [-https ADDR] [-http ADDR] [-h2c ADDR] [-cert FILE -key FILE] [-write-ca FILE]
//
// Every listener prints one line to stdout once it is bound, e.g.
// "listening https 127.0.0.1:43121", so that a script can start it on port 0
// and read the port back.
//
// HTTP routes:
//
//	/healthz        200 "ok"
//	/small          200 text/plain "hello from cells\n"
//	/bytes/N        N bytes, with Content-Length
//	/stream/N       N bytes of unknown length (chunked on HTTP/1.1), as Cells streams a zip it builds
//	/upload...      PUT or POST: drains the body, answers {"bytes":N}
//	/ws/...         websocket echo (text and binary)
//	anything else   200 JSON echo of the request (see echoReply)
//
// gRPC services: grpc.testing.TestService (the grpc-go interop test server)
// and grpc.health.v1.Health (SERVING).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cells-proxy/cells-proxy/proxy"
	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

func main() {
	if err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "stub-upstream:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("stub-upstream", flag.ContinueOnError)
	fs.SetOutput(stderr)
	httpsAddr := fs.String("https", "", "TLS listen address (HTTP/1.1, HTTP/2 and gRPC split by content-type); empty: off")
	httpAddr := fs.String("http", "", "plain HTTP/1.1 listen address; empty: off")
	h2cAddr := fs.String("h2c", "", "plaintext gRPC listen address (h2c prior knowledge); empty: off")
	certFile := fs.String("cert", "", "PEM certificate for -https; empty: generate a self-signed one")
	keyFile := fs.String("key", "", "PEM private key for -cert")
	writeCA := fs.String("write-ca", "", "write the generated certificate (PEM) to this file, for use as a CA file")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *httpsAddr == "" && *httpAddr == "" && *h2cAddr == "" {
		return errors.New("nothing to do: set at least one of -https, -http, -h2c")
	}
	if (*certFile == "") != (*keyFile == "") {
		return errors.New("-cert and -key go together")
	}

	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	gs := grpc.NewServer()
	testgrpc.RegisterTestServiceServer(gs, interop.NewTestServer())
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("grpc.testing.TestService", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)

	h := newHandler()
	var (
		servers []*http.Server
		serveFn []func() error
	)
	listen := func(kind, addr string) (net.Listener, error) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s %s: %w", kind, addr, err)
		}
		fmt.Fprintf(stdout, "listening %s %s\n", kind, ln.Addr())
		return ln, nil
	}

	if *httpsAddr != "" {
		cert, err := loadOrGenerateCert(*certFile, *keyFile, *writeCA)
		if err != nil {
			return err
		}
		ln, err := listen("https", *httpsAddr)
		if err != nil {
			return err
		}
		srv := newServer(splitGRPC(gs, h), log)
		srv.TLSConfig = &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{cert},
			NextProtos:   []string{"h2", "http/1.1"},
		}
		servers = append(servers, srv)
		serveFn = append(serveFn, func() error { return srv.ServeTLS(ln, "", "") })
	} else if *writeCA != "" {
		return errors.New("-write-ca needs -https")
	}
	if *httpAddr != "" {
		ln, err := listen("http", *httpAddr)
		if err != nil {
			return err
		}
		srv := newServer(h, log)
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		servers = append(servers, srv)
		serveFn = append(serveFn, func() error { return srv.Serve(ln) })
	}
	if *h2cAddr != "" {
		ln, err := listen("h2c", *h2cAddr)
		if err != nil {
			return err
		}
		serveFn = append(serveFn, func() error { return gs.Serve(ln) })
	}

	errc := make(chan error, len(serveFn))
	for _, serve := range serveFn {
		go func() { errc <- serve() }()
	}

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		runErr = fmt.Errorf("serve: %w", runErr)
	}

	// Shutdown order: stop accepting and drain HTTP for a short while, then
	// cut whatever is left (long gRPC streams, hijacked websockets). This is
	// a test stub: a quick exit matters more than a perfect drain.
	shutCtx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for _, srv := range servers {
		wg.Go(func() { _ = srv.Shutdown(shutCtx) })
	}
	wg.Wait()
	gs.Stop()
	return runErr
}

func newServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler: h,
		// Slow-header protection only; no read or write timeout, since bodies
		// of several GB and streams that last for hours cross this server.
		ReadHeaderTimeout: 10 * time.Second,
		// Keep-alive connections of benchmark clients are idle between runs.
		IdleTimeout: 5 * time.Minute,
		ErrorLog:    slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
}

// splitGRPC sends gRPC requests to gs and everything else to h, as Cells does
// on its main port.
func splitGRPC(gs *grpc.Server, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			gs.ServeHTTP(w, r)
			return
		}
		h.ServeHTTP(w, r)
	})
}

// smallBody is the body of /small, the benchmarks' small GET.
const smallBody = "hello from cells\n"

// chunkSize is the size of the buffers used to stream /bytes and drain uploads.
const chunkSize = 256 << 10

type handler struct {
	bufs sync.Pool // *[]byte of chunkSize
	data []byte    // read-only contents for /bytes
}

func newHandler() *handler {
	h := &handler{data: make([]byte, chunkSize)}
	for i := range h.data {
		h.data[i] = byte('a' + i%26)
	}
	h.bufs.New = func() any { b := make([]byte, chunkSize); return &b }
	return h
}

// ServeHTTP routes by hand rather than with http.ServeMux: ServeMux redirects
// unclean paths, and the echo must show the request-target exactly as it
// arrived.
func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	switch {
	case p == "/healthz":
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "ok")
	case p == "/small":
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(smallBody)))
		io.WriteString(w, smallBody)
	case strings.HasPrefix(p, "/bytes/"):
		h.serveBytes(w, r)
	case strings.HasPrefix(p, "/stream/"):
		h.serveBytes(w, r)
	case p == "/upload" || strings.HasPrefix(p, "/upload/"):
		h.serveUpload(w, r)
	case strings.HasPrefix(p, "/ws/"):
		h.serveWebsocket(w, r)
	default:
		h.serveEcho(w, r)
	}
}

func (h *handler) serveBytes(w http.ResponseWriter, r *http.Request) {
	route, arg, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	n, err := strconv.ParseInt(arg, 10, 64)
	if err != nil || n < 0 {
		http.Error(w, "want /"+route+"/N with N a non-negative integer", http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	if route == "bytes" {
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	}
	if r.Method == http.MethodHead {
		return
	}
	for n > 0 {
		chunk := h.data[:min(n, int64(len(h.data)))]
		if _, err := w.Write(chunk); err != nil {
			return // the client went away
		}
		n -= int64(len(chunk))
	}
}

func (h *handler) serveUpload(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPut && r.Method != http.MethodPost {
		w.Header().Set("Allow", "PUT, POST")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	buf := h.bufs.Get().(*[]byte)
	defer h.bufs.Put(buf)
	var total int64
	for {
		n, err := r.Body.Read(*buf)
		total += int64(n)
		if err == io.EOF {
			break
		}
		if err != nil {
			http.Error(w, fmt.Sprintf("reading body after %d bytes: %v", total, err), http.StatusBadRequest)
			return
		}
	}
	writeJSON(w, struct {
		Bytes int64 `json:"bytes"`
	}{total})
}

func (h *handler) serveWebsocket(w http.ResponseWriter, r *http.Request) {
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		// Any origin: the proxy under test, not the stub, is what a browser talks to.
		InsecureSkipVerify: true,
		CompressionMode:    websocket.CompressionDisabled,
	})
	if err != nil {
		return // Accept has answered the client
	}
	defer c.CloseNow()
	c.SetReadLimit(64 << 20)
	ctx := r.Context()
	for {
		typ, rd, err := c.Reader(ctx)
		if err != nil {
			return // closed by the peer, or broken
		}
		wr, err := c.Writer(ctx, typ)
		if err != nil {
			return
		}
		buf := h.bufs.Get().(*[]byte)
		_, err = io.CopyBuffer(wr, rd, *buf)
		h.bufs.Put(buf)
		if err != nil {
			return
		}
		if err := wr.Close(); err != nil {
			return
		}
	}
}

// echoReply is what the stub answers on any other path: the request as the
// upstream saw it.
type echoReply struct {
	Method  string              `json:"method"`
	Host    string              `json:"host"`
	URI     string              `json:"uri"` // r.RequestURI, verbatim
	Proto   string              `json:"proto"`
	Headers map[string][]string `json:"headers"`
	Remote  string              `json:"remote"`
	TLS     bool                `json:"tls"`
}

func (h *handler) serveEcho(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	writeJSON(w, echoReply{
		Method:  r.Method,
		Host:    r.Host,
		URI:     r.RequestURI,
		Proto:   r.Proto,
		Headers: r.Header,
		Remote:  r.RemoteAddr,
		TLS:     r.TLS != nil,
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	b = append(b, '\n')
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.Write(b)
}

// loadOrGenerateCert loads certFile/keyFile, or, when they are empty,
// generates a self-signed ECDSA certificate for localhost, 127.0.0.1 and ::1,
// and writes it to caFile if that is set.
func loadOrGenerateCert(certFile, keyFile, caFile string) (tls.Certificate, error) {
	if certFile != "" {
		if caFile != "" {
			return tls.Certificate{}, errors.New("-write-ca only applies to a generated certificate")
		}
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return tls.Certificate{}, fmt.Errorf("load certificate: %w", err)
		}
		return cert, nil
	}
	// The same self-signed certificate cells-proxy makes for itself: its own
	// CA, so the PEM written by -write-ca serves as a client's CA file.
	cert, err := proxy.SelfSigned("localhost", "127.0.0.1", "::1")
	if err != nil {
		return tls.Certificate{}, err
	}
	der := cert.Certificate[0]
	if caFile != "" {
		p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		if err := os.WriteFile(caFile, p, 0o644); err != nil {
			return tls.Certificate{}, fmt.Errorf("write CA file: %w", err)
		}
	}
	return cert, nil
}
