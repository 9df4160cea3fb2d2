package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding/gzip"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
)

// Review of the client-facing side of gRPC: what a grpc-go client such as
// Cells Sync sends and gets on the proxy's public and dedicated ports.

// TestGRPCFrontReviewClientPings: a client's keepalive pings (grpc-go's,
// every 10 s or more, with PermitWithoutStream or not) are answered and
// never end the connection, however many come, with no call open and
// while a stream is open; a stream the client then resets is cancelled
// at Cells. The pings come as fast as the client can send them, a
// stricter test than grpc-go's own pace.
func TestGRPCFrontReviewClientPings(t *testing.T) {
	t.Parallel()
	e := startGRPC(t, topoH2C, nil)
	for _, port := range grpcPorts {
		t.Run(string(port), func(t *testing.T) {
			conn, fr := h2Conn(t, e.tp, e.addr(port))
			fr.ReadMetaHeaders = nil
			if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
				t.Fatal(err)
			}
			if err := fr.WriteSettings(); err != nil {
				t.Fatal(err)
			}
			// ping sends n pings and waits for each answer; a GOAWAY
			// or the connection's end fails the test.
			var seq uint64
			var headers bool
			ping := func(what string, n int) {
				t.Helper()
				for range n {
					seq++
					var data [8]byte
					binary.BigEndian.PutUint64(data[:], seq)
					if err := fr.WritePing(false, data); err != nil {
						t.Fatalf("%s: ping %d: %v", what, seq, err)
					}
					for {
						f, err := fr.ReadFrame()
						if err != nil {
							t.Fatalf("%s: waiting for the answer to ping %d: %v", what, seq, err)
						}
						switch f := f.(type) {
						case *http2.GoAwayFrame:
							t.Fatalf("%s: GOAWAY %v after %d pings", what, f.ErrCode, seq)
						case *http2.SettingsFrame:
							if !f.IsAck() {
								fr.WriteSettingsAck()
							}
						case *http2.HeadersFrame:
							headers = true
						}
						if p, ok := f.(*http2.PingFrame); ok && p.IsAck() && p.Data == data {
							break
						}
					}
				}
			}
			ping("no call open", 300)
			// A bidirectional stream that Cells holds open.
			block := hpackBlock(h2Fields("POST", e.addr(port), "/grpc.testing.TestService/FullDuplexCall",
				"content-type", "application/grpc", "te", "trailers", "x-probe", "hold")...)
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block, EndHeaders: true}); err != nil {
				t.Fatal(err)
			}
			h := waitHeld(t, e.svc)
			ping("a stream open", 300)
			for !headers {
				// Cells sent them before holding; they may still be on
				// their way (the connection's deadline bounds the wait).
				f, err := fr.ReadFrame()
				if err != nil {
					t.Fatalf("waiting for the held stream's response headers: %v", err)
				}
				switch f := f.(type) {
				case *http2.GoAwayFrame:
					t.Fatalf("GOAWAY %v while a stream is open", f.ErrCode)
				case *http2.HeadersFrame:
					headers = true
				}
			}
			if err := fr.WriteRSTStream(1, http2.ErrCodeCancel); err != nil {
				t.Fatal(err)
			}
			if err := waitEnded(t, h); err == nil {
				t.Error("Cells' handler ended without an error after the client reset the stream")
			}
			ping("after the stream", 10)
		})
	}
}

