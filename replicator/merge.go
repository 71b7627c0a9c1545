package replicator

import (
	"bytes"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// MergeFunc joins two live values of one key, for buckets whose records
// several nodes edit (Config.Merge). It must be a join-semilattice on the
// values it is given: deterministic, commutative (merge(a, b) ==
// merge(b, a), byte for byte), associative and idempotent
// (merge(a, merge(a, b)) == merge(a, b)). The Node calls it with its write
// lock held, so it must be fast and must not call the Node. It must not
// modify or keep a or b. An error makes the Node fall back to last writer
// wins for that pair (and log it).
type MergeFunc func(a, b []byte) ([]byte, error)

// Merge buckets.
//
// When a record arrives (remote, or a local write) for a key of a merge
// bucket whose stored record is live, and the new record is live too, the
// Node stores the join m = merge(stored, new) instead of the higher
// version alone:
//
//   - m equal to the value of the higher-versioned of the two: that record,
//     unchanged (so equal contents keep the higher version, and delivering
//     a record twice changes nothing);
//   - otherwise: m under a new local version, higher than both, so it wins
//     everywhere and carries the join onwards.
//
// Every node so ends with the join of every value written, whatever the
// delivery order; anti-entropy needs no change (the higher version is
// pulled, joined, and a different join gets a still higher version, which
// the other side pulls back). A tombstone on either side is last writer
// wins, as in other buckets.

// joinLocked decides what to store when r arrives for a key of a merge
// bucket whose current winner (live, as r is) has version cur. batch holds
// the winners already taken from the batch being merged (the current
// value may be among them). It returns the record to store and whether to
// store anything. n.mu must be held.
func (n *Node) joinLocked(r Record, cur Version, batch []Record) (Record, bool) {
	c := cur.Compare(r.Version)
	if c == 0 {
		return r, false // the same record
	}
	lww := func(err error) (Record, bool) {
		n.log.Warn("merge failed; the higher version wins", "bucket", r.Bucket, "key", r.Key, "error", err)
		return r, c < 0
	}
	var curVal []byte
	found := false
	for i := len(batch) - 1; i >= 0; i-- {
		if batch[i].Bucket == r.Bucket && batch[i].Key == r.Key {
			curVal, found = batch[i].Value, true
			break
		}
	}
	if !found {
		err := n.db.View(func(tx *bolt.Tx) error {
			stored, ok, err := getRecord(tx, r.Bucket, r.Key)
			if err == nil && (!ok || stored.Version != cur) {
				err = fmt.Errorf("stored record is not the indexed version %s", cur)
			}
			curVal = stored.Value
			return err
		})
		if err != nil {
			return lww(err)
		}
	}
	m, err := n.cfg.Merge[r.Bucket](curVal, r.Value)
	switch {
	case err != nil:
		return lww(err)
	case len(m) > MaxValueLen:
		return lww(fmt.Errorf("merged value is %d bytes, the limit is %d", len(m), MaxValueLen))
	}
	if c < 0 && bytes.Equal(m, r.Value) {
		return r, true // r is the higher version and already the join
	}
	if c > 0 && bytes.Equal(m, curVal) {
		return r, false // the stored record is higher and already the join
	}
	return Record{
		Bucket:  r.Bucket,
		Key:     r.Key,
		Value:   m,
		Version: Version{Time: n.clock.next(), Node: n.cfg.Name},
	}, true
}

// mergeable reports whether r and the current winner cur of its key are
// joined with a MergeFunc rather than compared by version.
func (n *Node) mergeable(r *Record, cur meta) bool {
	return !r.Deleted && !cur.deleted && n.cfg.Merge[r.Bucket] != nil
}
