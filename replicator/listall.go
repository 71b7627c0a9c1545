package replicator

import (
	"bytes"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// ListWithTombstones returns every record of bucket whose key starts with
// prefix, tombstones included (Deleted set, no Value), sorted by key. It is
// for tools that compare the full state of nodes (the fault-injection
// suite's dumps); List is what applications read.
func (n *Node) ListWithTombstones(bucket, prefix string) ([]Record, error) {
	if err := checkBucket(bucket); err != nil {
		return nil, err
	}
	if !n.enter() {
		return nil, ErrClosed
	}
	defer n.wg.Done()
	var out []Record
	err := n.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktData).Bucket([]byte(bucket))
		if b == nil {
			return nil
		}
		c := b.Cursor()
		p := []byte(prefix)
		for k, v := c.Seek(p); k != nil && bytes.HasPrefix(k, p); k, v = c.Next() {
			m, val, err := decodeStored(v)
			if err != nil {
				return fmt.Errorf("record %s/%s: %w", bucket, k, err)
			}
			r := Record{Bucket: bucket, Key: string(k), Version: m.v, Deleted: m.deleted}
			if !m.deleted {
				r.Value = bytes.Clone(val)
			}
			out = append(out, r)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("replicator: listing %s: %w", bucket, err)
	}
	return out, nil
}
