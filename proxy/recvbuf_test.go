package proxy

import (
	"bytes"
	"math/rand/v2"
	"testing"
)

// TestRecvBuffer writes and reads a call's answer in pieces of random
// sizes, as DATA frames arrive and the client reads, against a
// bytes.Buffer: every byte comes out once, in order; a drained buffer
// holds no chunk (an idle Cells Sync stream costs nothing), and one never
// holds more than a chunk beyond what is unread.
func TestRecvBuffer(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var b recvBuffer
	var want bytes.Buffer
	next := byte(0)
	for i := range 20000 {
		if rng.IntN(2) == 0 {
			p := make([]byte, rng.IntN(20<<10))
			for j := range p {
				p[j] = next
				next++
			}
			b.Write(p)
			want.Write(p)
		} else {
			p := make([]byte, rng.IntN(40<<10)+1)
			n := b.Read(p)
			w := want.Next(len(p))
			if !bytes.Equal(p[:n], w) {
				t.Fatalf("step %d: read %d bytes that differ from the %d written", i, n, len(w))
			}
		}
		if b.Len() != want.Len() {
			t.Fatalf("step %d: Len %d, want %d", i, b.Len(), want.Len())
		}
		if b.Len() == 0 && b.Cap() != 0 {
			t.Fatalf("step %d: drained, it holds %d bytes of chunks, want none", i, b.Cap())
		}
		if b.Cap() > b.Len()+2*(16<<10) {
			t.Fatalf("step %d: %d bytes of chunks for %d unread", i, b.Cap(), b.Len())
		}
	}
	b.Write(make([]byte, 100<<10))
	b.Reset()
	if b.Len() != 0 || b.Cap() != 0 {
		t.Errorf("after Reset: Len %d, Cap %d, want 0, 0", b.Len(), b.Cap())
	}
}

// TestRecvBufferAllocs: a unary call's answer (one small DATA frame, read
// whole) and a 64 KiB message in 16 KiB frames cost no allocation once the
// pools are warm; the grown slice they replace cost one per answer, and
// four per 64 KiB message read at the pace it came.
func TestRecvBufferAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector drops pooled items at random")
	}
	var b recvBuffer
	small, frame, p := make([]byte, 100), make([]byte, 16<<10), make([]byte, 32<<10)
	if got := testing.AllocsPerRun(100, func() {
		b.Write(small)
		b.Read(p)
	}); got != 0 {
		t.Errorf("small answer: %v allocations, want 0", got)
	}
	if got := testing.AllocsPerRun(100, func() {
		for range 4 {
			b.Write(frame)
		}
		for b.Len() > 0 {
			b.Read(p)
		}
	}); got != 0 {
		t.Errorf("64 KiB message: %v allocations, want 0", got)
	}
}
