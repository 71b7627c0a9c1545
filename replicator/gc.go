package replicator

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Garbage collection and the last-sync time (docs/INTERNALS.md, "Garbage
// collection").

const (
	gcLeavesPerBatch  = 16               // leaves scanned per collection batch
	gcMaxBatch        = 256              // records removed per transaction (Node.mu is held for one)
	lastSyncPersistMs = 60 * 1000        // the stored last-sync time may lag by this much
	legacyRetry       = 10 * time.Minute // how long a peer that closed on msgSync gets the digest exchange
)

// keyLastSync is the meta key of the last-sync time (u64 ms since the
// epoch): the start of the last completed tree exchange. Absent in files
// written by earlier releases; loadLastSync then estimates it.
var keyLastSync = []byte("lastsync")

// aeState is the anti-entropy and garbage-collection state of a Node.
type aeState struct {
	metaBytes atomic.Uint64 // anti-entropy metadata bytes sent (everything but records)
	metaKeys  atomic.Uint64 // keys listed in anti-entropy metadata sent
	collected atomic.Uint64 // tombstones removed by garbage collection
	dropped   atomic.Uint64 // records dropped by a resync after the horizon

	mu       sync.Mutex // guards the following
	loaded   bool
	lastSync uint64               // ms; 0: never synced
	legacy   map[string]time.Time // peers on the digest exchange, until
}

// countMeta counts an anti-entropy metadata message sent.
func (n *Node) countMeta(msg []byte, keys int) {
	n.ae.metaBytes.Add(uint64(len(msg)))
	n.ae.metaKeys.Add(uint64(keys))
}

// aeStats fills the anti-entropy and garbage-collection fields of s.
func (n *Node) aeStats(s *Stats) {
	s.AntiEntropyMetaBytes = n.ae.metaBytes.Load()
	s.AntiEntropyMetaKeys = n.ae.metaKeys.Load()
	s.TombstonesCollected = n.ae.collected.Load()
	s.ResyncDropped = n.ae.dropped.Load()
	if ls := n.lastSyncMs(); ls != 0 {
		s.LastSync = time.UnixMilli(int64(ls))
	}
}

// tombstoneHorizon returns the horizon after which tombstones are removed.
func (cfg Config) tombstoneHorizon() time.Duration { return cfg.TombstoneHorizon }

// nowMs is the wall clock in ms.
func (n *Node) nowMs() uint64 { return uint64(max(n.cfg.Now().UnixMilli(), 0)) }

// horizonMs is the time before which tombstones may be collected, ms.
func (n *Node) horizonMs() uint64 {
	return n.nowMs() - min(n.nowMs(), uint64(n.cfg.TombstoneHorizon.Milliseconds()))
}

// stale reports whether a last-sync time is older than the horizon (0,
// never synced, is not stale).
func (n *Node) stale(last uint64) bool { return last != 0 && last < n.horizonMs() }

// lastSyncMs returns the last-sync time, loading it on first use.
func (n *Node) lastSyncMs() uint64 {
	n.ae.mu.Lock()
	defer n.ae.mu.Unlock()
	if !n.ae.loaded {
		n.ae.lastSync = n.loadLastSync()
		n.ae.loaded = true
	}
	return n.ae.lastSync
}

// loadLastSync reads the stored last-sync time. A file from an earlier
// release has none: if it holds records, the clock it stored (the newest
// time this node issued or saw) stands in for it.
func (n *Node) loadLastSync() (last uint64) {
	_ = n.db.View(func(tx *bolt.Tx) error {
		m := tx.Bucket(bktMeta)
		if v := m.Get(keyLastSync); len(v) == 8 {
			last = binary.BigEndian.Uint64(v)
			return nil
		}
		if k, _ := tx.Bucket(bktData).Cursor().First(); k != nil {
			if v := m.Get(keyHLC); len(v) == 8 {
				last = binary.BigEndian.Uint64(v) >> 16
			}
		}
		return nil
	})
	return last
}

// noteSync records a completed tree exchange that started at start, with a
// peer whose last sync was theirs.
func (n *Node) noteSync(start, mine, theirs uint64) {
	next := start
	switch {
	case mine == 0 && n.stale(theirs):
		next = theirs // a new node inherits a returning peer's staleness
	case theirs == 0 && n.stale(mine):
		next = mine // a returning node stays so until it meets a node that has synced
	}
	n.ae.mu.Lock()
	if next <= n.ae.lastSync {
		n.ae.mu.Unlock()
		return
	}
	n.ae.lastSync = next
	n.ae.mu.Unlock()
	// Stored every time (one small transaction per exchange): a stored
	// time that lagged would let records written in the lag come back.
	var buf [8]byte
	binary.BigEndian.PutUint64(buf[:], next)
	if err := n.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bktMeta).Put(keyLastSync, buf[:]) }); err != nil {
		n.log.Warn("storing the last-sync time", "error", err)
	}
}

