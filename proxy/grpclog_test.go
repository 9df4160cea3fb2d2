package proxy

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// TestGRPCStatusLogged: the access line of a gRPC call names the gRPC
// status its client was sent (grpc_status), whether Cells or the proxy sent
// it: gRPC answers HTTP 200 even for a failed call, so status=200 alone
// did not tell an operator a failed Cells Sync call from a good one. An
// HTTP/1.1 request's line has none.
func TestGRPCStatusLogged(t *testing.T) {
	_, gs := newProbeServer(t)
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			gs.ServeHTTP(w, r)
			return
		}
		io.WriteString(w, "plain\n")
	}))
	cfg := testConfig(up)
	cfg.AccessLog = true
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	const (
		unary  = "/grpc.testing.TestService/UnaryCall"
		duplex = "/grpc.testing.TestService/FullDuplexCall"
	)
	from := 0
	wantStatus := func(path, want string) {
		t.Helper()
		line, at := sink.wait(t, from, isAccess(t, path))
		from = at + 1
		f := parseLogLine(t, line)
		got, ok := f["grpc_status"]
		switch {
		case want == "" && ok:
			t.Errorf("access line of %s: grpc_status=%s, want none; line: %s", path, got, line)
		case want != "" && got != want:
			t.Errorf("access line of %s: grpc_status=%q, want %q; line: %s", path, got, want, line)
		}
		if f["status"] != "200" {
			t.Errorf("access line of %s: status=%s, want 200 (the HTTP status)", path, f["status"])
		}
	}

	if _, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{}); err != nil {
		t.Fatalf("UnaryCall: %v", err)
	}
	wantStatus(unary, "0")

	// Trailers-Only: Cells fails the call before any message.
	_, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.NotFound), Message: "no such node"}})
	if got, want := status.Code(err), codes.NotFound; got != want {
		t.Fatalf("UnaryCall failed by Cells: %v, want %v", err, want)
	}
	wantStatus(unary, "5")

	// The status in the trailers, after a message Cells streamed.
	stream, err := tc.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: []*testgrpc.ResponseParameters{{Size: 1}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatalf("first message: %v", err)
	}
	if err := stream.Send(&testgrpc.StreamingOutputCallRequest{ResponseStatus: &testgrpc.EchoStatus{Code: int32(codes.NotFound)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.NotFound {
		t.Fatalf("stream failed by Cells after a message: %v, want NotFound", err)
	}
	wantStatus(duplex, "5")

	res, err := tp.H1.Get(tp.URL + "/plain")
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	wantStatus("/plain", "")
}

// TestGRPCStatusLoggedProxyAnswer: a call the proxy answers itself logs
// the code it sent: UNAVAILABLE when no gRPC upstream is configured,
// UNIMPLEMENTED for a host not in PROXY_SERVER_NAMES.
func TestGRPCStatusLoggedProxyAnswer(t *testing.T) {
	up := newUpstream(t, upPlain, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	for _, tt := range []struct {
		name, names string
		want        codes.Code
	}{
		{"no-grpc-upstream", "", codes.Unavailable},
		{"unknown-host", "cells.example", codes.Unimplemented},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(up) // plain http upstream, no gRPC port: no gRPC upstream
			cfg.AccessLog = true
			if tt.names != "" {
				cfg.ServerNames = []string{tt.names}
			}
			sink := newLogSink()
			tp := startLoggedProxy(t, cfg, sink, "json")
			tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, err := tc.EmptyCall(ctx, &testgrpc.Empty{})
			if got := status.Code(err); got != tt.want {
				t.Fatalf("EmptyCall: %v, want %v", err, tt.want)
			}
			line, _ := sink.wait(t, 0, isAccess(t, "/grpc.testing.TestService/EmptyCall"))
			if got, want := parseLogLine(t, line)["grpc_status"], strconv.Itoa(int(tt.want)); got != want {
				t.Errorf("grpc_status = %q, want %q; line: %s", got, want, line)
			}
		})
	}
}

// TestGRPCDeadlineLoggedAtInfo: a call whose own deadline (grpc-timeout)
// passes before Cells answers is the client's choice of deadline, not
// Cells or the proxy failing: an Info line, no Warn (it was "upstream
// error" at Warn, status 504). The client here sends grpc-timeout but does
// not reset the stream at its deadline, so that the proxy's answer, not
// the client's reset, ends the call; Cells' handler ignores the deadline.
func TestGRPCDeadlineLoggedAtInfo(t *testing.T) {
	const path = "/test.Hold/Hold"
	up := newUpstream(t, upTLS, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
	}))
	cfg := testConfig(up)
	cfg.AccessLog = true
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")

	req, err := http.NewRequest(http.MethodPost, tp.URL+path, bytes.NewReader([]byte{0, 0, 0, 0, 0}))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	req.Header.Set("Grpc-Timeout", "100m")
	res, err := tp.H2.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if got, want := res.Header.Get("Grpc-Status"), "4"; got != want {
		t.Errorf("grpc-status of a call past its deadline = %q, want %q (DEADLINE_EXCEEDED)", got, want)
	}

	line, at := sink.wait(t, 0, isAccess(t, path))
	if got, want := parseLogLine(t, line)["grpc_status"], "4"; got != want {
		t.Errorf("grpc_status = %q, want %q; line: %s", got, want, line)
	}
	info := 0
	// The proxy's start warns of its self-signed certificate and of the
	// redirect port: only the call's own lines count.
	for _, l := range strings.Split(sink.String(), "\n")[:at] {
		f := parseLogLine(t, l)
		switch {
		case (f["level"] == "WARN" || f["level"] == "ERROR") && f["path"] == path:
			t.Errorf("a call past its own deadline logged at %s: %s", f["level"], l)
		case f["level"] == "INFO" && f["msg"] == "call's deadline passed before Cells answered":
			info++
			if f["path"] != path || f["method"] != http.MethodPost || f["host"] == "" || f["err"] == "" {
				t.Errorf("deadline line lacks method, host, path or err: %s", l)
			}
		}
	}
	if info != 1 {
		t.Errorf("%d Info lines for the deadline, want 1; log:\n%s", info, sink.String())
	}
}

