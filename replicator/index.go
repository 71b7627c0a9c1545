package replicator

import (
	"crypto/sha256"
	"encoding/binary"
	"sort"
)

// The index keeps, in memory, every key's winning version, grouped per
// bucket into numRanges hash ranges (by the first byte of SHA-256(key)),
// with an order-independent hash (XOR of per-entry hashes) per range and
// per bucket. Anti-entropy compares those hashes, so finding what differs
// costs O(differences), not O(records). Node.mu guards it.

// rangeIndex is one hash range of a bucket.
type rangeIndex struct {
	hash uint64
	keys map[string]meta
}

// bucketIndex is one bucket's index.
type bucketIndex struct {
	root   uint64 // XOR of all range hashes
	live   int    // live records
	dead   int    // tombstones
	ranges [numRanges]rangeIndex
}

func rangeOf(key string) byte {
	h := sha256.Sum256([]byte(key))
	return h[0]
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

// index maps bucket -> bucketIndex.
type index map[string]*bucketIndex

func (ix index) get(bucket, key string) (meta, bool) {
	b := ix[bucket]
	if b == nil {
		return meta{}, false
	}
	m, ok := b.ranges[rangeOf(key)].keys[key]
	return m, ok
}

// set records m as key's winning version.
func (ix index) set(bucket, key string, m meta) {
	b := ix[bucket]
	if b == nil {
		b = &bucketIndex{}
		ix[bucket] = b
	}
	r := &b.ranges[rangeOf(key)]
	if r.keys == nil {
		r.keys = make(map[string]meta)
	}
	if old, ok := r.keys[key]; ok {
		h := entryHash(key, old.v)
		r.hash ^= h
		b.root ^= h
		if old.deleted {
			b.dead--
		} else {
			b.live--
		}
	}
	h := entryHash(key, m.v)
	r.hash ^= h
	b.root ^= h
	if m.deleted {
		b.dead++
	} else {
		b.live++
	}
	r.keys[key] = m
}

// digest returns every bucket's root hash, sorted by bucket.
func (ix index) digest() []bucketDigest {
	out := make([]bucketDigest, 0, len(ix))
	for name, b := range ix {
		out = append(out, bucketDigest{bucket: name, root: b.root, entries: b.live + b.dead})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].bucket < out[j].bucket })
	return out
}

// rangeHashes returns a bucket's range hashes (all zero if it is absent).
func (ix index) rangeHashes(bucket string) [numRanges]uint64 {
	var out [numRanges]uint64
	if b := ix[bucket]; b != nil {
		for i := range b.ranges {
			out[i] = b.ranges[i].hash
		}
	}
	return out
}

// entries returns a bucket's entries in range r, sorted by key.
func (ix index) entries(bucket string, r byte) []summaryEntry {
	b := ix[bucket]
	if b == nil {
		return nil
	}
	keys := b.ranges[r].keys
	out := make([]summaryEntry, 0, len(keys))
	for k, m := range keys {
		out = append(out, summaryEntry{key: k, m: m})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].key < out[j].key })
	return out
}

// counts returns the number of live records and tombstones.
func (ix index) counts() (live, dead int) {
	for _, b := range ix {
		live += b.live
		dead += b.dead
	}
	return live, dead
}
