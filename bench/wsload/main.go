// Command wsload is the websocket client of the cells-proxy benchmark
// (bench/run.sh). It opens -n websockets to an echo server (cmd/stub-upstream
// /ws/...), directly or through a proxy, leaves them idle for -settle, and
// reports how much the resident memory of the processes in -pids grew per
// connection. Then it measures echo round trips on every connection and
// prints one JSON object.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cells-proxy/cells-proxy/bench/internal/loadstat"
	"github.com/coder/websocket"
)

type result struct {
	Conns         int      `json:"conns"`
	Failed        int64    `json:"failed"`
	RSSBeforeKiB  int64    `json:"rss_before_kib"`
	RSSIdleKiB    int64    `json:"rss_idle_kib"`
	KiBPerConn    float64  `json:"kib_per_conn"`
	RoundTrips    int      `json:"round_trips"`
	RTTFailed     int64    `json:"rtt_failed"`
	P50ms         float64  `json:"p50_ms"`
	P99ms         float64  `json:"p99_ms"`
	ConnectSecond float64  `json:"connect_seconds"`
	Errors        []string `json:"errors,omitempty"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "wsload:", err)
		os.Exit(1)
	}
}

func run() error {
	url := flag.String("url", "", "ws:// or wss:// URL of the echo endpoint")
	n := flag.Int("n", 2000, "websockets to open")
	dialConc := flag.Int("dial-conc", 50, "concurrent dials")
	pids := flag.String("pids", "", "comma-separated PIDs whose VmRSS is summed; empty: no memory figures")
	settle := flag.Duration("settle", 3*time.Second, "idle time before reading memory")
	rounds := flag.Int("rounds", 3, "echo round trips per connection")
	rttConc := flag.Int("rtt-conc", 32, "connections exercised at once during the round trips")
	timeout := flag.Duration("timeout", 120*time.Second, "hard limit for the whole run")
	flag.Parse()
	if *url == "" {
		return errors.New("-url is required")
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()

	client := &http.Client{Transport: &http.Transport{
		// Self-signed certificates on 127.0.0.1; websockets need HTTP/1.1.
		TLSClientConfig:     &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}},
		MaxIdleConnsPerHost: -1,
	}}
	var res result
	res.Conns = *n
	var errs loadstat.Errors

	before, err := rss(*pids)
	if err != nil {
		return err
	}
	res.RSSBeforeKiB = before

	conns := make([]*websocket.Conn, *n)
	var failed atomic.Int64
	start := time.Now()
	sem := make(chan struct{}, *dialConc)
	var wg sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			dctx, dcancel := context.WithTimeout(ctx, 10*time.Second)
			defer dcancel()
			c, _, err := websocket.Dial(dctx, *url, &websocket.DialOptions{HTTPClient: client})
			if err != nil {
				failed.Add(1)
				errs.Add(err)
				return
			}
			conns[i] = c
		})
	}
	wg.Wait()
	res.ConnectSecond = time.Since(start).Seconds()
	res.Failed = failed.Load()
	defer func() {
		var cw sync.WaitGroup
		for _, c := range conns {
			if c != nil {
				cw.Go(func() { c.CloseNow() })
			}
		}
		cw.Wait()
	}()

	select {
	case <-time.After(*settle):
	case <-ctx.Done():
		return ctx.Err()
	}
	idle, err := rss(*pids)
	if err != nil {
		return err
	}
	res.RSSIdleKiB = idle
	if ok := int64(*n) - res.Failed; ok > 0 && *pids != "" {
		res.KiBPerConn = float64(idle-before) / float64(ok)
	}

	// Round trips: -rtt-conc workers take connections one after the other
	// and do -rounds echoes on each.
	msg := []byte("ping from wsload 0123456789abcdef")
	next := atomic.Int64{}
	lats := make([][]time.Duration, *rttConc)
	var rttFailed atomic.Int64
	for w := range *rttConc {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= len(conns) {
					return
				}
				c := conns[i]
				if c == nil {
					continue
				}
				for range *rounds {
					t0 := time.Now()
					if err := c.Write(ctx, websocket.MessageText, msg); err != nil {
						rttFailed.Add(1)
						errs.Add(err)
						break
					}
					_, got, err := c.Read(ctx)
					if err != nil || string(got) != string(msg) {
						rttFailed.Add(1)
						errs.Add(fmt.Errorf("echo: %v (%d bytes)", err, len(got)))
						break
					}
					lats[w] = append(lats[w], time.Since(t0))
				}
			}
		})
	}
	wg.Wait()
	all := slices.Concat(lats...)
	slices.Sort(all)
	res.RoundTrips = len(all)
	res.RTTFailed = rttFailed.Load()
	res.P50ms = loadstat.Ms(loadstat.Pct(all, 0.50))
	res.P99ms = loadstat.Ms(loadstat.Pct(all, 0.99))
	res.Errors = errs.List()
	return json.NewEncoder(os.Stdout).Encode(res)
}

// rss sums VmRSS (KiB) over the comma-separated PIDs.
func rss(pids string) (int64, error) {
	var total int64
	for p := range strings.SplitSeq(pids, ",") {
		if p == "" {
			continue
		}
		f, err := os.Open("/proc/" + p + "/status")
		if err != nil {
			return 0, err
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
				kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				if err != nil {
					f.Close()
					return 0, fmt.Errorf("pid %s VmRSS: %w", p, err)
				}
				total += kb
			}
		}
		f.Close()
	}
	return total, nil
}
