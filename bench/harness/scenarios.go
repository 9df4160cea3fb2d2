package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// measurement is what one scenario run gives: metric key → value.
type measurement map[string]float64

// scenario runs one load against one target. Every load is bounded in time
// (the tool's own duration, plus the context deadline) and in count.
type scenario struct {
	name string
	// fresh: restart the proxy first, for memory figures that earlier
	// loads do not blur.
	fresh bool
	run   func(b *bench, ctx context.Context, t *target, round int) (measurement, error)
}

func scenarios() []scenario {
	return []scenario{
		{"idle", true, (*bench).idle},
		{"download", false, (*bench).download},
		{"upload", false, (*bench).upload},
		{"websocket", true, (*bench).websocket},
		{"tls", false, (*bench).tlsConns},
		{"http1", false, (*bench).http1},
		{"rest", false, (*bench).rest},
		{"http2", false, (*bench).http2},
		{"grpc-unary", false, (*bench).grpcUnary},
		{"grpc-bidi-1", false, func(b *bench, ctx context.Context, t *target, _ int) (measurement, error) {
			return b.grpcBidi(ctx, t, 1)
		}},
		{"grpc-bidi-8", false, func(b *bench, ctx context.Context, t *target, _ int) (measurement, error) {
			return b.grpcBidi(ctx, t, 8)
		}},
	}
}

// idle reads the RSS of a freshly started proxy (after a readiness probe
// only), and on the first round the binary size and the gRPC interop check.
func (b *bench) idle(ctx context.Context, t *target, round int) (measurement, error) {
	m := measurement{}
	time.Sleep(time.Second)
	if t.pids != nil {
		kib, err := statusKiB(t.pids(), "VmRSS")
		if err != nil {
			return nil, err
		}
		m["idle_kib"] = float64(kib)
		if pss, err := pssKiB(t.pids()); err == nil {
			m["idle_pss_kib"] = float64(pss)
		}
	}
	if round > 1 {
		return m, nil
	}
	if t.binary != "" {
		if fi, err := os.Stat(t.binary); err == nil {
			m["binary_bytes"] = float64(fi.Size())
		}
	}
	m["grpc_check"] = 1
	if _, err := b.grpcload(ctx, t, time.Second, "-mode", "check"); err != nil {
		m["grpc_check"] = 0
		return m, fmt.Errorf("gRPC interop check: %w", err)
	}
	return m, nil
}

func (b *bench) url(t *target, path string) string {
	return fmt.Sprintf("https://127.0.0.1:%d%s", t.port, path)
}

// command runs a load tool with a hard deadline and returns its stdout.
func command(ctx context.Context, limit time.Duration, argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 300 {
			msg = msg[:300] + "…"
		}
		return string(out), fmt.Errorf("%s: %w: %s", filepath.Base(argv[0]), err, msg)
	}
	return string(out), nil
}

// cpuDelta runs f and returns the proxy CPU seconds it cost.
func cpuDelta(t *target, f func() error) (float64, error) {
	if t.pids == nil {
		return 0, f()
	}
	before, err := cpuSeconds(t.pids())
	if err != nil {
		return 0, err
	}
	if err := f(); err != nil {
		return 0, err
	}
	after, err := cpuSeconds(t.pids())
	if err != nil {
		return 0, err
	}
	return after - before, nil
}

// spent is what one load cost, in CPU seconds: the proxy's, the stub's
// (Cells'), the load generator's; and the machine's CPU time left idle
// meanwhile, in percent. With all three on the same cores, a proxied run
// is as fast as direct only if the proxy's CPU fits in what the load
// generator and Cells leave of the machine: see budget.
type spent struct{ proxy, stub, load, idlePct float64 }

