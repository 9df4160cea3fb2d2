package proxy

import (
	"net"
	"sync"
	"time"
)

// writeBehind is the write side of a connection that net/http's HTTP/2
// server serves. That server makes every flush, and every HEADERS frame,
// on a goroutine it starts for the purpose, while its serve loop waits:
// the goroutine encrypts and makes the system call on a fresh stack, which
// the runtime grows for crypto/tls, and each flush is a write(2) of its
// own. writeBehind takes the bytes and returns at once. A goroutine of its
// own, started when bytes are waiting and gone when none are, writes them;
// what the server flushes while it writes leaves with the next write. Under
// h2load -m32 that is 0.2 write(2) per response instead of 1.6. The TLS
// records of each write leave in one write(2) (the client socket's
// recordBatch), where crypto/tls makes one per record: a download's 16 KiB
// DATA frames made two write(2) per frame (131,100 per GiB), and now about
// 50,000 leave.
//
// A client that does not read still holds the server back: writeBehind
// takes at most writeBehindMax (65 KiB) beyond the one write in progress,
// then Write waits, as the system call did. What the server wrote before it
// closed the connection (a GOAWAY, the last answers) is still written, for
// at most writeBehindLinger, then the connection closes. (The servers set no
// HTTP2Config.WriteByteTimeout: it would time writeBehind's Write, which
// waits only when 65 KiB are pending, not the writes to the socket.)
//
// A client whose socket takes no byte for stall (nginx's send_timeout; at
// most 1.5 times as long) has its connection closed: its streams' handlers
// would otherwise wait on the server's write until the connection died,
// which a client that sends PINGs but reads nothing put off for ever. A
// stream's own write deadline cannot help there: its RST_STREAM waits
// behind the blocked write.
//
// A client that takes bytes, however slowly, keeps its connection, as with
// nginx's send_timeout: while a write waits, the socket is looked at every
// stall/4, and the deadline moves on as long as the client's TCP has
// acknowledged bytes since the last look (ackedBytes). Without that, a
// client that took bytes all the time lost its connection once one write
// took longer than the bound: at 32 KiB a write (writeBehindMax then),
// below about 500 bytes/s at 60 s, 20 KiB/s at PROXY_IDLE_TIMEOUT=1s.
// Where the socket cannot be looked at, each write must end within the
// bound.
type writeBehind struct {
	net.Conn
	sock     *clientSocket // under the connection's TLS: its records leave in one write(2); nil without
	stall    time.Duration // bounds each write to the socket; 0: no bound
	deadline time.Time     // the write deadline set for stall

	// While a write runs, watch looks at acked every stall/4 and moves
	// the deadline on if the client took bytes since the last look
	// (mark). Guarded by mu, as deadline.
	acked    func() (uint64, bool) // nil: the socket is not looked at
	watch    *time.Timer
	watching bool
	mark     uint64

	mu      sync.Mutex
	room    sync.Cond // pending was taken, or a write failed
	pending []byte    // taken, not yet written; nil when empty
	writing bool      // the writer runs; always so while pending holds bytes
	err     error     // the write that failed; every Write returns it from then on
	closed  bool
}

const (
	// writeBehindMax bounds the bytes taken and not yet written, beyond
	// those of the write in progress: a connection whose client reads
	// slowly holds two such buffers (writeBehindBuffers' arrays) and, while
	// the write's system call waits, the 64 KiB of its records
	// (recordBatch). It holds the four DATA frames of one 63 KiB write of
	// a download (relayGathered) and a few small frames: at 32 KiB the
	// server waited for room in the middle of each such write, and each
	// frame left in a write(2) of its own; at 65 KiB an HTTP/2 download
	// costs about a fifth less CPU (see the commit that set it).
	writeBehindMax = 65 << 10
	// writeBehindLinger bounds the write of what is pending at Close, as
	// crypto/tls bounds its close_notify.
	writeBehindLinger = 5 * time.Second
)

func newWriteBehind(c net.Conn, stall time.Duration) *writeBehind {
	w := &writeBehind{Conn: c, stall: stall, sock: recordSocket(c)}
	w.room.L = &w.mu
	if stall > 0 {
		w.acked = ackedBytes(c)
	}
	return w
}

// progress runs every stall/4 while the writer runs: if the client's TCP
// acknowledged bytes since the last look, the write in progress is not
// stalled, and its deadline moves on. Not after Close: its linger
// deadline stands.
func (w *writeBehind) progress() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.writing || w.closed || w.err != nil {
		if !w.writing && !w.closed && w.err == nil && !w.deadline.IsZero() {
			// The writer stopped at most stall/4 ago, with at least
			// stall left on its deadline: clear it before it passes
			// (see writer).
			w.deadline = time.Time{}
			w.Conn.SetWriteDeadline(time.Time{})
		}
		w.watching = false
		return
	}
	if n, ok := w.acked(); ok && n != w.mark {
		w.mark = n
		// The last byte taken was at most stall/4 ago: the write fails
		// once none has been for between stall and 1.5 times as long.
		if d := time.Now().Add(w.stall + w.stall/4); d.After(w.deadline) {
			w.deadline = d
			w.Conn.SetWriteDeadline(d)
		}
	}
	w.watch.Reset(w.stall / 4)
}