// TestGRPCStatusLoggedAsClientReadsIt: grpc_status is the status the
// client takes from the call's end, however Cells wrote it. Cells put a
// grpc-status of 0 in its response head, then failed the call in its
// trailers: the client got INTERNAL, the line said 0, a failed call logged
// as a good one. And a grpc-status that is not a number, which grpc-go's
// client takes for UNKNOWN, left the line without grpc_status, as for a
// client that went away.
func TestGRPCStatusLoggedAsClientReadsIt(t *testing.T) {
	peer := newH2Peer(t, h2PeerConfig{}, func(s *h2Stream) {
		if _, err := s.readBody(); err != nil {
			return
		}
		switch s.Get("x-fate") {
		case "status-in-head":
			if s.writeHeaders(false, 1, ":status", "200", "content-type", "application/grpc", "grpc-status", "0") == nil &&
				s.writeData(streamMsg("first"), false) == nil {
				s.writeHeaders(true, 1, "grpc-status", "13", "grpc-message", "failed")
			}
		case "not-a-number":
			s.writeHeaders(true, 1, ":status", "200", "content-type", "application/grpc", "grpc-status", "internal")
		}
	})
	cfg := testConfig(newUpstream(t, upPlain, &recorder{}))
	cfg.GRPCUpstream = &url.URL{Scheme: "h2c", Host: peer.Addr}
	cfg.AccessLog = true
	sink := newLogSink()
	tp := startLoggedProxy(t, cfg, sink, "json")
	tc := testgrpc.NewTestServiceClient(dialProxy(t, tp, tp.Addr().String()))
	const path = "/grpc.testing.TestService/StreamingOutputCall"
	from := 0
	for _, c := range []struct {
		fate string
		msgs []string
		want codes.Code
	}{
		{"status-in-head", []string{"first"}, codes.Internal},
		{"not-a-number", nil, codes.Unknown},
	} {
		ctx := metadata.AppendToOutgoingContext(testCtx(t), "x-fate", c.fate)
		_, err := streamingRecv(t, ctx, tc, c.msgs...).Recv()
		if got := status.Code(err); got != c.want {
			t.Fatalf("%s: client got %v (%v), want %v", c.fate, got, err, c.want)
		}
		line, at := sink.wait(t, from, isAccess(t, path))
		from = at + 1
		if got, want := parseLogLine(t, line)["grpc_status"], strconv.Itoa(int(c.want)); got != want {
			t.Errorf("%s: grpc_status = %q, want %q, what the client got; line: %s", c.fate, got, want, line)
		}
	}
}
