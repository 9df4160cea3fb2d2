package proxy

import (
	"log/slog"
	"os"
	"sync"
	"syscall"
)

// parker waits on the sockets of idle websocket pumps, all of them in one
// epoll set of its own, with one goroutine for the whole process: an idle
// websocket then has no goroutine at all, where a goroutine parked on each
// socket cost its stack, its g, and as much again of heap that the garbage
// collector's goal grew by. Go's netpoller registers the same sockets in
// its own set; Linux lets a socket be in several.
//
// A pump is parked with EPOLLONESHOT, level-triggered: bytes that arrived
// before it was parked wake it at once, and the set stops watching it once
// it has woken, until it is parked again. The set knows a pump by a number,
// never by its file descriptor: a socket closed while parked leaves the set
// with it (the kernel removes it), and its number, looked up after that,
// finds nothing, even when a new socket has the same descriptor.
type parker struct {
	epfd int
	ep   syscall.RawConn // epfd under Go's netpoller: readable when a pump is due

	log *slog.Logger

	mu     sync.Mutex
	parked map[uint64]*pump
	next   uint64
	dead   bool // the set failed: nothing more is parked
}

var (
	parkerOnce sync.Once
	theParker  *parker // nil: pumps wait inside their reads
)

// getParker starts the process's parker on first use; log is the first
// user's logger.
func getParker(log *slog.Logger) *parker {
	parkerOnce.Do(func() {
		pk, err := newParker(log)
		if err != nil {
			log.Warn("websockets: no epoll set for idle connections; each waits on a goroutine of its own", "err", err)
			return
		}
		theParker = pk
		go pk.loop()
	})
	return theParker
}

func newParker(log *slog.Logger) (*parker, error) {
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := syscall.SetNonblock(epfd, true); err != nil {
		syscall.Close(epfd)
		return nil, os.NewSyscallError("setnonblock", err)
	}
	// Non-blocking, so os.NewFile hands it to the netpoller: an epoll set
	// is readable when one of its sockets is ready.
	f := os.NewFile(uintptr(epfd), "websocket-parker")
	ep, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &parker{epfd: epfd, ep: ep, log: log, parked: make(map[uint64]*pump)}, nil
}

// park adds p's socket to the set; p.wake runs once it is readable, unless
// unpark takes p back first. It reports false when the socket could not be
// added (closed meanwhile, the kernel refused, no set): the caller then
// keeps the pump on its goroutine.
func (pk *parker) park(p *pump) bool {
	if pk == nil || p.raw == nil {
		return false
	}
	// Under mu throughout: an event for p, even one that fires as soon as
	// the socket is armed, is looked up only once p is in parked.
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if pk.dead {
		return false
	}
	if p.parkID == 0 {
		pk.next++
		p.parkID = pk.next
	}
	ev := syscall.EpollEvent{
		Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT,
		Fd:     int32(uint32(p.parkID)),
		Pad:    int32(uint32(p.parkID >> 32)),
	}
	var cerr error
	// Control holds the descriptor open: it cannot be closed and reused
	// by another socket while it is being armed.
	err := p.raw.Control(func(fd uintptr) {
		if p.inSet {
			cerr = syscall.EpollCtl(pk.epfd, syscall.EPOLL_CTL_MOD, int(fd), &ev)
			if cerr != syscall.ENOENT {
				return
			}
		}
		cerr = syscall.EpollCtl(pk.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return false
	}
	p.inSet = true
	pk.parked[p.parkID] = p
	return true
}

// unpark takes p out of the set's care if it is parked and has not woken:
// the caller then owns it. A socket left armed in the set is removed when
// it is closed; an event from it finds no pump.
func (pk *parker) unpark(p *pump) bool {
	if pk == nil {
		return false
	}
	pk.mu.Lock()
	defer pk.mu.Unlock()
	if p.parkID == 0 || pk.parked[p.parkID] != p {
		return false
	}
	delete(pk.parked, p.parkID)
	return true
}

// loop wakes the pumps whose sockets are ready, for the life of the
// process.
func (pk *parker) loop() {
	events := make([]syscall.EpollEvent, 128)
	var due []*pump
	for {
		err := pk.ep.Read(func(fd uintptr) bool {
			n, err := syscall.EpollWait(int(fd), events, 0)
			for err == syscall.EINTR {
				// Not waited for again: the netpoller watches the set
				// edge-triggered and would not report what is pending.
				n, err = syscall.EpollWait(int(fd), events, 0)
			}
			if err != nil || n <= 0 {
				return false // nothing ready: wait for the set
			}
			pk.mu.Lock()
			for _, ev := range events[:n] {
				id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
				if p := pk.parked[id]; p != nil {
					delete(pk.parked, id)
					due = append(due, p)
				}
			}
			pk.mu.Unlock()
			return true
		})
		if err != nil {
			// Not expected (the set is never closed). Wake every pump:
			// each then waits inside its reads, as without a set.
			pk.log.Error("websockets: epoll set failed; idle websockets wait on goroutines of their own from now on", "err", err)
			pk.mu.Lock()
			pk.dead = true
			for id, p := range pk.parked {
				delete(pk.parked, id)
				go p.wake()
			}
			pk.mu.Unlock()
			return
		}
		for i, p := range due {
			go p.wake()
			due[i] = nil
		}
		due = due[:0]
	}
}
