package replicator

import (
	"context"
	"sort"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Honest replication.
//
// Put keeps the contract of DESIGN.md: it returns once Config.Replicas
// nodes hold the record, or every alive node if fewer are alive. That
// weakening is made visible here:
//   - PutWithAck and DeleteWithAck return an Ack with the number of copies
//     the record has when the call returns (Copies) and the number asked
//     for (Want = Config.Replicas);
//   - a write that returns with fewer than Config.Replicas copies is
//     tracked in memory (bucket, key, version, which nodes hold it) and
//     counted in Stats.UnderReplicated;
//   - every resendInterval the tracked records are sent to the alive peers
//     not known to hold them (a node that returns or joins gets them within
//     about a second), and acknowledgements that arrive after the write
//     returned count too; an entry is dropped once Config.Replicas nodes
//     hold the record, or when a newer version of the key replaces it here
//     (the newer write is tracked on its own).
// The tracking is in memory: after a restart anti-entropy still brings
// every record to every node, but the count starts from zero. At most
// maxUnderReplicated records are tracked; beyond that, writes are counted
// logged once and left to anti-entropy.

const (
	resendInterval     = time.Second // how often under-replicated records are re-sent
	resendBatch        = 256         // records per re-send message
	maxUnderReplicated = 20_000      // tracked records, at most (about 100 bytes each)
)

// Ack tells how many copies an acknowledged write has.
type Ack struct {
	// Copies is the number of nodes known to hold the record (or a later
	// version of it) when the call returned, this one included.
	Copies int
	// Want is the number of copies the write asked for (Config.Replicas).
	Want int
}

// Full reports whether the write has the copies it asked for.
func (a Ack) Full() bool { return a.Copies >= a.Want }

// PutWithAck is Put that also reports how many copies the record has:
// err is exactly Put's, and a nil error with Ack.Full() false means that
// fewer than Replicas nodes were alive (the record is then tracked as
// under-replicated and re-sent to nodes as they come back).
func (n *Node) PutWithAck(ctx context.Context, bucket, key string, value []byte) (Ack, error) {
	return n.writeAck(ctx, bucket, key, value, false, n.cfg.Replicas)
}

// DeleteWithAck is Delete that also reports how many copies the tombstone
// has, as PutWithAck.
func (n *Node) DeleteWithAck(ctx context.Context, bucket, key string) (Ack, error) {
	return n.writeAck(ctx, bucket, key, nil, true, n.cfg.Replicas)
}

// underReplicated tracks records written here that fewer than
// Config.Replicas nodes are known to hold.
type underReplicated struct {
	mu        sync.Mutex                // guards the following
	recs      map[[2]string]*underEntry // by bucket, key
	untracked uint64                    // writes not tracked because recs was full
	started   bool                      // the re-send loop runs
}

// underEntry is one tracked record.
type underEntry struct {
	version Version
	holders []string // node names known to hold the version, this one included
}

func (e *underEntry) holds(name string) bool {
	for _, h := range e.holders {
		if h == name {
			return true
		}
	}
	return false
}

// track records that rec is held by holders only (called by writeAck when
// a write returns with fewer copies than Replicas; the caller is inside
// n.enter).
func (n *Node) trackUnder(rec Record, holders []string) {
	u := &n.under
	u.mu.Lock()
	defer u.mu.Unlock()
	k := [2]string{rec.Bucket, rec.Key}
	if _, ok := u.recs[k]; !ok && len(u.recs) >= maxUnderReplicated {
		if u.untracked++; u.untracked == 1 {
			n.log.Warn("too many under-replicated records to track; anti-entropy will copy the rest", "tracked", len(u.recs))
		}
		return
	}
	if u.recs == nil {
		u.recs = make(map[[2]string]*underEntry)
	}
	e := &underEntry{version: rec.Version, holders: append([]string{n.cfg.Name}, holders...)}
	u.recs[k] = e
	if !u.started {
		u.started = true
		n.wg.Add(1)
		go n.resendLoop()
	}
}

// confirmCopy records that peer acknowledged version v of bucket/key.
func (n *Node) confirmCopy(bucket, key string, v Version, peer string) {
	u := &n.under
	u.mu.Lock()
	defer u.mu.Unlock()
	k := [2]string{bucket, key}
	e := u.recs[k]
	if e == nil || e.version != v {
		return
	}
	if !e.holds(peer) {
		e.holders = append(e.holders, peer)
	}
	if len(e.holders) >= n.cfg.Replicas {
		delete(u.recs, k)
	}
}

// underCount returns the number of tracked under-replicated records.
func (n *Node) underCount() int {
	n.under.mu.Lock()
	defer n.under.mu.Unlock()
	return len(n.under.recs)
}

// resendLoop re-sends tracked records to the alive peers that lack them,
// until Close.
func (n *Node) resendLoop() {
	defer n.wg.Done()
	t := time.NewTicker(resendInterval)
	defer t.Stop()
	for {
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
		}
		n.resendOnce()
	}
}

// resendOnce sends every tracked record to each alive peer not known to
// hold it, one batch per peer at a time.
func (n *Node) resendOnce() {
	peers := n.alivePeers()
	if len(peers) == 0 {
		return
	}
	type item struct {
		k [2]string
		v Version
	}
	want := make(map[string][]item) // by peer name
	n.under.mu.Lock()
	for k, e := range n.under.recs {
		for _, p := range peers {
			if !e.holds(p.Name) {
				want[p.Name] = append(want[p.Name], item{k, e.version})
			}
		}
	}
	n.under.mu.Unlock()
	for _, p := range peers {
		items := want[p.Name]
		sort.Slice(items, func(i, j int) bool {
			return items[i].k[0] < items[j].k[0] || items[i].k[0] == items[j].k[0] && items[i].k[1] < items[j].k[1]
		})
		for len(items) > 0 && n.ctx.Err() == nil {
			batch := items[:min(len(items), resendBatch)]
			items = items[len(batch):]
			var recs []Record
			err := n.db.View(func(tx *bolt.Tx) error {
				for _, it := range batch {
					r, ok, err := getRecord(tx, it.k[0], it.k[1])
					if err != nil {
						return err
					}
					if ok && r.Version == it.v {
						recs = append(recs, r)
					} else {
						n.dropUnder(it.k, it.v) // replaced by a newer version
					}
				}
				return nil
			})
			if err != nil || len(recs) == 0 {
				continue
			}
			ctx, cancel := context.WithTimeout(n.ctx, n.cfg.AckTimeout)
			_, err = n.roundTrip(ctx, p, encodeRecords(msgReplicate, recs), msgAck)
			cancel()
			if err != nil {
				n.log.Debug("re-sending under-replicated records failed", "peer", p.Name, "error", err)
				break
			}
			n.sent.Add(uint64(len(recs)))
			for _, r := range recs {
				n.confirmCopy(r.Bucket, r.Key, r.Version, p.Name)
			}
		}
	}
}

// dropUnder stops tracking bucket/key if it is still at version v.
func (n *Node) dropUnder(k [2]string, v Version) {
	n.under.mu.Lock()
	if e := n.under.recs[k]; e != nil && e.version == v {
		delete(n.under.recs, k)
	}
	n.under.mu.Unlock()
}
