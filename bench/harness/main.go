// Command harness runs the cells-proxy benchmark of issue 5: the stub
// upstream reached directly, through cells-proxy, through nginx (classic
// Cells configuration and tuned) and through HAProxy, under the same loads,
// several rounds each, and prints a markdown table of the medians with the
// ratio to direct, and whether each target of the issue is met.
//
// It is started by bench/run.sh, which installs the tools and builds the
// binaries it expects in -bin: stub-upstream, grpcload, wsload, cells-proxy.
// Everything listens on and talks to 127.0.0.1 only.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type bench struct {
	bin, work  string
	rounds     int
	dur        time.Duration // wrk, h2load, gRPC unary
	bidiDur    time.Duration
	wrkConns   int
	h2Conns    int
	h2Streams  int
	transfer   int64 // bytes per download and upload
	uploadFile string
	wsConns    int
	wsSettle   time.Duration

	targets []*target
	// results[target][metric] holds one value per round.
	results map[string]map[string][]float64
	notes   map[string][]string
	log     io.Writer
	// loadStart is /proc/loadavg when the run began.
	loadStart string
	// stubPID is stub-upstream's process, Cells for every target.
	stubPID int
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "harness:", err)
		os.Exit(1)
	}
}

func run() error {
	b := &bench{results: map[string]map[string][]float64{}, notes: map[string][]string{}, log: os.Stderr}
	flag.StringVar(&b.bin, "bin", "", "directory holding stub-upstream, grpcload, wsload and cells-proxy")
	flag.StringVar(&b.work, "work", "", "scratch directory (configs, logs, the upload file)")
	quick := flag.Bool("quick", false, "1 round and shorter loads")
	only := flag.String("targets", "direct,cells-proxy,nginx-classic,nginx-tuned,haproxy", "comma-separated targets to run")
	out := flag.String("out", "", "also write the report to this file")
	onlyScen := flag.String("scenarios", "", "comma-separated scenarios to run (idle,download,upload,websocket,tls,http1,rest,http2,grpc-unary,grpc-bidi-1,grpc-bidi-8); empty: all")
	flag.IntVar(&b.wsConns, "ws", 2000, "idle websockets")
	flag.Int64Var(&b.transfer, "transfer", 1<<30, "bytes per download and upload")
	from := flag.String("report", "", "only print the report of an earlier run's results.json")
	flag.Parse()
	if *from != "" {
		return b.reportFrom(*from, *only, *quick)
	}
	if b.bin == "" || b.work == "" {
		return errors.New("-bin and -work are required")
	}
	if *onlyScen != "" {
		for name := range strings.SplitSeq(*onlyScen, ",") {
			if !slices.ContainsFunc(scenarios(), func(sc scenario) bool { return sc.name == name }) {
				return fmt.Errorf("unknown scenario %q", name)
			}
		}
	}
	b.rounds, b.dur, b.bidiDur, b.wsSettle = 3, 4*time.Second, 3*time.Second, 3*time.Second
	if *quick {
		b.rounds, b.dur, b.bidiDur, b.wsSettle = 1, 2*time.Second, 2*time.Second, 2*time.Second
	}
	b.wrkConns, b.h2Conns, b.h2Streams = 50, 8, 32

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	started := time.Now()
	b.loadStart = loadAvg()

	// The upstream.
	stub, up, err := b.startStub()
	if err != nil {
		return err
	}
	defer stub.stop()
	b.stubPID = stub.cmd.Process.Pid

	cert, key, pemFile, err := writeProxyCert(b.work)
	if err != nil {
		return err
	}
	b.uploadFile = filepath.Join(b.work, "upload.bin")
	// A sparse file: reading it costs no disk I/O.
	if err := os.WriteFile(b.uploadFile, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(b.uploadFile, b.transfer); err != nil {
		return err
	}
	defer os.Remove(b.uploadFile)
	// But its first read fills the page cache with zeroed pages (2.6 s of
	// curl's system time for 1 GiB here, 0.1 s for the next reads), which
	// fell on the first upload of the run: direct's in round 1, at 268–598
	// MB/s against 759–1,009 in the next rounds. Read it once now.
	if err := readThrough(b.uploadFile); err != nil {
		return err
	}

	for name := range strings.SplitSeq(*only, ",") {
		var t *target
		switch name {
		case "direct":
			t = startDirect(up)
		case "cells-proxy":
			t = startCellsProxy(ctx, b.work, filepath.Join(b.bin, "cells-proxy"), up)
		case "nginx-classic":
			t = startNginx(ctx, b.work, false, up, cert, key)
		case "nginx-tuned":
			t = startNginx(ctx, b.work, true, up, cert, key)
		case "haproxy":
			t = startHAProxy(ctx, b.work, up, pemFile)
		default:
			return fmt.Errorf("unknown target %q", name)
		}
		defer func() { t.proc.stop() }()
		b.targets = append(b.targets, t)
		b.results[t.name] = map[string][]float64{}
		if t.err != nil {
			b.logf("%s: FAILED to start: %v", t.name, t.err)
			b.note(t, "did not start: "+t.err.Error())
		}
	}

	for r := 1; r <= b.rounds; r++ {
		for _, t := range b.live() {
			for _, sc := range scenarios() {
				if *onlyScen != "" && !slices.Contains(strings.Split(*onlyScen, ","), sc.name) {
					continue
				}
				if ctx.Err() != nil {
					return ctx.Err()
				}
				if t.proc != nil && t.proc.exited() {
					t.err = fmt.Errorf("exited during the run (see %s)", t.proc.log.Name())
					b.note(t, t.err.Error())
					break
				}
				if sc.fresh {
					if err := t.restart(ctx); err != nil {
						b.note(t, fmt.Sprintf("round %d: restart failed: %v", r, err))
						break
					}
				}
				t0 := time.Now()
				m, err := sc.run(b, ctx, t, r)
				for k, v := range m {
					b.record(t, k, v)
				}
				status := "ok"
				if err != nil {
					status = "ERROR " + err.Error()
					b.note(t, fmt.Sprintf("round %d %s: %v", r, sc.name, err))
				}
				b.logf("round %d/%d %-13s %-12s %5.1fs %s %s", r, b.rounds, t.name, sc.name, time.Since(t0).Seconds(), brief(m), status)
			}
		}
	}

	raw, _ := json.MarshalIndent(map[string]any{"results": b.results, "notes": b.notes, "rounds": b.rounds, "load": b.loadStart}, "", "  ")
	_ = os.WriteFile(filepath.Join(b.work, "results.json"), raw, 0o644)

	report := b.report(time.Since(started))
	fmt.Print(report)
	if *out != "" {
		if err := os.WriteFile(*out, []byte(report), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// reportFrom renders the report of a saved results.json again.
func (b *bench) reportFrom(path, only string, quick bool) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var saved struct {
		Results map[string]map[string][]float64
		Notes   map[string][]string
		Rounds  int
		Load    string
	}
	if err := json.Unmarshal(raw, &saved); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	b.results, b.notes, b.rounds, b.loadStart = saved.Results, saved.Notes, saved.Rounds, saved.Load
	if b.rounds == 0 {
		b.rounds = 3
		if quick {
			b.rounds = 1
		}
	}
	for name := range strings.SplitSeq(only, ",") {
		if _, ok := b.results[name]; ok {
			b.targets = append(b.targets, &target{name: name, about: abouts[name]})
		}
	}
	fmt.Print(b.report(0))
	return nil
}

func (b *bench) live() []*target {
	var out []*target
	for _, t := range b.targets {
		if t.err == nil {
			out = append(out, t)
		}
	}
	return out
}

func (b *bench) record(t *target, key string, v float64) {
	b.results[t.name][key] = append(b.results[t.name][key], v)
}

func (b *bench) note(t *target, s string) {
	if len(b.notes[t.name]) < 20 {
		b.notes[t.name] = append(b.notes[t.name], s)
	}
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05")}, args...)...)
}

func brief(m measurement) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var s []string
	for _, k := range keys {
		s = append(s, k+"="+strconv.FormatFloat(m[k], 'f', -1, 64))
	}
	return strings.Join(s, " ")
}

// startStub starts stub-upstream on a TLS port and returns it with the port
// and its CA file.
func (b *bench) startStub() (*process, upstream, error) {
	ca := filepath.Join(b.work, "stub-ca.pem")
	logf, err := os.Create(filepath.Join(b.work, "stub-upstream.log"))
	if err != nil {
		return nil, upstream{}, err
	}
	cmd := exec.Command(filepath.Join(b.bin, "stub-upstream"), "-https", "127.0.0.1:0", "-write-ca", ca)
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, upstream{}, err
	}
	if err := cmd.Start(); err != nil {
		return nil, upstream{}, fmt.Errorf("start stub-upstream: %w", err)
	}
	p := &process{name: "stub-upstream", cmd: cmd, done: make(chan struct{}), log: logf}
	go func() { cmd.Wait(); close(p.done) }()
	line, err := readLine(stdout, "listening https ", 10*time.Second)
	if err != nil {
		p.stop()
		return nil, upstream{}, fmt.Errorf("stub-upstream: %w", err)
	}
	_, portStr, err := net.SplitHostPort(strings.TrimPrefix(line, "listening https "))
	if err != nil {
		p.stop()
		return nil, upstream{}, err
	}
	port, _ := strconv.Atoi(portStr)
	return p, upstream{port: port, caFile: ca}, nil
}

// writeProxyCert writes a self-signed ECDSA certificate for 127.0.0.1 that
// nginx and HAProxy serve (cells-proxy makes its own): cert and key files
// for nginx, and both in one PEM for HAProxy.
func writeProxyCert(dir string) (cert, key, both string, err error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		return "", "", "", err
	}
	kder, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return "", "", "", err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	cert, key, both = filepath.Join(dir, "proxy-cert.pem"), filepath.Join(dir, "proxy-key.pem"), filepath.Join(dir, "proxy.pem")
	for path, data := range map[string][]byte{cert: certPEM, key: keyPEM, both: append(slices.Clone(certPEM), keyPEM...)} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			return "", "", "", err
		}
	}
	return cert, key, both, nil
}

// readThrough reads the file at path to its end.
func readThrough(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(io.Discard, f)
	return err
}