// spend runs f, which runs one load generator to its end, and says what it
// cost. The load generator's CPU is that of the harness's child processes
// that ended meanwhile (getrusage RUSAGE_CHILDREN): the load tool is the
// only one that does.
func (b *bench) spend(t *target, f func() error) (spent, error) {
	var sp spent
	stub0, err := cpuSeconds([]int{b.stubPID})
	if err != nil {
		return sp, err
	}
	busy0, idle0, err := machineTicks()
	if err != nil {
		return sp, err
	}
	load0 := childrenCPU()
	if sp.proxy, err = cpuDelta(t, f); err != nil {
		return sp, err
	}
	sp.load = childrenCPU() - load0
	busy1, idle1, err := machineTicks()
	if err != nil {
		return sp, err
	}
	if total := (busy1 - busy0) + (idle1 - idle0); total > 0 {
		sp.idlePct = float64(idle1-idle0) / float64(total) * 100
	}
	stub1, err := cpuSeconds([]int{b.stubPID})
	if err != nil {
		return sp, err
	}
	sp.stub = stub1 - stub0
	return sp, nil
}

// record files what a load of n requests cost under prefix: the proxy's CPU
// per 100k requests (for targets that have a process of their own), the
// stub's and the load generator's, and the machine's idle share.
func (sp spent) record(m measurement, t *target, prefix string, n float64) {
	if n <= 0 {
		return
	}
	if t.pids != nil {
		m[prefix+"_cpu100k"] = sp.proxy / n * 100_000
	}
	m[prefix+"_stub_cpu100k"] = sp.stub / n * 100_000
	m[prefix+"_load_cpu100k"] = sp.load / n * 100_000
	m[prefix+"_idle_pct"] = sp.idlePct
}

var (
	wrkRPS      = regexp.MustCompile(`Requests/sec:\s+([\d.]+)`)
	wrkTotal    = regexp.MustCompile(`(\d+) requests in`)
	wrkPct      = regexp.MustCompile(`(?m)^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$`)
	wrkNon2xx   = regexp.MustCompile(`Non-2xx or 3xx responses: (\d+)`)
	wrkSockErrs = regexp.MustCompile(`Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)`)
)

func (b *bench) http1(ctx context.Context, t *target, _ int) (measurement, error) {
	return b.wrk(ctx, t, "h1", "/small")
}

// restScript makes wrk send what Cells' web UI sends most: a small JSON
// POST (it reads with POST: /a/tree/stats, /a/meta/bulk/get, ...).
const restScript = `wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"NodePaths":["' .. string.rep("x", 1000) .. '"]}'
`

// rest is HTTP/1.1 REST traffic: 1 KiB JSON POSTs to the stub's upload
// sink, which answers {"bytes":N}.
func (b *bench) rest(ctx context.Context, t *target, _ int) (measurement, error) {
	script := filepath.Join(b.work, "rest.lua")
	if err := os.WriteFile(script, []byte(restScript), 0o644); err != nil {
		return nil, err
	}
	return b.wrk(ctx, t, "rest", "/upload/rest", "-s", script)
}

// wrk runs wrk against path and records its figures under prefix.
func (b *bench) wrk(ctx context.Context, t *target, prefix, path string, extra ...string) (measurement, error) {
	var out string
	sp, err := b.spend(t, func() error {
		var err error
		argv := append([]string{"wrk", "-t", "1", "-c", strconv.Itoa(b.wrkConns), "-d", durArg(b.dur), "--latency"}, extra...)
		out, err = command(ctx, b.dur+30*time.Second, append(argv, b.url(t, path))...)
		return err
	})
	if err != nil {
		return nil, err
	}
	m := measurement{}
	if v := wrkRPS.FindStringSubmatch(out); v != nil {
		m[prefix+"_rps"], _ = strconv.ParseFloat(v[1], 64)
	} else {
		return nil, fmt.Errorf("wrk: no Requests/sec in output: %q", out)
	}
	for _, v := range wrkPct.FindAllStringSubmatch(out, -1) {
		m[prefix+"_p"+v[1]] = toMS(v[2], v[3])
	}
	var errs float64
	if v := wrkNon2xx.FindStringSubmatch(out); v != nil {
		n, _ := strconv.ParseFloat(v[1], 64)
		errs += n
	}
	if v := wrkSockErrs.FindStringSubmatch(out); v != nil {
		for _, s := range v[1:] {
			n, _ := strconv.ParseFloat(s, 64)
			errs += n
		}
	}
	m[prefix+"_errors"] = errs
	if v := wrkTotal.FindStringSubmatch(out); v != nil {
		n, _ := strconv.ParseFloat(v[1], 64)
		sp.record(m, t, prefix, n)
	}
	return m, nil
}

