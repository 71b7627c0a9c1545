package replicator

import (
	"fmt"
	"sync"
)

// Group commit. bbolt fsyncs every committed transaction, and a write
// holds Node.mu through its transaction, so with one transaction per write
// concurrent writers (local Puts, and records from peers: acknowledged
// writes of other nodes, gossip, anti-entropy) queue behind one fsync each.
// Instead a writer queues its records, then takes Node.mu; whoever holds Node.mu next
// commits everything queued by then in one transaction (one fsync) and
// hands each writer its outcome. A writer returns only after the
// transaction holding its records committed, so fsync-before-ack holds.

// commitQueue holds local writes waiting for a transaction.
type commitQueue struct {
	mu   sync.Mutex // guards reqs
	reqs []*commitReq
}

// commitReq is one queued write: a local change (versioned when
// committed) or records received from peers. The committer sets winners
// and err while holding Node.mu, before releasing it; the writer reads them
// after taking Node.mu itself.
type commitReq struct {
	recs    []Record
	local   bool
	winners []Record // those of recs that became the winning record of their key
	held    int      // remote records accepted (the others were refused for clock skew, skew.go)
	err     error
}

// commitLocal versions and stores a local change. stored is false if the
// change lost (first-writer-wins bucket).
func (n *Node) commitLocal(rec Record) (Record, bool, error) {
	req := &commitReq{recs: []Record{rec}, local: true}
	n.commit(req)
	if req.err != nil || len(req.winners) == 0 {
		return req.recs[0], false, req.err
	}
	return req.winners[0], true, nil
}

// commitRemote merges records received from peers and returns those that
// became the winning record of their key, and how many of recs were
// accepted (not refused for clock skew and kept aside, skew.go).
func (n *Node) commitRemote(recs []Record) ([]Record, int, error) {
	req := &commitReq{recs: recs}
	n.commit(req)
	return req.winners, req.held, req.err
}

// commit stores req in one transaction with the other writes queued at the
// same time (Config.SerialCommit: alone).
func (n *Node) commit(req *commitReq) {
	if n.cfg.SerialCommit {
		n.mu.Lock()
		n.commitBatchLocked([]*commitReq{req})
		n.mu.Unlock()
		return
	}
	n.commits.mu.Lock()
	n.commits.reqs = append(n.commits.reqs, req)
	n.commits.mu.Unlock()
	n.mu.Lock()
	n.commits.mu.Lock()
	batch := n.commits.reqs
	n.commits.reqs = nil
	n.commits.mu.Unlock()
	if len(batch) > 0 { // else an earlier holder of n.mu committed req
		n.commitBatchLocked(batch)
	}
	n.mu.Unlock()
}

// commitBatchLocked versions the local changes of batch in order and
// stores the whole batch in one transaction. n.mu must be held.
func (n *Node) commitBatchLocked(batch []*commitReq) {
	var recs []Record
	live := batch[:0:0] // the requests not refused
	for _, r := range batch {
		if r.local {
			if r.err = n.versionLocalLocked(r.recs); r.err != nil {
				continue
			}
		} else {
			r.recs = n.screenLocked(r.recs)
			r.held = len(r.recs)
		}
		live = append(live, r)
		recs = append(recs, r.recs...)
	}
	batch = live
	winners, err := n.mergeLocked(recs)
	if err != nil {
		for _, r := range batch {
			r.err = err
		}
		return
	}
	// Hand each request the winners of its records: by bucket, key and
	// version; a winner whose version is none of the batch's (a merge that
	// produced a new record) goes to the last record of its key.
	type bk struct{ bucket, key string }
	type wk struct {
		bk
		v Version
	}
	exact := make(map[wk][]int, len(winners))
	other := make(map[bk][]int)
	inBatch := make(map[wk]bool, len(recs))
	last := make(map[bk]*commitReq, len(recs))
	for _, r := range batch {
		for i := range r.recs {
			k := bk{r.recs[i].Bucket, r.recs[i].Key}
			inBatch[wk{k, r.recs[i].Version}] = true
			last[k] = r
		}
	}
	for i := range winners {
		w := &winners[i]
		k := wk{bk{w.Bucket, w.Key}, w.Version}
		if inBatch[k] {
			exact[k] = append(exact[k], i)
		} else {
			other[k.bk] = append(other[k.bk], i)
		}
	}
	for _, r := range batch {
		for i := range r.recs {
			k := wk{bk{r.recs[i].Bucket, r.recs[i].Key}, r.recs[i].Version}
			if is := exact[k]; len(is) > 0 {
				r.winners = append(r.winners, winners[is[0]])
				exact[k] = is[1:]
			}
			if last[k.bk] == r && i == lastIndex(r.recs, k.bk.bucket, k.bk.key) {
				for _, j := range other[k.bk] {
					r.winners = append(r.winners, winners[j])
				}
			}
		}
	}
}

// versionLocalLocked gives local changes their versions. A stored version
// ahead of our clock (the clock stepped back since, or an older build
// stored it) is followed if it is within the maximum skew; further ahead
// the write would be lost to it, so it fails with ErrClockSkew. n.mu must
// be held.
func (n *Node) versionLocalLocked(recs []Record) error {
	for i := range recs {
		rec := &recs[i]
		rec.Version = Version{Time: n.clock.next(), Node: n.cfg.Name}
		if cur, ok := n.ix.get(rec.Bucket, rec.Key); ok && !n.fww[rec.Bucket] && !beats(false, rec.meta(), cur) {
			if !n.clock.observe(cur.v.Time) {
				return fmt.Errorf("%w: the stored version %v is ahead of this node's clock by more than %v",
					ErrClockSkew, cur.v, n.cfg.MaxClockSkew)
			}
			rec.Version.Time = n.clock.next()
		}
	}
	return nil
}

// lastIndex returns the index of the last record of bucket/key in recs.
func lastIndex(recs []Record, bucket, key string) int {
	for i := len(recs) - 1; i >= 0; i-- {
		if recs[i].Bucket == bucket && recs[i].Key == key {
			return i
		}
	}
	return -1
}
