package replicator

import (
	"context"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

const (
	aeTimeout       = 2 * time.Minute // bound of one anti-entropy exchange
	maxSummaryBytes = 4 << 20         // summary size per exchange; the rest waits for the next one
	chunkBytes      = 1 << 20         // records per msgRecords frame (one larger record may exceed it)
)

// kickAntiEntropy asks the anti-entropy loop to sync with peer now.
func (n *Node) kickAntiEntropy(peer string) {
	select {
	case n.aeKick <- peer:
	default:
	}
}

// antiEntropyLoop syncs with a random peer every AntiEntropyInterval, and
// with a given peer when kicked (a node joined).
func (n *Node) antiEntropyLoop() {
	defer n.wg.Done()
	n.wg.Add(1) // counted while this goroutine is: Close waits for both
	go n.gcLoop()
	t := time.NewTicker(n.cfg.AntiEntropyInterval)
	defer t.Stop()
	for {
		var peer *peerRef
		select {
		case <-n.ctx.Done():
			return
		case <-t.C:
			peer = n.randomPeer()
		case name := <-n.aeKick:
			peer = n.peer(name)
		}
		if peer == nil {
			continue
		}
		if err := n.syncWith(peer); err != nil && n.ctx.Err() == nil {
			n.log.Debug("anti-entropy failed", "peer", peer.Name, "error", err)
		}
	}
}

// aeDone records a completed exchange.
func (n *Node) aeDone(peer string) {
	n.aeRounds.Add(1)
	n.statsMu.Lock()
	n.lastAE, n.lastAEPeer = time.Now(), peer
	n.statsMu.Unlock()
}

// syncWith runs one anti-entropy exchange with peer, as the dialer: the
// tree exchange (wiretree.go), or the digest exchange (wire.go) with a peer
// that closed the stream on msgSync (an earlier release) in the last
// legacyRetry.
func (n *Node) syncWith(peer *peerRef) error {
	ctx, cancel := context.WithTimeout(n.ctx, aeTimeout)
	defer cancel()
	if pw, ok := n.peerCaps(peer.Name); ok && !pw.Caps.has(capMerkle) {
		return n.syncDigestWith(ctx, peer) // it said it does not serve the tree exchange
	}
	if !n.cfg.DigestExchangeOnly && !n.isLegacy(peer.Name) {
		sc, err := n.dial(ctx, peer)
		if err != nil {
			return err
		}
		answered, err := n.syncTree(sc, peer.Name)
		n.dropConn(sc)
		if answered || err == nil || ctx.Err() != nil {
			return err
		}
		n.log.Debug("peer did not answer the tree exchange; trying the digest exchange", "peer", peer.Name, "error", err)
		if err := n.syncDigestWith(ctx, peer); err != nil {
			return err
		}
		n.setLegacy(peer.Name)
		n.log.Info("peer speaks only the digest exchange (an earlier release)", "peer", peer.Name)
		return nil
	}
	return n.syncDigestWith(ctx, peer)
}

// isLegacy reports whether peer recently answered only the digest exchange.
func (n *Node) isLegacy(peer string) bool {
	n.ae.mu.Lock()
	defer n.ae.mu.Unlock()
	return time.Now().Before(n.ae.legacy[peer])
}

func (n *Node) setLegacy(peer string) {
	n.ae.mu.Lock()
	defer n.ae.mu.Unlock()
	if n.ae.legacy == nil {
		n.ae.legacy = make(map[string]time.Time)
	}
	n.ae.legacy[peer] = time.Now().Add(legacyRetry)
}

// syncDigestWith runs the digest exchange (wire.go) with peer as the
// dialer.
func (n *Node) syncDigestWith(ctx context.Context, peer *peerRef) error {
	sc, err := n.dial(ctx, peer)
	if err != nil {
		return err
	}
	defer n.dropConn(sc)

	n.mu.Lock()
	digest := n.ix.digest()
	n.mu.Unlock() // digest reads only the bucket roots
	dmsg := encodeDigest(n.cfg.Name, digest)
	n.countMeta(dmsg, 0)
	body, err := exchange(ctx, sc, dmsg, msgRanges)
	if err != nil {
		return err
	}
	theirs, err := decodeRanges(body)
	if err != nil {
		return err
	}
	if len(theirs) == 0 {
		n.aeDone(peer.Name)
		return nil
	}

	// Our entries in every range whose hash differs.
	var sums []bucketSummary
	more, size := false, 0
	bk := n.buckets()
	for _, br := range theirs {
		if checkBucket(br.bucket) != nil {
			continue
		}
		mine := bk[br.bucket].rangeHashes()
		bs := bucketSummary{bucket: br.bucket}
		for r := range numRanges {
			if mine[r] == br.hashes[r] {
				continue
			}
			if size > maxSummaryBytes {
				more = true
				break
			}
			es := bk[br.bucket].entriesIn(2, uint64(r))
			for _, e := range es {
				size += len(e.key) + len(e.m.v.Node) + 12
			}
			bs.ranges = append(bs.ranges, rangeSummary{r: byte(r), entries: es})
		}
		if len(bs.ranges) > 0 {
			sums = append(sums, bs)
		}
	}
	smsg, nkeys := encodeSummary(more, sums), 0
	for _, bs := range sums {
		for _, rs := range bs.ranges {
			nkeys += len(rs.entries)
		}
	}
	n.countMeta(smsg, nkeys)
	if err := sc.send(smsg); err != nil {
		return err
	}

	// Their winners, then what they want from us.
	var want []bucketKeys
	for want == nil {
		typ, body, err := sc.recv(ioTimeout)
		if err != nil {
			return err
		}
		switch typ {
		case msgRecords:
			if err := n.receiveRecords(body); err != nil {
				return err
			}
		case msgWant:
			if want, err = decodeWant(body); err != nil {
				return err
			}
			if want == nil {
				want = []bucketKeys{}
			}
		default:
			return fmt.Errorf("%w: unexpected message type %d in anti-entropy", errMalformed, typ)
		}
	}
	if err := n.sendRecords(sc, want); err != nil {
		return err
	}
	if _, err := exchange(ctx, sc, newMsg(msgEnd, 0).b, msgEnd); err != nil {
		return err
	}
	n.aeDone(peer.Name)
	if more {
		n.kickAntiEntropy(peer.Name)
	}
	return nil
}

// serveAntiEntropy answers an exchange started by msgDigest (body).
func (n *Node) serveAntiEntropy(sc *secureConn, body []byte) error {
	peer, theirs, err := decodeDigest(body)
	if err != nil {
		return err
	}
	roots := make(map[string]uint64, len(theirs))
	for _, d := range theirs {
		roots[d.bucket] = d.root
	}
	var out []bucketRanges
	n.mu.Lock()
	mine := n.ix.digest()
	bk := n.ix.snapshot()
	n.mu.Unlock()
	for _, d := range mine {
		if roots[d.bucket] != d.root {
			out = append(out, bucketRanges{bucket: d.bucket, hashes: bk[d.bucket].rangeHashes()})
		}
		delete(roots, d.bucket)
	}
	for b, root := range roots { // buckets only they have
		if root != 0 && checkBucket(b) == nil {
			out = append(out, bucketRanges{bucket: b})
		}
	}
	rmsg := encodeRanges(out)
	n.countMeta(rmsg, 0)
	if err := sc.send(rmsg); err != nil {
		return err
	}
	if len(out) == 0 {
		n.aeDone(peer)
		return nil
	}

	typ, body, err := sc.recv(ioTimeout)
	if err != nil {
		return err
	}
	if typ != msgSummary {
		return fmt.Errorf("%w: expected summary, got type %d", errMalformed, typ)
	}
	_, sums, err := decodeSummary(body)
	if err != nil {
		return err
	}
	var give, want []bucketKeys
	bk = n.buckets()
	collectable := n.horizonMs() // tombstones older are collected: not worth a trip where absent
	old := func(m meta) bool { return m.deleted && m.v.Time>>16 < collectable }
	for _, bs := range sums {
		fww := n.fww[bs.bucket]
		g, w := bucketKeys{bucket: bs.bucket}, bucketKeys{bucket: bs.bucket}
		for _, rs := range bs.ranges {
			mine := bk[bs.bucket].entriesIn(2, uint64(rs.r))
			mineBy := make(map[string]meta, len(mine))
			for _, e := range mine {
				mineBy[e.key] = e.m
			}
			theirsBy := make(map[string]meta, len(rs.entries))
			for _, e := range rs.entries {
				theirsBy[e.key] = e.m
				if m, ok := mineBy[e.key]; (!ok && !old(e.m)) || (ok && beats(fww, e.m, m)) {
					w.keys = append(w.keys, e.key)
				}
			}
			for _, e := range mine {
				if t, ok := theirsBy[e.key]; (!ok && !old(e.m)) || (ok && beats(fww, e.m, t)) {
					g.keys = append(g.keys, e.key)
				}
			}
		}
		if len(g.keys) > 0 {
			give = append(give, g)
		}
		if len(w.keys) > 0 {
			want = append(want, w)
		}
	}
	if err := n.sendRecords(sc, give); err != nil {
		return err
	}
	wmsg, nkeys := encodeWant(want), 0
	for _, w := range want {
		nkeys += len(w.keys)
	}
	n.countMeta(wmsg, nkeys)
	if err := sc.send(wmsg); err != nil {
		return err
	}
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
		case msgEnd:
			if err := sc.send(newMsg(msgEnd, 0).b); err != nil {
				return err
			}
			n.aeDone(peer)
			return nil
		default:
			return fmt.Errorf("%w: unexpected message type %d in anti-entropy", errMalformed, typ)
		}
	}
}

