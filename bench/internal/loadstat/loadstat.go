// Package loadstat holds what the benchmark's load clients (bench/grpcload,
// bench/wsload) share: a bounded error list and latency percentiles.
package loadstat

import (
	"sync"
	"time"
)

// Errors keeps the first few errors of a load run, safe for concurrent use.
type Errors struct {
	mu   sync.Mutex
	errs []string
}

// Add records err if fewer than five are kept.
func (l *Errors) Add(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) < 5 {
		l.errs = append(l.errs, err.Error())
	}
}

// List is a copy of the kept errors.
func (l *Errors) List() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.errs...)
}

// Pct is the p-quantile (0..1) of sorted latencies; 0 when there are none.
func Pct(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

// Ms is d in milliseconds with microsecond precision.
func Ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