// TestGRPCFrontReviewDedicatedPort: on the PYDIO_GRPC_EXTERNAL port every
// HTTP/2 request goes to Cells' gRPC port, whatever its content type (the
// port is gRPC's alone, as nginx's grpc_pass server): grpc-go's answer to a
// content type it does not take (415 with grpc-status 3) reaches the
// client as Cells gave it, and application/grpc+proto is a gRPC call.
// Its TLS offers h2 alone: an HTTP/1.1 client is hung up on, never
// answered as if by Cells.
func TestGRPCFrontReviewDedicatedPort(t *testing.T) {
	t.Parallel()
	e := startGRPC(t, topoH2C, nil)
	addr := e.addr(portDedicated)
	tr := &http.Transport{TLSClientConfig: e.tp.TLSConfig(), Protocols: new(http.Protocols)}
	tr.Protocols.SetHTTP2(true)
	c := &http.Client{Transport: tr}
	t.Cleanup(c.CloseIdleConnections)
	empty := "\x00\x00\x00\x00\x00" // one empty gRPC message
	for _, tc := range []struct {
		ctype      string
		status     int
		grpcStatus string
	}{
		{"application/grpc+proto", 200, "0"},
		{"application/grpc;charset=utf-8", 200, "0"},
		{"application/grpc-web", 415, "3"},
		{"application/json", 415, "3"},
		{"", 415, "3"},
	} {
		t.Run(tc.ctype, func(t *testing.T) {
			req, err := http.NewRequestWithContext(testCtx(t), "POST", "https://"+addr+"/grpc.testing.TestService/EmptyCall", strings.NewReader(empty))
			if err != nil {
				t.Fatal(err)
			}
			if tc.ctype != "" {
				req.Header.Set("Content-Type", tc.ctype)
			}
			req.Header.Set("Te", "trailers")
			res, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil {
				t.Fatalf("reading the body: %v", err)
			}
			if got, want := res.StatusCode, tc.status; got != want {
				t.Errorf("status = %d, want %d", got, want)
			}
			got := res.Header.Get("Grpc-Status") + res.Trailer.Get("Grpc-Status")
			if got != tc.grpcStatus {
				t.Errorf("grpc-status = %q, want %q", got, tc.grpcStatus)
			}
			if tc.status == 200 && string(body) != empty {
				t.Errorf("body = %q, want one empty message", body)
			}
		})
	}
	for _, alpn := range [][]string{{"http/1.1"}, nil} {
		t.Run(fmt.Sprintf("HTTP/1.1 ALPN %q", alpn), func(t *testing.T) {
			conn, err := tls.Dial("tcp", addr, e.tp.TLSConfig(alpn...))
			if err != nil {
				return // refused in the handshake: not answered either
			}
			defer conn.Close()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			io.WriteString(conn, "GET /a/frontend/bootconf HTTP/1.1\r\nHost: "+addr+"\r\n\r\n")
			b, err := io.ReadAll(conn)
			if len(b) > 0 || err != nil {
				t.Errorf("read %q, %v; want the connection closed without an answer", b, err)
			}
		})
	}
	if n := e.rec.count(); n != 0 {
		t.Errorf("Cells' HTTP side saw %d requests from the gRPC port", n)
	}
}

// TestGRPCFrontReviewCompressed: gzip-compressed messages (grpc-encoding,
// grpc-accept-encoding) pass both ways, unary and streamed.
func TestGRPCFrontReviewCompressed(t *testing.T) {
	t.Parallel()
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		in := payload(64<<10, 7)
		res, err := tc.UnaryCall(testCtx(t), &testgrpc.SimpleRequest{Payload: in, ResponseSize: 32 << 10}, grpc.UseCompressor(gzip.Name))
		if err != nil {
			t.Fatalf("compressed unary call: %v", err)
		}
		if got, want := len(res.GetPayload().GetBody()), 32<<10; got != want {
			t.Errorf("response payload = %d bytes, want %d", got, want)
		}
		if got := e.svc.lastMD(t).Get("grpc-accept-encoding"); len(got) == 0 || !strings.Contains(got[0], "gzip") {
			t.Errorf("Cells saw grpc-accept-encoding %q, want gzip in it", got)
		}
		stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"), grpc.UseCompressor(gzip.Name))
		if err != nil {
			t.Fatal(err)
		}
		for i := range 20 {
			in := payload(8<<10, uint64(i))
			if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: in}); err != nil {
				t.Fatal(err)
			}
			out, err := stream.Recv()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.GetPayload().GetBody(), in.Body) {
				t.Fatalf("message %d: echo differs", i)
			}
		}
		stream.CloseSend()
		if _, err := stream.Recv(); err != io.EOF {
			t.Errorf("end of the stream = %v, want io.EOF", err)
		}
	})
}