func toMS(v, unit string) float64 {
	f, _ := strconv.ParseFloat(v, 64)
	switch unit {
	case "us":
		return f / 1000
	case "s":
		return f * 1000
	}
	return f
}

func durArg(d time.Duration) string { return strconv.Itoa(int(d.Seconds())) + "s" }

var (
	h2RPS  = regexp.MustCompile(`finished in [\d.]+m?s, ([\d.]+) req/s`)
	h2Reqs = regexp.MustCompile(`requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout`)
)

func (b *bench) http2(ctx context.Context, t *target, _ int) (measurement, error) {
	logFile := filepath.Join(b.work, "h2load.log")
	defer os.Remove(logFile)
	var out string
	sp, err := b.spend(t, func() error {
		var err error
		out, err = command(ctx, b.dur+30*time.Second, "h2load",
			"-t", "1", "-c", strconv.Itoa(b.h2Conns), "-m", strconv.Itoa(b.h2Streams),
			"-D", strconv.Itoa(int(b.dur.Seconds())), "--log-file", logFile, b.url(t, "/small"))
		return err
	})
	if err != nil {
		return nil, err
	}
	m := measurement{}
	v := h2RPS.FindStringSubmatch(out)
	if v == nil {
		return nil, fmt.Errorf("h2load: no req/s in output: %q", out)
	}
	m["h2_rps"], _ = strconv.ParseFloat(v[1], 64)
	if v := h2Reqs.FindStringSubmatch(out); v != nil {
		failed, _ := strconv.ParseFloat(v[5], 64)
		errored, _ := strconv.ParseFloat(v[6], 64)
		m["h2_errors"] = failed + errored
		done, _ := strconv.ParseFloat(v[4], 64)
		sp.record(m, t, "h2", done)
	}
	if !strings.Contains(out, "Application protocol: h2") {
		return nil, fmt.Errorf("h2load did not negotiate h2")
	}
	// h2load prints no percentiles; its per-request log has the durations.
	lats, err := h2loadLatencies(logFile)
	if err != nil {
		return nil, err
	}
	m["h2_p50"] = percentile(lats, 0.50)
	m["h2_p99"] = percentile(lats, 0.99)
	return m, nil
}

// h2loadLatencies reads h2load --log-file: start time (µs), status,
// duration (µs), tab-separated. It returns the durations in ms, sorted.
func h2loadLatencies(path string) ([]float64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []float64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), "\t")
		if len(fields) < 3 {
			continue
		}
		us, err := strconv.ParseFloat(fields[2], 64)
		if err != nil {
			continue
		}
		out = append(out, us/1000)
	}
	slices.Sort(out)
	return out, sc.Err()
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

// grpcResult mirrors bench/grpcload's output.
type grpcResult struct {
	OK            int64    `json:"ok"`
	Failed        int64    `json:"failed"`
	Rate          float64  `json:"rate"`
	P50ms         float64  `json:"p50_ms"`
	P99ms         float64  `json:"p99_ms"`
	FailedStreams int      `json:"failed_streams"`
	Errors        []string `json:"errors"`
}

func (b *bench) grpcload(ctx context.Context, t *target, d time.Duration, args ...string) (grpcResult, error) {
	argv := append([]string{filepath.Join(b.bin, "grpcload"), "-addr", fmt.Sprintf("127.0.0.1:%d", t.port),
		"-duration", d.String()}, args...)
	out, err := command(ctx, d+60*time.Second, argv...)
	var r grpcResult
	if err != nil {
		return r, err
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return r, fmt.Errorf("grpcload output %q: %w", out, err)
	}
	return r, nil
}

