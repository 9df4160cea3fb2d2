// Command grpcload is the gRPC load client of the cells-proxy benchmark
// (bench/run.sh). It talks to the grpc-go interop TestService that
// cmd/stub-upstream serves, directly or through a proxy, over one HTTP/2
// connection, and prints one JSON object with the results.
//
// Modes:
//
//	check  runs a set of grpc-go interop test cases once (exit status 1 on failure)
//	unary  -conc goroutines call UnaryCall in a loop: calls/s, p50, p99
//	bidi   -streams FullDuplexCall streams, each keeping up to -window
//	       messages in flight: echoed messages/s and the number of streams
//	       that did not end with status OK
//
// Every loop is bounded by -duration and by -max (calls or messages).
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cells-proxy/cells-proxy/bench/internal/loadstat"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/interop"
	testgrpc "google.golang.org/grpc/interop/grpc_testing"
)

type result struct {
	Mode          string   `json:"mode"`
	Seconds       float64  `json:"seconds"`
	OK            int64    `json:"ok"`     // calls, or echoed messages
	Failed        int64    `json:"failed"` // calls, or streams
	Rate          float64  `json:"rate"`   // OK per second
	P50ms         float64  `json:"p50_ms,omitempty"`
	P99ms         float64  `json:"p99_ms,omitempty"`
	Streams       int      `json:"streams,omitempty"`
	FailedStreams int      `json:"failed_streams"`
	Errors        []string `json:"errors,omitempty"` // the first few
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "grpcload:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", "", "host:port of the gRPC server or proxy")
	plaintext := flag.Bool("plaintext", false, "h2c with prior knowledge instead of TLS")
	caFile := flag.String("ca", "", "CA file to verify the server; empty: skip verification")
	mode := flag.String("mode", "unary", "check, unary or bidi")
	conc := flag.Int("conc", 32, "unary: concurrent callers")
	streams := flag.Int("streams", 1, "bidi: concurrent streams")
	window := flag.Int("window", 32, "bidi: messages in flight per stream")
	size := flag.Int("size", 64, "request and response payload size in bytes")
	duration := flag.Duration("duration", 4*time.Second, "how long to send")
	maxOps := flag.Int64("max", 5_000_000, "upper bound on calls (unary) or messages (bidi)")
	flag.Parse()
	if *addr == "" {
		return errors.New("-addr is required")
	}

	creds := insecure.NewCredentials()
	if !*plaintext {
		cfg := &tls.Config{InsecureSkipVerify: true} // a benchmark on 127.0.0.1 against self-signed certificates
		if *caFile != "" {
			c, err := credentials.NewClientTLSFromFile(*caFile, "localhost")
			if err != nil {
				return err
			}
			creds = c
		} else {
			creds = credentials.NewTLS(cfg)
		}
	}
	cc, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer cc.Close()
	tc := testgrpc.NewTestServiceClient(cc)

	// A hard stop well after the measured window, in case a stream hangs.
	ctx, cancel := context.WithTimeout(context.Background(), *duration+30*time.Second)
	defer cancel()
	if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true)); err != nil {
		return fmt.Errorf("health check: %w", err)
	}

	var res result
	switch *mode {
	case "check":
		res = check(ctx, tc)
	case "unary":
		res = unary(ctx, tc, *conc, *size, *duration, *maxOps)
	case "bidi":
		res = bidi(ctx, tc, *streams, *window, *size, *duration, *maxOps)
	default:
		return fmt.Errorf("unknown -mode %q", *mode)
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// check runs interop test cases that exercise headers, trailers, status
// codes, cancellation and every streaming shape. A failing case exits the
// process through grpclog.Fatal.
func check(ctx context.Context, tc testgrpc.TestServiceClient) result {
	start := time.Now()
	interop.DoEmptyUnaryCall(ctx, tc)
	interop.DoLargeUnaryCall(ctx, tc)
	interop.DoClientStreaming(ctx, tc)
	interop.DoServerStreaming(ctx, tc)
	interop.DoPingPong(ctx, tc)
	interop.DoEmptyStream(ctx, tc)
	interop.DoCancelAfterBegin(ctx, tc)
	interop.DoCancelAfterFirstResponse(ctx, tc)
	interop.DoCustomMetadata(ctx, tc)
	interop.DoStatusCodeAndMessage(ctx, tc)
	interop.DoSpecialStatusMessage(ctx, tc)
	interop.DoTimeoutOnSleepingServer(ctx, tc)
	return result{Mode: "check", Seconds: time.Since(start).Seconds(), OK: 12}
}

func unary(ctx context.Context, tc testgrpc.TestServiceClient, conc, size int, d time.Duration, maxOps int64) result {
	req := &testgrpc.SimpleRequest{
		ResponseType: testgrpc.PayloadType_COMPRESSABLE,
		ResponseSize: int32(size),
		Payload:      &testgrpc.Payload{Body: make([]byte, size)},
	}
	var (
		issued, failed atomic.Int64
		errs           loadstat.Errors
		wg             sync.WaitGroup
		lats           = make([][]time.Duration, conc)
	)
	deadline := time.Now().Add(d)
	start := time.Now()
	for i := range conc {
		wg.Go(func() {
			for time.Now().Before(deadline) && issued.Add(1) <= maxOps {
				t0 := time.Now()
				if _, err := tc.UnaryCall(ctx, req); err != nil {
					failed.Add(1)
					errs.Add(err)
					continue
				}
				lats[i] = append(lats[i], time.Since(t0))
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	all := slices.Concat(lats...)
	slices.Sort(all)
	return result{
		Mode:    "unary",
		Seconds: elapsed.Seconds(),
		OK:      int64(len(all)),
		Failed:  failed.Load(),
		Rate:    float64(len(all)) / elapsed.Seconds(),
		P50ms:   loadstat.Ms(loadstat.Pct(all, 0.50)),
		P99ms:   loadstat.Ms(loadstat.Pct(all, 0.99)),
		Errors:  errs.List(),
	}
}

func bidi(ctx context.Context, tc testgrpc.TestServiceClient, streams, window, size int, d time.Duration, maxOps int64) result {
	req := &testgrpc.StreamingOutputCallRequest{
		ResponseType:       testgrpc.PayloadType_COMPRESSABLE,
		ResponseParameters: []*testgrpc.ResponseParameters{{Size: int32(size)}},
		Payload:            &testgrpc.Payload{Body: make([]byte, size)},
	}
	var (
		sent, received atomic.Int64
		failedStreams  atomic.Int64
		errs           loadstat.Errors
		wg             sync.WaitGroup
		start          = time.Now()
		deadline       = start.Add(d)
	)
	// Messages/s counts what arrived in the measured window, not the drain
	// after it.
	atStop := make(chan int64, 1)
	time.AfterFunc(d, func() { atStop <- received.Load() })
	for range streams {
		wg.Go(func() {
			if err := oneStream(ctx, tc, req, window, deadline, maxOps, &sent, &received); err != nil {
				failedStreams.Add(1)
				errs.Add(err)
			}
		})
	}
	wg.Wait()
	elapsed := d
	n := <-atStop
	return result{
		Mode:          "bidi",
		Seconds:       elapsed.Seconds(),
		OK:            received.Load(),
		Failed:        failedStreams.Load(),
		Rate:          float64(n) / elapsed.Seconds(),
		Streams:       streams,
		FailedStreams: int(failedStreams.Load()),
		Errors:        errs.List(),
	}
}

// oneStream sends requests on one FullDuplexCall until the deadline, keeping
// at most window of them unanswered, then half-closes and reads the rest. It
// returns an error unless every request got its echo and the stream ended
// with status OK.
func oneStream(ctx context.Context, tc testgrpc.TestServiceClient, req *testgrpc.StreamingOutputCallRequest,
	window int, deadline time.Time, maxOps int64, sent, received *atomic.Int64) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	st, err := tc.FullDuplexCall(ctx)
	if err != nil {
		return fmt.Errorf("open stream: %w", err)
	}
	credit := make(chan struct{}, window)
	for range window {
		credit <- struct{}{}
	}
	sendErr := make(chan error, 1)
	var mine int64
	go func() {
		defer close(sendErr)
		for time.Now().Before(deadline) && sent.Load() < maxOps {
			select {
			case <-credit:
			case <-ctx.Done():
				sendErr <- ctx.Err()
				return
			}
			if err := st.Send(req); err != nil {
				sendErr <- fmt.Errorf("send: %w", err)
				return
			}
			sent.Add(1)
			atomic.AddInt64(&mine, 1)
		}
		if err := st.CloseSend(); err != nil {
			sendErr <- fmt.Errorf("close send: %w", err)
		}
	}()
	var got int64
	for {
		_, err := st.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			cancel()
			<-sendErr
			return fmt.Errorf("recv after %d messages: %w", got, err)
		}
		got++
		received.Add(1)
		credit <- struct{}{}
	}
	if err := <-sendErr; err != nil {
		return err
	}
	if n := atomic.LoadInt64(&mine); got != n {
		return fmt.Errorf("stream ended with %d of %d echoes", got, n)
	}
	return nil
}