// TestGRPCFrontReviewSmallMessages: thousands of small messages cross a
// bidirectional stream both ways at once, in order; and after the client's
// half-close Cells goes on sending thousands more, every one of which
// arrives before the stream's OK.
func TestGRPCFrontReviewSmallMessages(t *testing.T) {
	t.Parallel()
	const n = 3000
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"))
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		var sendErr error
		wg.Go(func() {
			for i := range n {
				body := []byte(fmt.Sprint(i))
				if sendErr = stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: body}}); sendErr != nil {
					return
				}
			}
			sendErr = stream.CloseSend()
		})
		for i := range n {
			out, err := stream.Recv()
			if err != nil {
				t.Fatalf("Recv %d: %v", i, err)
			}
			if got, want := string(out.GetPayload().GetBody()), fmt.Sprint(i); got != want {
				t.Fatalf("message %d = %q, want %q", i, got, want)
			}
		}
		if _, err := stream.Recv(); err != io.EOF {
			t.Errorf("end of the echo stream = %v, want io.EOF", err)
		}
		wg.Wait()
		if sendErr != nil {
			t.Errorf("sending: %v", sendErr)
		}

		// Half-close at once; Cells answers the one request with n
		// messages after it.
		params := make([]*testgrpc.ResponseParameters, n)
		for i := range params {
			params[i] = &testgrpc.ResponseParameters{Size: 8}
		}
		s2, err := tc.FullDuplexCall(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		if err := s2.Send(&testgrpc.StreamingOutputCallRequest{ResponseParameters: params}); err != nil {
			t.Fatal(err)
		}
		if err := s2.CloseSend(); err != nil {
			t.Fatal(err)
		}
		for i := range n {
			if _, err := s2.Recv(); err != nil {
				t.Fatalf("Recv %d after the half-close: %v", i, err)
			}
		}
		if _, err := s2.Recv(); err != io.EOF {
			t.Errorf("end of the stream after the half-close = %v, want io.EOF", err)
		}
	})
}

// TestGRPCFrontReviewLargeMetadata: request metadata of 40 KiB (text and
// binary, within PROXY_MAX_HEADER_BYTES) reaches Cells, and comes back as
// Cells' response headers and trailers, byte for byte.
func TestGRPCFrontReviewLargeMetadata(t *testing.T) {
	t.Parallel()
	text := strings.Repeat("0123456789abcdef", 1<<10) // 16 KiB
	bin := string(randomBytes(12<<10, 3))             // 16 KiB once base64-encoded
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		ctx := probe(testCtx(t), "echo", "x-echo-text", text, "x-trail-data-bin", bin)
		var header, trailer metadata.MD
		if _, err := tc.UnaryCall(ctx, &testgrpc.SimpleRequest{}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
			t.Fatalf("call with 40 KiB of metadata: %v", err)
		}
		md := e.svc.lastMD(t)
		if got := md.Get("x-echo-text"); len(got) != 1 || got[0] != text {
			t.Error("Cells saw x-echo-text changed")
		}
		if got := md.Get("x-trail-data-bin"); len(got) != 1 || got[0] != bin {
			t.Error("Cells saw x-trail-data-bin changed")
		}
		if got := header.Get("x-echo-text"); len(got) != 1 || got[0] != text {
			t.Error("response header x-echo-text changed")
		}
		if got := trailer.Get("x-trail-data-bin"); len(got) != 1 || got[0] != bin {
			t.Error("trailer x-trail-data-bin changed")
		}
	})
}

// TestGRPCFrontReviewTrustedForwardedFor: behind a load balancer in
// PROXY_TRUSTED_PROXIES, a gRPC call's x-forwarded-for metadata is followed
// from the right past the trusted addresses to the client, as for HTTP:
// Cells gets one x-forwarded-for, starting with the client, one x-real-ip
// (the client's, not the one sent), and the balancer's x-forwarded-proto
// and x-forwarded-host.
func TestGRPCFrontReviewTrustedForwardedFor(t *testing.T) {
	t.Parallel()
	trust := func(c *Config) { c.TrustedProxies = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")} }
	eachGRPC(t, trust, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		ctx := metadata.AppendToOutgoingContext(testCtx(t),
			"x-forwarded-for", "198.51.100.66, 203.0.113.7",
			"x-forwarded-for", "127.0.0.1",
			"x-real-ip", "198.51.100.66",
			"x-forwarded-proto", "http",
			"x-forwarded-host", "cells.example.com")
		if _, err := tc.EmptyCall(ctx, &testgrpc.Empty{}); err != nil {
			t.Fatal(err)
		}
		wantMetadata(t, e.svc.lastMD(t),
			"x-forwarded-for", "203.0.113.7, 127.0.0.1, 127.0.0.1",
			"x-real-ip", "203.0.113.7",
			"x-forwarded-proto", "http",
			"x-forwarded-host", "cells.example.com")
	})
}

