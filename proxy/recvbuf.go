package proxy

// recvBuffer is what Cells has sent on a gRPC call and its client has not
// read yet: at most the call's receive window (512 KiB). It holds the bytes
// in chunks of 1, 4 or 16 KiB from pools, as x/net's HTTP/2 dataBuffer
// does, and gives each chunk back once it is read. A slice grown by append
// copied all it held at every doubling, and, dropped once drained above
// 64 KiB (so that an idle Cells Sync stream holds nothing), grew again
// from nothing at the next burst: with 64 KiB messages, a third of the
// proxy's CPU went to those copies, the collection of the slices, and
// handing their pages back to the system.
//
// Not safe for concurrent use: the call's connection's mutex guards it.
type recvBuffer struct {
	chunks [][]byte  // whole chunks of a pool: chunks[0][r:] read first, the last written up to w
	inline [2][]byte // chunks' array while it has at most two: no allocation for most calls
	r, w   int
	n      int // bytes not yet read
}

// recvChunkSizes are the sizes of the chunks, each with its pool: the
// smallest that holds what is being written (a unary call's answer takes
// one chunk of 1 KiB), or what the buffer already holds (a burst takes
// chunks of 16 KiB, the size of Cells' DATA frames).
var (
	recvChunks1  = newPool(func() *[1 << 10]byte { return new([1 << 10]byte) })
	recvChunks4  = newPool(func() *[4 << 10]byte { return new([4 << 10]byte) })
	recvChunks16 = newPool(func() *[16 << 10]byte { return new([16 << 10]byte) })
)

func getRecvChunk(want int) []byte {
	switch {
	case want <= 1<<10:
		return recvChunks1.Get()[:]
	case want <= 4<<10:
		return recvChunks4.Get()[:]
	}
	return recvChunks16.Get()[:]
}

func putRecvChunk(b []byte) {
	switch len(b) {
	case 1 << 10:
		recvChunks1.Put((*[1 << 10]byte)(b))
	case 4 << 10:
		recvChunks4.Put((*[4 << 10]byte)(b))
	case 16 << 10:
		recvChunks16.Put((*[16 << 10]byte)(b))
	}
}

// Len is the number of bytes not yet read.
func (b *recvBuffer) Len() int { return b.n }

// Cap is the size of the chunks held.
func (b *recvBuffer) Cap() int {
	c := 0
	for _, ch := range b.chunks {
		c += len(ch)
	}
	return c
}

// Write appends p.
func (b *recvBuffer) Write(p []byte) {
	for len(p) > 0 {
		if len(b.chunks) == 0 || b.w == len(b.chunks[len(b.chunks)-1]) {
			if b.chunks == nil {
				b.chunks = b.inline[:0]
			}
			b.chunks = append(b.chunks, getRecvChunk(max(len(p), b.n)))
			b.w = 0
		}
		n := copy(b.chunks[len(b.chunks)-1][b.w:], p)
		b.w += n
		b.n += n
		p = p[n:]
	}
}

// Read copies up to len(p) unread bytes into p, giving back each chunk it
// empties; the last one too, so that a drained buffer holds nothing.
func (b *recvBuffer) Read(p []byte) int {
	read := 0
	for len(p) > 0 && b.n > 0 {
		first := b.chunks[0]
		end := len(first)
		if len(b.chunks) == 1 {
			end = b.w
		}
		n := copy(p, first[b.r:end])
		p = p[n:]
		read += n
		b.r += n
		b.n -= n
		if b.r == end {
			b.dropFirst()
		}
	}
	return read
}

// Reset drops what is not read, giving every chunk back.
func (b *recvBuffer) Reset() {
	for len(b.chunks) > 0 {
		b.dropFirst()
	}
	b.n = 0
}

// dropFirst gives the first chunk back; the array of chunks is kept.
func (b *recvBuffer) dropFirst() {
	putRecvChunk(b.chunks[0])
	k := copy(b.chunks, b.chunks[1:])
	b.chunks[k] = nil
	b.chunks = b.chunks[:k]
	b.r = 0
	if k == 0 {
		b.w = 0
	}
}