func (b *bench) grpcUnary(ctx context.Context, t *target, _ int) (measurement, error) {
	var r grpcResult
	sp, err := b.spend(t, func() error {
		var err error
		r, err = b.grpcload(ctx, t, b.dur, "-mode", "unary", "-conc", "32", "-max", "3000000")
		return err
	})
	if err != nil {
		return nil, err
	}
	m := measurement{"grpc_unary_rps": r.Rate, "grpc_unary_p50": r.P50ms, "grpc_unary_p99": r.P99ms, "grpc_unary_errors": float64(r.Failed)}
	if r.OK == 0 {
		return m, fmt.Errorf("no successful call: %v", r.Errors)
	}
	sp.record(m, t, "grpc_unary", float64(r.OK))
	return m, nil
}

func (b *bench) grpcBidi(ctx context.Context, t *target, streams int) (measurement, error) {
	r, err := b.grpcload(ctx, t, b.bidiDur, "-mode", "bidi", "-streams", strconv.Itoa(streams), "-window", "32", "-max", "20000000")
	if err != nil {
		return nil, err
	}
	k := fmt.Sprintf("grpc_bidi%d", streams)
	m := measurement{k + "_mps": r.Rate, k + "_failed": float64(r.FailedStreams)}
	if r.FailedStreams > 0 {
		b.note(t, fmt.Sprintf("bidi %d streams: %d failed: %v", streams, r.FailedStreams, r.Errors))
	}
	return m, nil
}

// curlTransfer runs curl over HTTP/1.1 (as S3 clients and Cells Sync move
// data) and returns its -w fields.
func (b *bench) curlTransfer(ctx context.Context, t *target, prefix string, args ...string) (measurement, error) {
	if t.pids != nil {
		if err := resetPeakRSS(t.pids()); err != nil {
			return nil, fmt.Errorf("reset VmHWM: %w", err)
		}
	}
	body := filepath.Join(b.work, "curl-body")
	defer os.Remove(body)
	argv := append([]string{"curl", "-sSk", "--http1.1", "--max-time", "300", "-o", body,
		"-w", "%{http_code} %{size_download} %{size_upload} %{time_total}"}, args...)
	var out string
	cpu, err := cpuDelta(t, func() error {
		var err error
		out, err = command(ctx, 310*time.Second, argv...)
		return err
	})
	if err != nil {
		return nil, err
	}
	var code int
	var down, up, secs float64
	if _, err := fmt.Sscan(out, &code, &down, &up, &secs); err != nil {
		return nil, fmt.Errorf("curl -w output %q: %w", out, err)
	}
	if code != 200 {
		return nil, fmt.Errorf("curl: status %d", code)
	}
	moved := max(down, up)
	if prefix == "ul" {
		// The stub answers {"bytes":N}: check that it all arrived.
		var got struct{ Bytes int64 }
		raw, _ := os.ReadFile(body)
		if err := json.Unmarshal(raw, &got); err != nil || got.Bytes != b.transfer {
			return nil, fmt.Errorf("upload: stub received %q, want %d bytes", raw, b.transfer)
		}
		moved = up
	} else if int64(down) != b.transfer {
		return nil, fmt.Errorf("download: got %.0f bytes, want %d", down, b.transfer)
	}
	m := measurement{prefix + "_MBps": moved / secs / 1e6}
	if t.pids != nil {
		hwm, err := statusKiB(t.pids(), "VmHWM")
		if err != nil {
			return nil, err
		}
		m[prefix+"_peak_kib"] = float64(hwm)
		m[prefix+"_cpu_s"] = cpu
	}
	return m, nil
}

func (b *bench) download(ctx context.Context, t *target, _ int) (measurement, error) {
	return b.curlTransfer(ctx, t, "dl", b.url(t, fmt.Sprintf("/bytes/%d", b.transfer)))
}

func (b *bench) upload(ctx context.Context, t *target, _ int) (measurement, error) {
	return b.curlTransfer(ctx, t, "ul", "-T", b.uploadFile, b.url(t, "/upload/bench.bin"))
}

