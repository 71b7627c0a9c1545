package replicator

import (
	"fmt"
	"sort"
	"time"
)

// leafMax is the most keys a side lists for a differing tree node instead
// of descending into its children.
const leafMax = 8

// lackRule decides, for one exchange, what happens to a record only one
// side holds (docs/INTERNALS.md, "Garbage collection").
type lackRule struct {
	tombBefore  uint64 // tombstones older (ms) are neither given nor wanted: collected or about to be
	dropBelow   uint64 // records of ours the peer lacks, older (ms): dropped here, not given (we are returning)
	ignoreBelow uint64 // records of theirs we lack, older (ms): not wanted (the peer is returning and drops them)
	// The same for records the returning side received from others (their
	// writer is not the returning node), which may be newer than its last
	// sync: received in the moments before it went away. Such a record
	// older than the horizon that the peer lacks was deleted and its
	// tombstone collected (a collected tombstone is older than the horizon,
	// and the delete came after the write) or never reached the circle
	// from its writer (the limit stated for records older than the last
	// sync, now for these too).
	self, peer      string
	dropRecvBelow   uint64
	ignoreRecvBelow uint64
}

func (n *Node) lackRule(mine, theirs uint64, peer string) lackRule {
	r := lackRule{tombBefore: n.horizonMs(), self: n.cfg.Name, peer: peer}
	if n.stale(mine) && theirs != 0 {
		r.dropBelow = min(mine, theirs)
		r.dropRecvBelow = min(theirs, r.tombBefore)
	}
	if n.stale(theirs) && mine != 0 {
		r.ignoreBelow = min(mine, theirs)
		r.ignoreRecvBelow = min(mine, r.tombBefore)
	}
	return r
}

// turnPlan is what one side sends in answer to a turn.
type turnPlan struct {
	give  map[string][]string       // records to send, by bucket
	want  map[string][]string       // keys wanted, by bucket
	drop  map[string][]summaryEntry // our records to drop, by bucket
	items []treeItem
}

func (p *turnPlan) add(m map[string][]string, bucket, key string) { m[bucket] = append(m[bucket], key) }

// onlyMine handles a record of ours the peer lacks.
func (p *turnPlan) onlyMine(r lackRule, bucket string, e summaryEntry) {
	t := e.m.v.Time >> 16
	switch {
	case e.m.deleted && t < r.tombBefore:
	case t < r.dropBelow, e.m.v.Node != r.self && t < r.dropRecvBelow:
		p.drop[bucket] = append(p.drop[bucket], e)
	default:
		p.add(p.give, bucket, e.key)
	}
}

// onlyTheirs handles a record of the peer's we lack.
func (p *turnPlan) onlyTheirs(r lackRule, bucket string, e summaryEntry) {
	t := e.m.v.Time >> 16
	if (e.m.deleted && t < r.tombBefore) || t < r.ignoreBelow || (e.m.v.Node != r.peer && t < r.ignoreRecvBelow) {
		return
	}
	p.add(p.want, bucket, e.key)
}

// differs answers a tree node (d, p) of bucket whose hash or count differs
// between us (mc keys here) and the peer (tc keys there).
func (n *Node) differs(p *turnPlan, r lackRule, b *bucketIndex, bucket string, d int, pre uint64, mc, tc int) {
	switch {
	case tc == 0: // they have nothing here: no need to list
		for _, e := range b.entriesIn(d, pre) {
			p.onlyMine(r, bucket, e)
		}
	case mc <= leafMax || d >= maxTreeDepth:
		p.items = append(p.items, treeItem{bucket: bucket, depth: d, prefix: pre, kind: itemEntries, entries: b.entriesIn(d, pre)})
	default:
		p.items = append(p.items, treeItem{bucket: bucket, depth: d, prefix: pre, kind: itemChildren, kids: b.children(d, pre)})
	}
}

// answer plans the answer to turn t; first is the dialer's msgSync (its
// root items list every bucket it has).
func (n *Node) answer(t *treeTurn, first bool, r lackRule) *turnPlan {
	p := &turnPlan{give: map[string][]string{}, want: map[string][]string{}, drop: map[string][]summaryEntry{}}
	bk := n.buckets()
	listed := map[string]bool{}
	for i := range t.items {
		it := &t.items[i]
		b := bk[it.bucket]
		switch it.kind {
		case itemRoot:
			listed[it.bucket] = true
			if mine := b.node(0, 0); mine != it.node {
				n.differs(p, r, b, it.bucket, 0, 0, mine.count, it.node.count)
			}
		case itemChildren:
			mine := b.children(it.depth, it.prefix)
			for c := range mine {
				if mine[c] != it.kids[c] {
					n.differs(p, r, b, it.bucket, it.depth+1, it.prefix<<treeBits|uint64(c), mine[c].count, it.kids[c].count)
				}
			}
		case itemEntries:
			fww := n.fww[it.bucket]
			mine := b.entriesIn(it.depth, it.prefix)
			theirs := make(map[string]meta, len(it.entries))
			for _, e := range it.entries {
				theirs[e.key] = e.m
			}
			mineBy := make(map[string]meta, len(mine))
			for _, e := range mine {
				mineBy[e.key] = e.m
				if tm, ok := theirs[e.key]; !ok {
					p.onlyMine(r, it.bucket, e)
				} else if beats(fww, e.m, tm) {
					p.add(p.give, it.bucket, e.key)
				}
			}
			for _, e := range it.entries {
				if mm, ok := mineBy[e.key]; !ok {
					p.onlyTheirs(r, it.bucket, e)
				} else if beats(fww, e.m, mm) {
					p.add(p.want, it.bucket, e.key)
				}
			}
		}
	}
	if first {
		for name, b := range bk {
			if root := b.node(0, 0); !listed[name] && root.count > 0 {
				n.differs(p, r, b, name, 0, 0, root.count, 0)
			}
		}
	}
	return p
}

