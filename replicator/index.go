package replicator

import (
	"crypto/sha256"
	"encoding/binary"
	"sort"
	"sync"
)

// The index keeps, in memory, every key's winning version, per bucket in a
// fixed hash tree over the key space. A key's position is the first 8
// bytes of SHA-256(key) (big-endian); the tree splits positions 4 bits per
// level (fanout 16). Every tree node holds the XOR of the entry hashes
// (entryHash of key and version) below it and their count; depths 0 (the
// bucket root) to leafDepth are kept up to date on every set, and the keys
// live in the 4096 leaves of depth leafDepth. Nodes deeper than leafDepth
// are computed on demand from their leaf (a few keys each in a large
// bucket). Depth 2 is the 256 ranges of the digest exchange (first byte of
// SHA-256(key)), so both exchanges read the same tree.
//
// Locking: Node.mu guards the bucket map and serialises writers; a
// bucket's tree and leaves are also guarded by its own RWMutex, so
// anti-entropy reads them (under the bucket lock only) while writes go on,
// holding Node.mu for no more than copying the bucket map.

const (
	treeBits     = 4
	treeFanout   = 1 << treeBits
	leafDepth    = 3
	maxTreeDepth = 64 / treeBits // positions have 64 bits
)

// ixEntry is one key's winning version and its position and hash.
type ixEntry struct {
	m   meta
	pos uint64
	h   uint64
}

// tnode is one node of a bucket's hash tree.
type tnode struct {
	hash  uint64 // XOR of the entry hashes below
	count int    // entries below
}

// bucketIndex is one bucket's index.
type bucketIndex struct {
	live int // live records; guarded by Node.mu
	dead int // tombstones; guarded by Node.mu

	mu     sync.RWMutex // guards levels and leaves; writers hold Node.mu too
	levels [leafDepth + 1][]tnode
	leaves []map[string]ixEntry // by leaf number; nil until used
}

func newBucketIndex() *bucketIndex {
	b := &bucketIndex{leaves: make([]map[string]ixEntry, 1<<(treeBits*leafDepth))}
	for d := range b.levels {
		b.levels[d] = make([]tnode, 1<<(treeBits*d))
	}
	return b
}

// keyPos returns key's position in the tree.
func keyPos(key string) uint64 {
	h := sha256.Sum256([]byte(key))
	return binary.BigEndian.Uint64(h[:8])
}

// prefixAt returns the tree node of depth d that holds position pos.
func prefixAt(pos uint64, d int) uint64 {
	if d == 0 {
		return 0
	}
	return pos >> (64 - treeBits*d)
}

// entryHash hashes a (key, version) pair.
func entryHash(key string, v Version) uint64 {
	h := sha256.New()
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], uint64(len(key)))
	h.Write(buf[:])
	h.Write([]byte(key))
	binary.BigEndian.PutUint64(buf[:], v.Time)
	h.Write(buf[:])
	h.Write([]byte(v.Node))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// index maps bucket -> bucketIndex. Node.mu guards the map.
type index map[string]*bucketIndex

// get returns key's winning version. The caller holds Node.mu.
func (ix index) get(bucket, key string) (meta, bool) {
	b := ix[bucket]
	if b == nil {
		return meta{}, false
	}
	e, ok := b.leaves[prefixAt(keyPos(key), leafDepth)][key]
	return e.m, ok
}

