package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"
)

// A row of the table.
type row struct {
	key   string
	label string
	// scale converts the recorded value to the unit of the label.
	scale float64
	prec  int
	// ratio: print the ratio to direct beside the value.
	ratio bool
	// sum: add the rounds up (error counts) rather than take the median.
	sum bool
}

var rows = []row{
	{key: "h1_rps", label: "HTTP/1.1 small GET, req/s", scale: 1, prec: 0, ratio: true},
	{key: "h1_p50", label: "HTTP/1.1 p50, ms", scale: 1, prec: 2, ratio: true},
	{key: "h1_p99", label: "HTTP/1.1 p99, ms", scale: 1, prec: 2, ratio: true},
	{key: "h1_cpu100k", label: "HTTP/1.1 proxy CPU s / 100k req", scale: 1, prec: 2},
	{key: "h1_load_cpu100k", label: "HTTP/1.1 load generator (wrk) CPU s / 100k req", scale: 1, prec: 2},
	{key: "h1_stub_cpu100k", label: "HTTP/1.1 Cells (stub) CPU s / 100k req", scale: 1, prec: 2},
	{key: "h1_idle_pct", label: "HTTP/1.1 machine CPU left idle, %", scale: 1, prec: 1},
	{key: "h1_errors", label: "HTTP/1.1 errors (all rounds)", scale: 1, sum: true},
	{key: "rest_rps", label: "REST POST (1 KiB JSON, HTTP/1.1), req/s", scale: 1, prec: 0, ratio: true},
	{key: "rest_p50", label: "REST POST p50, ms", scale: 1, prec: 2, ratio: true},
	{key: "rest_p99", label: "REST POST p99, ms", scale: 1, prec: 2, ratio: true},
	{key: "rest_cpu100k", label: "REST POST proxy CPU s / 100k req", scale: 1, prec: 2},
	{key: "rest_errors", label: "REST POST errors (all rounds)", scale: 1, sum: true},
	{key: "h2_rps", label: "HTTP/2 small GET, req/s", scale: 1, prec: 0, ratio: true},
	{key: "h2_p50", label: "HTTP/2 p50, ms", scale: 1, prec: 2, ratio: true},
	{key: "h2_p99", label: "HTTP/2 p99, ms", scale: 1, prec: 2, ratio: true},
	{key: "h2_cpu100k", label: "HTTP/2 proxy CPU s / 100k req", scale: 1, prec: 2},
	{key: "h2_load_cpu100k", label: "HTTP/2 load generator (h2load) CPU s / 100k req", scale: 1, prec: 2},
	{key: "h2_stub_cpu100k", label: "HTTP/2 Cells (stub) CPU s / 100k req", scale: 1, prec: 2},
	{key: "h2_idle_pct", label: "HTTP/2 machine CPU left idle, %", scale: 1, prec: 1},
	{key: "h2_errors", label: "HTTP/2 errors (all rounds)", scale: 1, sum: true},
	{key: "grpc_unary_rps", label: "gRPC unary, calls/s", scale: 1, prec: 0, ratio: true},
	{key: "grpc_unary_p50", label: "gRPC unary p50, ms", scale: 1, prec: 2, ratio: true},
	{key: "grpc_unary_p99", label: "gRPC unary p99, ms", scale: 1, prec: 2, ratio: true},
	{key: "grpc_unary_cpu100k", label: "gRPC unary proxy CPU s / 100k calls", scale: 1, prec: 2},
	{key: "grpc_unary_load_cpu100k", label: "gRPC unary load generator (grpcload) CPU s / 100k calls", scale: 1, prec: 2},
	{key: "grpc_unary_stub_cpu100k", label: "gRPC unary Cells (stub) CPU s / 100k calls", scale: 1, prec: 2},
	{key: "grpc_unary_idle_pct", label: "gRPC unary machine CPU left idle, %", scale: 1, prec: 1},
	{key: "grpc_unary_errors", label: "gRPC unary failed calls (all rounds)", scale: 1, sum: true},
	{key: "grpc_bidi1_mps", label: "gRPC bidi, 1 stream, msg/s", scale: 1, prec: 0, ratio: true},
	{key: "grpc_bidi8_mps", label: "gRPC bidi, 8 streams / 1 conn, msg/s", scale: 1, prec: 0, ratio: true},
	{key: "grpc_bidi1_failed", label: "gRPC bidi failed streams, 1 stream (all rounds)", scale: 1, sum: true},
	{key: "grpc_bidi8_failed", label: "gRPC bidi failed streams, 8 streams (all rounds)", scale: 1, sum: true},
	{key: "grpc_check", label: "gRPC interop check (1 = pass)", scale: 1},
	{key: "dl_MBps", label: "1 GiB download, MB/s", scale: 1, prec: 0, ratio: true},
	{key: "dl_peak_kib", label: "download: proxy peak RSS, MiB", scale: 1.0 / 1024, prec: 1},
	{key: "dl_cpu_s", label: "download: proxy CPU s", scale: 1, prec: 2},
	{key: "ul_MBps", label: "1 GiB upload, MB/s", scale: 1, prec: 0, ratio: true},
	{key: "ul_peak_kib", label: "upload: proxy peak RSS, MiB", scale: 1.0 / 1024, prec: 1},
	{key: "ul_cpu_s", label: "upload: proxy CPU s", scale: 1, prec: 2},
	{key: "ws_kib_per_conn", label: "idle websockets: proxy RSS per conn, KiB", scale: 1, prec: 1},
	{key: "ws_p50", label: "websocket echo p50, ms", scale: 1, prec: 2, ratio: true},
	{key: "ws_p99", label: "websocket echo p99, ms", scale: 1, prec: 2, ratio: true},
	{key: "ws_errors", label: "websocket failures (all rounds)", scale: 1, sum: true},
	{key: "tls_new_cps", label: "new TLS connections/s, full handshake (+ 1 GET)", scale: 1, prec: 0, ratio: true},
	{key: "tls_new_cpu_ms", label: "full handshake: proxy CPU ms per connection", scale: 1, prec: 3},
	{key: "tls_reuse_cps", label: "new TLS connections/s, session resumed (+ 1 GET)", scale: 1, prec: 0, ratio: true},
	{key: "tls_reuse_cpu_ms", label: "resumed: proxy CPU ms per connection", scale: 1, prec: 3},
	{key: "tls_resumed_pct", label: "resumed: connections that did resume, %", scale: 1, prec: 0},
	{key: "idle_kib", label: "idle RSS after start, MiB", scale: 1.0 / 1024, prec: 1},
	{key: "idle_pss_kib", label: "idle PSS after start, MiB (shared pages counted once)", scale: 1.0 / 1024, prec: 1},
	{key: "binary_bytes", label: "binary size, MB", scale: 1e-6, prec: 1},
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ratio compares a target with direct. When both have a value for every
// round it is the median of the per-round ratios: a round measures direct and
// the proxies within a minute or two, so pairing them cancels most of the
// drift of a machine whose load changes; otherwise the ratio of the medians.
func (b *bench) ratio(target, key string) (float64, bool) {
	v, d := b.results[target][key], b.results["direct"][key]
	if len(v) == b.rounds && len(d) == b.rounds {
		rs := make([]float64, 0, len(v))
		for i := range v {
			if d[i] == 0 {
				return 0, false
			}
			rs = append(rs, v[i]/d[i])
		}
		return median(rs), true
	}
	tv, ok1 := b.value(target, key)
	dv, ok2 := b.value("direct", key)
	if !ok1 || !ok2 || dv == 0 {
		return 0, false
	}
	return tv / dv, true
}

// value is the figure of a row for a target: the median of the rounds, or
// their sum; ok is false when it was never measured.
func (b *bench) value(target, key string) (float64, bool) {
	v := b.results[target][key]
	if len(v) == 0 {
		return 0, false
	}
	for _, r := range rows {
		if r.key == key && r.sum {
			var s float64
			for _, x := range v {
				s += x
			}
			return s, true
		}
	}
	return median(v), true
}

func (b *bench) report(elapsed time.Duration) string {
	var s strings.Builder
	fmt.Fprintf(&s, "\n## Results\n\nMachine: %s.\n%d round(s), median of rounds; (ratio to direct: median of the per-round ratios).", machine(), b.rounds)
	if elapsed > 0 {
		fmt.Fprintf(&s, " Elapsed %s. Load average at start %s, at end %s.", elapsed.Round(time.Second), b.loadStart, loadAvg())
	}
	fmt.Fprintf(&s, "\n\n")
	fmt.Fprintf(&s, "| metric |")
	for _, t := range b.targets {
		fmt.Fprintf(&s, " %s |", t.name)
	}
	fmt.Fprintf(&s, "\n|---|")
	for range b.targets {
		fmt.Fprintf(&s, "---:|")
	}
	fmt.Fprintln(&s)
	for _, r := range rows {
		fmt.Fprintf(&s, "| %s |", r.label)
		direct, haveDirect := b.value("direct", r.key)
		for _, t := range b.targets {
			v, ok := b.value(t.name, r.key)
			switch {
			case !ok && t.err != nil && !hasAny(b.results[t.name]):
				fmt.Fprintf(&s, " failed |")
			case !ok:
				fmt.Fprintf(&s, " – |")
			case r.ratio && haveDirect && direct != 0 && t.name != "direct":
				ratio, _ := b.ratio(t.name, r.key)
				fmt.Fprintf(&s, " %s (%.2f×) |", num(v*r.scale, r.prec), ratio)
			default:
				fmt.Fprintf(&s, " %s |", num(v*r.scale, r.prec))
			}
		}
		fmt.Fprintln(&s)
	}
	fmt.Fprintf(&s, "\nTargets:\n\n")
	for _, t := range b.targets {
		fmt.Fprintf(&s, "- **%s**: %s\n", t.name, t.about)
	}
	s.WriteString(b.goals())
	if len(b.notes) > 0 {
		fmt.Fprintf(&s, "\n### Notes\n\n")
		for _, t := range b.targets {
			for _, n := range b.notes[t.name] {
				fmt.Fprintf(&s, "- %s: %s\n", t.name, n)
			}
		}
	}
	return s.String()
}

func hasAny(m map[string][]float64) bool { return len(m) > 0 }

// num formats with thousands separators for big integers.
func num(v float64, prec int) string {
	if prec > 0 {
		return fmt.Sprintf("%.*f", prec, v)
	}
	str := fmt.Sprintf("%.0f", v)
	neg := strings.HasPrefix(str, "-")
	str = strings.TrimPrefix(str, "-")
	var out []byte
	for i := range len(str) {
		if i > 0 && (len(str)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, str[i])
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

// goals checks cells-proxy against the targets of issue 5.
func (b *bench) goals() string {
	const cp = "cells-proxy"
	var s strings.Builder
	fmt.Fprintf(&s, "\n### Issue 5 targets (cells-proxy)\n\n")
	ratio := func(key string) (float64, bool) { return b.ratio(cp, key) }
	line := func(name string, ok, measured bool, detail string) {
		verdict := "not met"
		switch {
		case !measured:
			verdict = "not measured"
		case ok:
			verdict = "met"
		}
		fmt.Fprintf(&s, "- %s: **%s** (%s)\n", name, verdict, detail)
	}
	atLeast := func(name, key string, want float64) {
		r, ok := ratio(key)
		line(name, r >= want, ok, fmt.Sprintf("%.3f× direct, want ≥ %.1f×", r, want))
	}
	// rate is atLeast for a request rate, with the budget that its ratio
	// leaves a proxy on this machine.
	rate := func(name, prefix, key string, want float64) {
		r, ok := ratio(key)
		detail := fmt.Sprintf("%.3f× direct, want ≥ %.1f×", r, want)
		if bud, ok := b.budget(prefix, key, want); ok {
			detail += "; " + bud
		}
		line(name, r >= want, ok, detail)
	}
	atMost := func(name, key string, scale, want float64, unit string) {
		v, ok := b.value(cp, key)
		line(name, v*scale <= want, ok, fmt.Sprintf("%.1f %s, want ≤ %g %s", v*scale, unit, want, unit))
	}

	rate("HTTP/1.1 small GET ≥ 0.6× direct", "h1", "h1_rps", 0.6)
	{
		v, ok := b.value(cp, "h1_cpu100k")
		ng, ok2 := b.value("nginx-tuned", "h1_cpu100k")
		ha, ok3 := b.value("haproxy", "h1_cpu100k")
		line("HTTP/1.1 CPU per 100k ≤ nginx tuned and HAProxy", v <= ng && v <= ha, ok && ok2 && ok3,
			fmt.Sprintf("%.2f s vs nginx tuned %.2f s, HAProxy %.2f s", v, ng, ha))
	}
	rate("HTTP/2 small GET ≥ 1.1× direct", "h2", "h2_rps", 1.1)
	rate("gRPC unary ≥ 0.8× direct", "grpc_unary", "grpc_unary_rps", 0.8)
	{
		r1, ok1 := ratio("grpc_bidi1_mps")
		r8, ok8 := ratio("grpc_bidi8_mps")
		f1, _ := b.value(cp, "grpc_bidi1_failed")
		f8, _ := b.value(cp, "grpc_bidi8_failed")
		line("gRPC bidi ≥ 1.0× direct, zero failed streams", r1 >= 1 && r8 >= 1 && f1+f8 == 0, ok1 && ok8,
			fmt.Sprintf("1 stream %.3f×, 8 streams %.3f×, %.0f failed streams", r1, r8, f1+f8))
	}
	atLeast("1 GiB download ≥ 0.6× direct", "dl_MBps", 0.6)
	atLeast("1 GiB upload ≥ 0.8× direct", "ul_MBps", 0.8)
	{
		d, ok1 := b.value(cp, "dl_peak_kib")
		u, ok2 := b.value(cp, "ul_peak_kib")
		p := max(d, u) / 1024
		line("peak proxy RSS during transfers ≤ 16 MiB", p <= 16, ok1 && ok2, fmt.Sprintf("%.1f MiB", p))
	}
	atMost("idle websocket ≤ 40 KiB RSS per connection", "ws_kib_per_conn", 1, 40, "KiB")
	atMost("idle RSS ≤ 9 MiB", "idle_kib", 1.0/1024, 9, "MiB")
	atMost("binary ≤ 10 MB", "binary_bytes", 1e-6, 10, "MB")
	return s.String()
}

// budget says what CPU a proxy may spend per 100k requests for cells-proxy's
// rate to be want times direct's on this machine, where the load generator,
// Cells and the proxy share the cores: at want times direct's rate the
// cores give each request NumCPU/rate seconds, of which the load generator
// and the stub took what they took in cells-proxy's run. What is left is
// the most any proxy may spend; a proxy that spends more cannot reach the
// ratio, however its time is spent. ok is false for a run that did not
// measure it.
func (b *bench) budget(prefix, key string, want float64) (string, bool) {
	const cp = "cells-proxy"
	direct, ok1 := b.value("direct", key)
	load, ok2 := b.value(cp, prefix+"_load_cpu100k")
	stub, ok3 := b.value(cp, prefix+"_stub_cpu100k")
	spent, ok4 := b.value(cp, prefix+"_cpu100k")
	if !ok1 || !ok2 || !ok3 || !ok4 || direct <= 0 {
		return "", false
	}
	cores := float64(runtime.NumCPU())
	left := cores/(want*direct)*100_000 - load - stub
	if left <= 0 {
		return fmt.Sprintf("at %.1f× direct the %.0f cores would leave a proxy nothing beside the load generator (%.2f CPU s / 100k) and Cells (%.2f); cells-proxy spent %.2f",
			want, cores, load, stub, spent), true
	}
	return fmt.Sprintf("at %.1f× direct the %.0f cores leave a proxy at most %.2f CPU s / 100k beside the load generator (%.2f) and Cells (%.2f); cells-proxy spent %.2f",
		want, cores, left, load, stub, spent), true
}

// machine describes the host for BENCHMARKS.md.
func machine() string {
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for l := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(l, "model name"); ok {
				cpu = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d CPUs, %s, Linux %s, harness built with %s",
		runtime.NumCPU(), cpu, strings.TrimSpace(string(kernel)), runtime.Version())
}