// flatten turns a key map into bucketKeys, sorted.
func flatten(m map[string][]string) []bucketKeys {
	out := make([]bucketKeys, 0, len(m))
	for b, ks := range m {
		out = append(out, bucketKeys{bucket: b, keys: ks})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].bucket < out[j].bucket })
	return out
}

// sendTurn sends a turn's frames.
func (n *Node) sendTurn(sc *secureConn, sender string, wants []bucketKeys, items []treeItem) error {
	frames, keys := encodeTurn(sender, n.lastSyncMs(), wants, items)
	for i, f := range frames {
		if i > 0 {
			keys = 0
		}
		n.countMeta(f, keys)
		if err := sc.send(f); err != nil {
			return err
		}
	}
	return nil
}

// maxTurnBytes bounds the metadata of one turn (all its frames): memory,
// not trust (peers hold the secret).
const maxTurnBytes = 256 << 20 // far above a turn of two nodes with 1M differing keys each

// recvTurn stores the records that precede the peer's next turn and
// decodes the turn (all its msgTree frames) into t.
func (n *Node) recvTurn(sc *secureConn, t *treeTurn) error {
	size := 0
	for {
		typ, body, err := sc.recv(ioTimeout)
		if err != nil {
			return err
		}
		switch typ {
		case msgRecords:
			if err := n.receiveRecords(body); err != nil {
				return err
			}
		case msgTree:
			if size += len(body); size > maxTurnBytes {
				return fmt.Errorf("%w: tree turn larger than %d bytes", errMalformed, maxTurnBytes)
			}
			_, more, err := decodeTurnFrame(body, false, t)
			if err != nil || !more {
				return err
			}
		default:
			return fmt.Errorf("%w: unexpected message type %d in tree exchange", errMalformed, typ)
		}
	}
}

// syncTree runs one tree exchange with peer as the dialer. answered
// reports whether the peer answered msgSync at all (a node from an earlier
// release closes the stream instead).
func (n *Node) syncTree(sc *secureConn, peer string) (answered bool, err error) {
	start := n.nowMs()
	var items []treeItem
	for name, b := range n.buckets() {
		if root := b.node(0, 0); root.count > 0 {
			items = append(items, treeItem{bucket: name, kind: itemRoot, node: root})
		}
	}
	sort.Slice(items, func(i, j int) bool { return items[i].bucket < items[j].bucket })
	if err := n.sendTurn(sc, n.cfg.Name, nil, items); err != nil {
		return false, err
	}
	var t treeTurn
	if err := n.recvTurn(sc, &t); err != nil {
		return false, err
	}
	return true, n.treeTurns(sc, peer, start, &t, false)
}

// serveTree answers an exchange started by msgSync (body).
func (n *Node) serveTree(sc *secureConn, body []byte) error {
	if n.cfg.DigestExchangeOnly {
		return fmt.Errorf("%w: unknown message type %d", errMalformed, msgSync) // as earlier releases
	}
	start := n.nowMs()
	var t treeTurn
	peer, more, err := decodeTurnFrame(body, true, &t)
	if err != nil {
		return err
	}
	if more {
		if err := n.recvTurn(sc, &t); err != nil {
			return err
		}
	}
	return n.treeTurns(sc, peer, start, &t, true)
}

// treeTurns answers the peer's turn t, and the turns after it, until one
// side sends an empty turn.
func (n *Node) treeTurns(sc *secureConn, peer string, start uint64, t *treeTurn, first bool) error {
	mine, theirs := n.lastSyncMs(), t.lastSync
	rule := n.lackRule(mine, theirs, peer)
	deadline := time.Now().Add(aeTimeout)
	for round := 0; ; round++ {
		if t.empty() && !first {
			break
		}
		if round > 4*maxTreeDepth+4 || time.Now().After(deadline) {
			return fmt.Errorf("tree exchange with %s did not finish", peer)
		}
		p := n.answer(t, first, rule)
		first = false
		for bucket, es := range p.drop {
			k, err := n.purge(bucket, es, true)
			n.ae.dropped.Add(uint64(k))
			if err != nil {
				return err
			}
			if k > 0 {
				n.log.Info("dropped records a peer deleted while this node was away", "peer", peer, "bucket", bucket, "records", k)
			}
		}
		if err := n.sendRecords(sc, append(t.wants, flatten(p.give)...)); err != nil {
			return err
		}
		wants := flatten(p.want)
		if err := n.sendTurn(sc, "", wants, p.items); err != nil {
			return err
		}
		if len(wants) == 0 && len(p.items) == 0 {
			break
		}
		*t = treeTurn{}
		if err := n.recvTurn(sc, t); err != nil {
			return err
		}
	}
	n.aeDone(peer)
	n.noteSync(start, mine, theirs)
	return nil
}