// TestGRPCFrontReviewCancelWhileBlocked: a client cancels a stream whose
// messages Cells has stopped reading (the proxy's copy to Cells waits for
// Cells' flow-control window, and the client's own window at the proxy
// is full): Cells sees the cancel, and the connection carries the next
// call.
func TestGRPCFrontReviewCancelWhileBlocked(t *testing.T) {
	t.Parallel()
	eachGRPC(t, nil, func(t *testing.T, e *grpcEnv, port grpcPort, tc testgrpc.TestServiceClient) {
		ctx, cancel := context.WithCancel(testCtx(t))
		defer cancel()
		stream, err := tc.FullDuplexCall(probe(ctx, "hold"))
		if err != nil {
			t.Fatal(err)
		}
		h := waitHeld(t, e.svc)
		sent := make(chan struct{})
		go func() {
			defer close(sent)
			// 16 MiB, more than the proxy's and Cells' windows
			// together: the last Sends block until the cancel.
			for i := range 128 {
				if stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: payload(128<<10, uint64(i))}) != nil {
					return
				}
			}
		}()
		// Not a timed assertion: the Sends fill the windows meanwhile;
		// the cancel must work whether or not they have.
		time.Sleep(500 * time.Millisecond)
		cancel()
		if err := waitEnded(t, h); err == nil {
			t.Error("Cells' handler ended without an error after the client cancelled")
		}
		select {
		case <-sent:
		case <-time.After(20 * time.Second):
			t.Fatal("Send still blocked 20 s after the cancel")
		}
		if _, err := tc.UnaryCall(testCtx(t), &testgrpc.SimpleRequest{Payload: payload(100, 1)}); err != nil {
			t.Errorf("the next call on the connection: %v", err)
		}
	})
}

// TestGRPCFrontReviewBeyondMaxStreams: one client connection starts more
// streams at once than the proxy's MAX_CONCURRENT_STREAMS (250): the
// first 250 all stay open until each has had an answer, grpc-go queues the
// surplus until they end, and every stream gets its own answers.
func TestGRPCFrontReviewBeyondMaxStreams(t *testing.T) {
	t.Parallel()
	const n = 300
	e := startGRPC(t, topoH2C, nil)
	for _, port := range grpcPorts {
		t.Run(string(port), func(t *testing.T) {
			tc := testgrpc.NewTestServiceClient(e.dial(t, port))
			errs := make(chan error, n)
			var open atomic.Int32
			full := make(chan struct{})
			var wg sync.WaitGroup
			for i := range n {
				wg.Go(func() {
					stream, err := tc.FullDuplexCall(probe(testCtx(t), "echo"))
					if err != nil {
						errs <- err
						return
					}
					for j := range 3 {
						want := fmt.Sprintf("stream %d message %d", i, j)
						if err := stream.Send(&testgrpc.StreamingOutputCallRequest{Payload: &testgrpc.Payload{Body: []byte(want)}}); err != nil {
							errs <- err
							return
						}
						out, err := stream.Recv()
						if err != nil {
							errs <- err
							return
						}
						if got := string(out.GetPayload().GetBody()); got != want {
							errs <- fmt.Errorf("got %q, want %q", got, want)
							return
						}
						if j == 0 {
							if open.Add(1) == 250 {
								close(full)
							}
							select {
							case <-full:
							case <-time.After(20 * time.Second):
								errs <- fmt.Errorf("stream %d: 250 streams never were open at once", i)
								return
							}
						}
					}
					stream.CloseSend()
					if _, err := stream.Recv(); err != io.EOF {
						errs <- fmt.Errorf("stream %d ended with %v, want io.EOF", i, err)
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}