func (w *writeBehind) Write(p []byte) (int, error) {
	w.mu.Lock()
	for w.err == nil && !w.closed && len(w.pending) > 0 && len(w.pending)+len(p) > writeBehindMax {
		w.room.Wait()
	}
	if err := w.err; err != nil || w.closed {
		w.mu.Unlock()
		if err == nil {
			err = net.ErrClosed
		}
		return 0, err
	}
	if w.pending == nil {
		// A p larger than the buffer (a DATA frame over 65 KiB, only
		// for a client that allows such frames) makes append allocate;
		// putWriteBehind then leaves that array to the collector.
		w.pending = writeBehindBuffers.Get()[:0]
	}
	w.pending = append(w.pending, p...)
	if !w.writing {
		w.writing = true
		go w.writer()
	}
	w.mu.Unlock()
	return len(p), nil
}

// writer writes what is pending until nothing is, then stops; it closes
// the connection if it was closed meanwhile or a write failed.
func (w *writeBehind) writer() {
	w.mu.Lock()
	for len(w.pending) > 0 && w.err == nil {
		buf := w.pending
		w.pending = nil
		if w.stall > 0 && !w.closed {
			// Each write gets at least stall, at most half as much
			// again: the deadline moves only once less than stall
			// is left, so a writer that runs on (a client reading a
			// long download) resets its timer about once every
			// stall/2, not at every write; the deadline is cleared
			// once the writer stops (below). Under mu, so as not to
			// undo Close's linger deadline. A write that times out
			// leaves crypto/tls unusable: the connection is closed
			// below, as for any failed write.
			if now := time.Now(); w.deadline.Sub(now) < w.stall {
				w.deadline = now.Add(w.stall + w.stall/2)
				w.Conn.SetWriteDeadline(w.deadline)
			}
			if w.acked != nil && !w.watching {
				w.watching = true
				if w.watch == nil {
					w.watch = time.AfterFunc(w.stall/4, w.progress)
				} else {
					w.watch.Reset(w.stall / 4)
				}
			}
		}
		w.mu.Unlock()
		if w.sock != nil {
			w.sock.batch.hold()
		}
		_, err := w.Conn.Write(buf)
		putWriteBehind(buf)
		if w.sock != nil {
			if ferr := w.sock.batch.release(); err == nil {
				err = ferr
			}
		}
		w.mu.Lock()
		if err != nil {
			w.err = err
			putWriteBehind(w.pending)
			w.pending = nil
		}
		w.room.Broadcast()
	}
	w.writing = false
	done := w.closed || w.err != nil
	if !done && !w.deadline.IsZero() && (!w.watching || time.Until(w.deadline) < w.stall/2) {
		// No deadline may pass while nothing is written: crypto/tls
		// writes on its own too, the answer to a client's KeyUpdate,
		// and a write that fails on a deadline leaves it unusable.
		// With the watch armed, progress clears it within stall/4,
		// which spares a connection that writes often (a gRPC
		// stream's every message) two deadline changes per message;
		// unless the deadline is nearer than that (a write that
		// ended just in time).
		w.deadline = time.Time{}
		w.Conn.SetWriteDeadline(time.Time{})
	}
	if done && w.watching && w.watch.Stop() {
		w.watching = false
	}
	w.mu.Unlock()
	if done {
		w.Conn.Close()
	}
}

var writeBehindBuffers = newPool(func() *[writeBehindMax]byte { return new([writeBehindMax]byte) })

func putWriteBehind(b []byte) {
	if cap(b) == writeBehindMax {
		writeBehindBuffers.Put((*[writeBehindMax]byte)(b[:writeBehindMax]))
	}
}

// Close closes the connection at once if nothing is pending; otherwise it
// leaves that to the writer, which gets writeBehindLinger to finish.
// Writes after Close fail, and so do reads at once, as after any Close:
// net/http's server ends a connection's serve loop, and the handlers that
// wait on it, only when its read fails.
func (w *writeBehind) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return net.ErrClosed
	}
	w.closed = true
	// The watch, armed by the last write for up to stall/4 (15 s by
	// default), would hold the connection, its buffers and TLS state,
	// until it fired; the writer stops it when it ends after Close.
	if w.watching && w.watch.Stop() {
		w.watching = false
	}
	writing := w.writing
	if writing {
		now := time.Now()
		w.Conn.SetWriteDeadline(now.Add(writeBehindLinger))
		w.Conn.SetReadDeadline(now)
	}
	w.room.Broadcast()
	w.mu.Unlock()
	if writing {
		return nil
	}
	return w.Conn.Close()
}
