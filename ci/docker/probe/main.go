// Command probe checks a running cells-proxy from the outside, for
// ci/docker/test.sh: one HTTP request, a websocket echo, a gRPC call, each
// exiting 0 on success and 1 with one line on stderr otherwise.
//
// Usage:
//
//	probe freeports N                       print N free loopback TCP ports, one a line
//	probe get [flags] URL                   GET URL; -status, -contains, -proto, -h1, -ca, -insecure
//	probe ws [flags] URL                    websocket echo: send a message, expect it back
//	probe grpc [flags] HOST:PORT            grpc.health.v1 Check and a TestService UnaryCall over TLS
//
// It is a test client: -insecure skips certificate verification, which the
// proxy's in-memory self-signed certificate needs.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "probe:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: probe freeports|get|ws|grpc [args]")
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet("probe "+cmd, flag.ContinueOnError)
	timeout := fs.Duration("timeout", 10*time.Second, "overall deadline")
	insecure := fs.Bool("insecure", false, "skip certificate verification")
	caFile := fs.String("ca", "", "PEM file of CA certificates to trust instead of the system's")
	serverName := fs.String("servername", "", "TLS server name to send and verify; empty: the URL's host")
	status := fs.Int("status", http.StatusOK, "get: the status code wanted")
	contains := fs.String("contains", "", "get: a string the body must contain")
	proto := fs.String("proto", "", `get: the protocol wanted ("HTTP/1.1", "HTTP/2.0"); empty: any`)
	h1 := fs.Bool("h1", false, "get: offer HTTP/1.1 only (no h2 in ALPN)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	if cmd == "freeports" {
		return freePorts(fs.Arg(0), stdout)
	}
	if fs.NArg() != 1 {
		return fmt.Errorf("%s: want exactly one target, got %q", cmd, fs.Args())
	}
	target := fs.Arg(0)
	tc, err := tlsConfig(*insecure, *caFile, *serverName)
	if err != nil {
		return err
	}
	switch cmd {
	case "get":
		return get(ctx, stdout, tc, target, *h1, *status, *contains, *proto)
	case "ws":
		return wsEcho(ctx, stdout, tc, target)
	case "grpc":
		return grpcCall(ctx, stdout, tc, target)
	}
	return fmt.Errorf("unknown command %q", cmd)
}

func tlsConfig(insecure bool, caFile, serverName string) (*tls.Config, error) {
	tc := &tls.Config{InsecureSkipVerify: insecure, ServerName: serverName}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", caFile)
		}
	}
	return tc, nil
}

// freePorts asks the kernel for n free ports on 127.0.0.1. They are closed
// again before use, so another process could take one in between: good enough
// for a test on a quiet machine.
func freePorts(arg string, stdout io.Writer) error {
	n, err := strconv.Atoi(arg)
	if err != nil || n < 1 {
		return fmt.Errorf("freeports: want a count, got %q", arg)
	}
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		fmt.Fprintln(stdout, ln.Addr().(*net.TCPAddr).Port)
	}
	return nil
}

func get(ctx context.Context, stdout io.Writer, tc *tls.Config, url string, h1 bool, wantStatus int, wantBody, wantProto string) error {
	tr := &http.Transport{TLSClientConfig: tc, ForceAttemptHTTP2: !h1}
	if h1 {
		// A non-nil empty map turns HTTP/2 off (net/http's documented switch).
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	client := &http.Client{
		Transport: tr,
		// The redirect itself is what a 301 check looks at.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("GET %s: reading body: %w", url, err)
	}
	if got := resp.StatusCode; got != wantStatus {
		return fmt.Errorf("GET %s: status %d, want %d; body %.200q", url, got, wantStatus, body)
	}
	if wantBody != "" && !bytes.Contains(body, []byte(wantBody)) {
		return fmt.Errorf("GET %s: body %.300q does not contain %q", url, body, wantBody)
	}
	if wantProto != "" && resp.Proto != wantProto {
		return fmt.Errorf("GET %s: protocol %s, want %s", url, resp.Proto, wantProto)
	}
	fmt.Fprintf(stdout, "GET %s: %s %s", url, resp.Proto, resp.Status)
	if loc := resp.Header.Get("Location"); loc != "" {
		fmt.Fprintf(stdout, " Location: %s", loc)
	}
	fmt.Fprintln(stdout)
	return nil
}

func wsEcho(ctx context.Context, stdout io.Writer, tc *tls.Config, url string) error {
	// A websocket upgrade is HTTP/1.1 only: no ForceAttemptHTTP2 here.
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: tc}}
	c, _, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPClient: hc})
	if err != nil {
		return fmt.Errorf("websocket dial %s: %w", url, err)
	}
	defer c.CloseNow()
	msg := []byte("cells-proxy docker test " + time.Now().Format(time.RFC3339Nano))
	if err := c.Write(ctx, websocket.MessageText, msg); err != nil {
		return fmt.Errorf("websocket write: %w", err)
	}
	typ, got, err := c.Read(ctx)
	if err != nil {
		return fmt.Errorf("websocket read: %w", err)
	}
	if typ != websocket.MessageText || !bytes.Equal(got, msg) {
		return fmt.Errorf("websocket echo: got %v %q, want text %q", typ, got, msg)
	}
	c.Close(websocket.StatusNormalClosure, "")
	fmt.Fprintf(stdout, "websocket %s: echoed %d bytes\n", url, len(got))
	return nil
}

func grpcCall(ctx context.Context, stdout io.Writer, tc *tls.Config, addr string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(tc)))
	if err != nil {
		return err
	}
	defer conn.Close()
	hr, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return fmt.Errorf("grpc health check %s: %w", addr, err)
	}
	if got, want := hr.GetStatus(), healthpb.HealthCheckResponse_SERVING; got != want {
		return fmt.Errorf("grpc health check %s: status %v, want %v", addr, got, want)
	}
	payload := strings.Repeat("x", 1024)
	ur, err := testgrpc.NewTestServiceClient(conn).UnaryCall(ctx, &testgrpc.SimpleRequest{
		ResponseSize: int32(len(payload)),
		Payload:      &testgrpc.Payload{Body: []byte(payload)},
	})
	if err != nil {
		return fmt.Errorf("grpc UnaryCall %s: %w", addr, err)
	}
	if got, want := len(ur.GetPayload().GetBody()), len(payload); got != want {
		return fmt.Errorf("grpc UnaryCall %s: %d payload bytes, want %d", addr, got, want)
	}
	fmt.Fprintf(stdout, "grpc %s: health SERVING, UnaryCall %d bytes\n", addr, len(payload))
	return nil
}