// set records m as key's winning version. The caller holds Node.mu.
func (ix index) set(bucket, key string, m meta) {
	b := ix[bucket]
	if b == nil {
		b = newBucketIndex()
		ix[bucket] = b
	}
	pos := keyPos(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	leaf := &b.leaves[prefixAt(pos, leafDepth)]
	if *leaf == nil {
		*leaf = make(map[string]ixEntry)
	}
	if old, ok := (*leaf)[key]; ok {
		b.account(old, -1)
	}
	e := ixEntry{m: m, pos: pos, h: entryHash(key, m.v)}
	b.account(e, +1)
	(*leaf)[key] = e
}

// remove forgets key (garbage collection). The caller holds Node.mu.
func (ix index) remove(bucket, key string) {
	b := ix[bucket]
	if b == nil {
		return
	}
	pos := keyPos(key)
	b.mu.Lock()
	defer b.mu.Unlock()
	leaf := b.leaves[prefixAt(pos, leafDepth)]
	if old, ok := leaf[key]; ok {
		b.account(old, -1)
		delete(leaf, key)
	}
	if b.levels[0][0].count == 0 {
		delete(ix, bucket)
	}
}

// account adds (+1) or removes (-1) e in the tree and counts. The caller
// holds Node.mu and b.mu.
func (b *bucketIndex) account(e ixEntry, sign int) {
	for d := range b.levels {
		n := &b.levels[d][prefixAt(e.pos, d)]
		n.hash ^= e.h
		n.count += sign
	}
	if e.m.deleted {
		b.dead += sign
	} else {
		b.live += sign
	}
}

// node returns the tree node (d, p).
func (b *bucketIndex) node(d int, p uint64) tnode {
	if b == nil {
		return tnode{}
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	if d <= leafDepth {
		return b.levels[d][p]
	}
	var out tnode
	for _, e := range b.leaves[p>>(treeBits*(d-leafDepth))] {
		if prefixAt(e.pos, d) == p {
			out.hash ^= e.h
			out.count++
		}
	}
	return out
}

// children returns the 16 children of tree node (d, p), d < maxTreeDepth.
func (b *bucketIndex) children(d int, p uint64) [treeFanout]tnode {
	var out [treeFanout]tnode
	if b == nil {
		return out
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	if d+1 <= leafDepth {
		copy(out[:], b.levels[d+1][p*treeFanout:])
		return out
	}
	for _, e := range b.leaves[p>>(treeBits*(d-leafDepth))] {
		if prefixAt(e.pos, d) == p {
			c := &out[prefixAt(e.pos, d+1)&(treeFanout-1)]
			c.hash ^= e.h
			c.count++
		}
	}
	return out
}

// entriesIn returns the entries below tree node (d, p), sorted by key.
func (b *bucketIndex) entriesIn(d int, p uint64) []summaryEntry {
	if b == nil {
		return nil
	}
	b.mu.RLock()
	var out []summaryEntry
	if d >= leafDepth {
		for k, e := range b.leaves[p>>(treeBits*(d-leafDepth))] {
			if prefixAt(e.pos, d) == p {
				out = append(out, summaryEntry{key: k, m: e.m})
			}
		}
	} else {
		span := uint64(1) << (treeBits * (leafDepth - d))
		for l := p * span; l < (p+1)*span; l++ {
			for k, e := range b.leaves[l] {
				out = append(out, summaryEntry{key: k, m: e.m})
			}
		}
	}
	b.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].key < out[j].key })
	return out
}

// rangeHashes returns the 256 range hashes of the digest exchange.
func (b *bucketIndex) rangeHashes() [numRanges]uint64 {
	var out [numRanges]uint64
	if b == nil {
		return out
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	for i, n := range b.levels[2] {
		out[i] = n.hash
	}
	return out
}

// scan calls fn with every entry of leaf l (under the bucket's read lock).
func (b *bucketIndex) scan(l int, fn func(key string, m meta)) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for k, e := range b.leaves[l] {
		fn(k, e.m)
	}
}

// digest returns every bucket's root hash, sorted by bucket. The caller
// holds Node.mu.
func (ix index) digest() []bucketDigest {
	out := make([]bucketDigest, 0, len(ix))
	for name, b := range ix {
		root := b.node(0, 0)
		out = append(out, bucketDigest{bucket: name, root: root.hash, entries: root.count})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].bucket < out[j].bucket })
	return out
}

// counts returns the number of live records and tombstones. The caller
// holds Node.mu.
func (ix index) counts() (live, dead int) {
	for _, b := range ix {
		live += b.live
		dead += b.dead
	}
	return live, dead
}

// snapshot returns a copy of the bucket map. The caller holds Node.mu.
func (ix index) snapshot() map[string]*bucketIndex {
	out := make(map[string]*bucketIndex, len(ix))
	for k, b := range ix {
		out[k] = b
	}
	return out
}

// buckets returns a copy of the bucket map, taking Node.mu only for that.
func (n *Node) buckets() map[string]*bucketIndex {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ix.snapshot()
}
