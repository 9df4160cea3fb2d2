package proxy

import "log/slog"

// parkedPumps is how many pumps of ts's tunnels wait in the process's
// parker; ok is false when there is no parker (no epoll set).
func parkedPumps(ts *tunnels) (n int, ok bool) {
	pk := getParker(slog.New(slog.DiscardHandler))
	if pk == nil {
		return 0, false
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	for _, p := range pk.parked {
		if p.t.ts == ts {
			n++
		}
	}
	return n, true
}

// tunnelParked reports whether both pumps of ts's tunnel whose client is
// at client wait in the parker (true without a parker: nothing to wait
// for).
func tunnelParked(ts *tunnels, client string) bool {
	pk := getParker(slog.New(slog.DiscardHandler))
	if pk == nil {
		return true
	}
	var t *tunnel
	ts.mu.Lock()
	for tn := range ts.open {
		if tn.clientConn.RemoteAddr().String() == client {
			t = tn
		}
	}
	ts.mu.Unlock()
	if t == nil {
		return false
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	return t.up.parkID != 0 && pk.parked[t.up.parkID] == &t.up && t.down.parkID != 0 && pk.parked[t.down.parkID] == &t.down
}