// receiveRecords stores an anti-entropy msgRecords body.
func (n *Node) receiveRecords(body []byte) error {
	recs, err := decodeRecords(body)
	if err != nil {
		return err
	}
	n.received.Add(uint64(len(recs)))
	n.aeReceived.Add(uint64(len(recs)))
	return n.applyRemote(recs, false)
}

// sendRecords sends the current records of keys as msgRecords frames.
func (n *Node) sendRecords(sc *secureConn, keys []bucketKeys) error {
	type bk struct{ bucket, key string }
	var flat []bk
	for _, w := range keys {
		for _, k := range w.keys {
			flat = append(flat, bk{w.bucket, k})
		}
	}
	for i := 0; i < len(flat); {
		var batch []Record
		size := 0
		err := n.db.View(func(tx *bolt.Tx) error {
			for ; i < len(flat) && size < chunkBytes; i++ {
				r, ok, err := getRecord(tx, flat[i].bucket, flat[i].key)
				if err != nil {
					return err
				}
				if ok {
					batch = append(batch, r)
					size += recordSize(&r)
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		if len(batch) == 0 {
			continue
		}
		if err := sc.send(encodeRecords(msgRecords, batch)); err != nil {
			return err
		}
		n.sent.Add(uint64(len(batch)))
		n.aeSent.Add(uint64(len(batch)))
	}
	return nil
}