type wsResult struct {
	Failed     int64    `json:"failed"`
	KiBPerConn float64  `json:"kib_per_conn"`
	RoundTrips int      `json:"round_trips"`
	RTTFailed  int64    `json:"rtt_failed"`
	P50ms      float64  `json:"p50_ms"`
	P99ms      float64  `json:"p99_ms"`
	Errors     []string `json:"errors"`
}

func (b *bench) websocket(ctx context.Context, t *target, _ int) (measurement, error) {
	var pids []string
	if t.pids != nil {
		for _, p := range t.pids() {
			pids = append(pids, strconv.Itoa(p))
		}
	}
	out, err := command(ctx, 150*time.Second, filepath.Join(b.bin, "wsload"),
		"-url", fmt.Sprintf("wss://127.0.0.1:%d/ws/event", t.port), "-n", strconv.Itoa(b.wsConns),
		"-pids", strings.Join(pids, ","), "-settle", b.wsSettle.String(), "-rounds", "3", "-timeout", "120s")
	if err != nil {
		return nil, err
	}
	var r wsResult
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		return nil, fmt.Errorf("wsload output %q: %w", out, err)
	}
	m := measurement{"ws_p50": r.P50ms, "ws_p99": r.P99ms, "ws_errors": float64(r.Failed + r.RTTFailed)}
	if t.pids != nil {
		m["ws_kib_per_conn"] = r.KiBPerConn
	}
	if r.Failed > 0 || r.RTTFailed > 0 {
		b.note(t, fmt.Sprintf("websocket: %d connects and %d echoes failed: %v", r.Failed, r.RTTFailed, r.Errors))
	}
	if r.RoundTrips == 0 {
		return m, errors.New("no websocket round trip succeeded")
	}
	return m, nil
}

// sTimeConns is openssl s_time's count of connections.
var sTimeConns = regexp.MustCompile(`(?m)^(\d+) connections in [\d.]+ real seconds`)

// tlsConns is what a new client connection costs: TLS connections per
// second, each with one small HTTP/1.0 request, with a full handshake and
// resuming the session of the client's first connection, as browsers and
// Cells Sync do when they reconnect. Two openssl s_time clients run at once
// for each kind. Every target does the same key exchange: OpenSSL 3.0 offers
// X25519 (a browser would also offer X25519MLKEM768, which Go prefers).
func (b *bench) tlsConns(ctx context.Context, t *target, _ int) (measurement, error) {
	m := measurement{}
	secs := strconv.Itoa(max(1, int(b.dur.Seconds())))
	for _, mode := range []string{"new", "reuse"} {
		var outs [2]string
		var errs [2]error
		var elapsed time.Duration
		cpu, err := cpuDelta(t, func() error {
			start := time.Now()
			var wg sync.WaitGroup
			for i := range outs {
				wg.Go(func() {
					outs[i], errs[i] = command(ctx, b.dur+30*time.Second, "openssl", "s_time",
						"-connect", fmt.Sprintf("127.0.0.1:%d", t.port), "-"+mode, "-time", secs, "-www", "/small")
				})
			}
			wg.Wait()
			elapsed = time.Since(start)
			return errors.Join(errs[:]...)
		})
		if err != nil {
			return nil, fmt.Errorf("s_time -%s: %w", mode, err)
		}
		var n, resumed float64
		for _, out := range outs {
			v := sTimeConns.FindStringSubmatch(out)
			if v == nil {
				return nil, fmt.Errorf("s_time -%s: no connection count in %q", mode, out)
			}
			c, _ := strconv.ParseFloat(v[1], 64)
			n += c
			// One character per connection: r resumed, * full handshake.
			for l := range strings.SplitSeq(out, "\n") {
				if l != "" && strings.Trim(l, "r*") == "" {
					resumed += float64(strings.Count(l, "r"))
				}
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("s_time -%s: no connection", mode)
		}
		m["tls_"+mode+"_cps"] = n / elapsed.Seconds()
		if t.pids != nil {
			m["tls_"+mode+"_cpu_ms"] = cpu / n * 1000
		}
		if mode == "reuse" {
			m["tls_resumed_pct"] = resumed / n * 100
		}
	}
	return m, nil
}