// neverMet reports whether this node has never seen another member (a
// circle of one collects tombstones without waiting for an exchange).
func (n *Node) neverMet() bool {
	n.membersMu.Lock()
	defer n.membersMu.Unlock()
	return len(n.members) == 0
}

// gcInterval is the period of garbage collection: a 24th of the horizon,
// between 1 s (tests and the fault suite use short horizons) and 1 h.
func (n *Node) gcInterval() time.Duration {
	return min(max(n.cfg.TombstoneHorizon/24, time.Second), time.Hour)
}

// gcLoop collects garbage a minute after start (a node restarted more
// often than gcInterval still collects) and then every gcInterval, until
// Close.
func (n *Node) gcLoop() {
	defer n.wg.Done()
	t := time.NewTimer(min(n.gcInterval(), time.Minute))
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
			t.Reset(n.gcInterval())
		}
		if k, err := n.collectGarbage(); err != nil && n.ctx.Err() == nil {
			n.log.Warn("garbage collection", "error", err)
		} else if k > 0 {
			n.log.Debug("collected tombstones", "removed", k)
		}
	}
}

// collectGarbage removes the tombstones older than the horizon that this
// node has exchanged since they were written (older than its last sync,
// unless it never met another node) and returns how many it removed. It
// scans the index in batches under the bucket locks and holds Node.mu only
// for each batch's transaction.
func (n *Node) collectGarbage() (int, error) {
	before := n.horizonMs()
	if !n.neverMet() {
		before = min(before, n.lastSyncMs())
	}
	if before == 0 {
		return 0, nil
	}
	removed := 0
	for name, b := range n.buckets() {
		var cand []summaryEntry
		for l := range len(b.leaves) {
			b.scan(l, func(key string, m meta) {
				if m.deleted && m.v.Time>>16 < before {
					cand = append(cand, summaryEntry{key: key, m: m})
				}
			})
			if len(cand) >= gcMaxBatch || (l+1)%gcLeavesPerBatch == 0 || l == len(b.leaves)-1 {
				k, err := n.purge(name, cand, false)
				removed += k
				if err != nil {
					return removed, err
				}
				cand = cand[:0]
			}
		}
	}
	n.ae.collected.Add(uint64(removed))
	return removed, nil
}

// purge removes records from disk and index, each only if its winning
// version is still the one given; event queues a deletion for watchers
// (records dropped by a resync; collected tombstones are already deleted).
func (n *Node) purge(bucket string, es []summaryEntry, event bool) (int, error) {
	if len(es) == 0 {
		return 0, nil
	}
	if !n.enter() {
		return 0, ErrClosed
	}
	defer n.wg.Done()
	n.mu.Lock()
	defer n.mu.Unlock()
	var gone []summaryEntry
	err := n.db.Update(func(tx *bolt.Tx) error {
		gone = gone[:0]
		b := tx.Bucket(bktData).Bucket([]byte(bucket))
		if b == nil {
			return nil
		}
		for _, e := range es {
			if cur, ok := n.ix.get(bucket, e.key); !ok || cur != e.m {
				continue
			}
			if err := b.Delete([]byte(e.key)); err != nil {
				return err
			}
			gone = append(gone, e)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("removing records of %s: %w", bucket, err)
	}
	var events []Record
	for _, e := range gone {
		n.ix.remove(bucket, e.key)
		if event && !e.m.deleted {
			events = append(events, Record{Bucket: bucket, Key: e.key, Version: e.m.v, Deleted: true})
		}
	}
	if len(events) > 0 {
		n.watch.enqueue(events)
	}
	return len(gone), nil
}
