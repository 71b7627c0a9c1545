package replicator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

const (
	maxGossipMsg  = 1024             // larger records go over streams only
	poolPerPeer   = 4                // idle outbound streams kept per peer
	poolIdle      = 30 * time.Second // idle streams older than this are not reused
	asyncTimeout  = 30 * time.Second // how long background pushes of large records try
	retryMin      = 20 * time.Millisecond
	retryMax      = 500 * time.Millisecond
	applyBatchMax = 512 // gossiped records applied per transaction
)

// errPeerGone: the peer left or died while we were sending to it.
var errPeerGone = errors.New("peer is no longer alive")

// recordBroadcast is a gossiped record. A newer broadcast of the same key
// replaces a queued older one.
type recordBroadcast struct {
	name string // bucket NUL key
	msg  []byte
}

func (b *recordBroadcast) Invalidates(other memberlist.Broadcast) bool {
	o, ok := other.(*recordBroadcast)
	return ok && o.name == b.name
}
func (b *recordBroadcast) Name() string    { return b.name }
func (b *recordBroadcast) Message() []byte { return b.msg }
func (b *recordBroadcast) Finished()       {}

// broadcast queues rec for gossip if it is small; it reports whether it was.
func (n *Node) broadcast(rec Record) bool {
	msg := encodeRecords(msgRecords, []Record{rec})
	if len(msg) > maxGossipMsg {
		return false
	}
	n.bcast.QueueBroadcast(&recordBroadcast{name: rec.Bucket + "\x00" + rec.Key, msg: msg})
	if n.bcast.NumQueued() > maxQueuedGossip {
		n.bcast.Prune(maxQueuedGossip)
	}
	return true
}

// handleGossip decodes a gossiped message and hands it to the applier.
// It runs on memberlist's packet goroutine and must not block.
func (n *Node) handleGossip(msg []byte) {
	recs, err := n.decodeGossip(msg) // copies: msg is reused by memberlist
	if errors.Is(err, errUnknownType) {
		n.log.Debug("ignoring gossip message of unknown type (a later release's)", "error", err)
		return
	}
	if err != nil {
		n.log.Warn("dropping gossip message", "error", err)
		return
	}
	n.received.Add(uint64(len(recs)))
	select {
	case n.incoming <- recs:
	case <-n.ctx.Done():
	default:
		n.gossipDropped.Add(uint64(len(recs))) // anti-entropy will bring them
	}
}

// applier applies gossiped records in batches.
func (n *Node) applier() {
	defer n.wg.Done()
	for {
		var batch []Record
		select {
		case <-n.ctx.Done():
			return
		case batch = <-n.incoming:
		}
	drain:
		for len(batch) < applyBatchMax {
			select {
			case more := <-n.incoming:
				batch = append(batch, more...)
			default:
				break drain
			}
		}
		if err := n.applyRemote(batch, true); err != nil {
			n.log.Error("storing gossiped records", "count", len(batch), "error", err)
		}
	}
}

// awaitAcks sends rec to peers and waits until replicas nodes (this one
// included) hold it, or every alive one if fewer are alive. It returns how
// many nodes hold it and which peers acknowledged, also on error.
// Acknowledgements that arrive after it returned are passed to the
// under-replicated tracking (acks.go).
func (n *Node) awaitAcks(ctx context.Context, rec Record, peers []*peerRef, replicas int) (int, []string, error) {
	n.pendingAcks.Add(1)
	defer n.pendingAcks.Add(-1)
	need := min(replicas, len(peers)+1)
	type result struct {
		peer string
		err  error
	}
	results := make(chan result, len(peers))
	sendCtx, cancel := context.WithTimeout(n.ctx, n.cfg.AckTimeout)
	var sends sync.WaitGroup
	msg := encodeRecords(msgReplicate, []Record{rec})
	for _, p := range peers {
		sends.Add(1)
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			defer sends.Done()
			err := n.replicateTo(sendCtx, p, msg, 1)
			if err == nil {
				n.confirmCopy(rec.Bucket, rec.Key, rec.Version, p.Name)
			}
			results <- result{p.Name, err}
		}()
	}
	n.wg.Add(1)
	go func() { // the sends outlive a successful wait; release their context after
		defer n.wg.Done()
		sends.Wait()
		cancel()
	}()

	timer := time.NewTimer(n.cfg.AckTimeout)
	defer timer.Stop()
	held, gone, refused, waiting := 1, 0, 0, len(peers)
	var holders []string
	for held < need {
		select {
		case r := <-results:
			waiting--
			switch {
			case r.err == nil:
				held++
				holders = append(holders, r.peer)
			case errors.Is(r.err, errPeerGone):
				gone++
				need = min(replicas, len(peers)+1-gone)
			case errors.Is(r.err, errSkewRefused):
				refused++
			}
			if refused > 0 && held < need && held+waiting < need {
				return held, holders, fmt.Errorf("%w: %s/%s held by %d of %d nodes; %d refused it because this node's clock is ahead of theirs (kept here, still replicating): %w",
					ErrAckTimeout, rec.Bucket, rec.Key, held, need, refused, ErrClockSkew)
			}
		case <-timer.C:
			n.ackTimeouts.Add(1)
			return held, holders, fmt.Errorf("%w: %s/%s held by %d of %d nodes after %v (kept here, still replicating)",
				ErrAckTimeout, rec.Bucket, rec.Key, held, need, n.cfg.AckTimeout)
		case <-ctx.Done():
			return held, holders, fmt.Errorf("replicator: waiting for acknowledgements of %s/%s (kept here, still replicating): %w",
				rec.Bucket, rec.Key, ctx.Err())
		case <-n.ctx.Done():
			return held, holders, ErrClosed
		}
	}
	return held, holders, nil
}

// pushAsync sends a record too large for gossip to peers in the background.
func (n *Node) pushAsync(rec Record, peers []*peerRef) {
	msg := encodeRecords(msgReplicate, []Record{rec})
	for _, p := range peers {
		n.wg.Add(1)
		go func() {
			defer n.wg.Done()
			ctx, cancel := context.WithTimeout(n.ctx, asyncTimeout)
			defer cancel()
			if err := n.replicateTo(ctx, p, msg, 1); err != nil {
				n.log.Debug("background push failed; anti-entropy will retry", "peer", p.Name, "error", err)
			}
		}()
	}
}

// replicateTo sends a msgReplicate message (count records) to peer and
// waits for its acknowledgement, retrying until ctx ends or the peer is no
// longer alive.
func (n *Node) replicateTo(ctx context.Context, peer *peerRef, msg []byte, count int) error {
	backoff := retryMin
	for {
		body, err := n.roundTrip(ctx, peer, msg, msgAck)
		if err == nil {
			n.sent.Add(uint64(count))
			d := &dec{b: body}
			if held := d.uvar(); d.end() == nil && held < uint64(count) {
				return errSkewRefused // retrying does not help until the peer's clock catches up
			}
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if n.peer(peer.Name) == nil {
			return errPeerGone
		}
		n.log.Debug("replication attempt failed", "peer", peer.Name, "error", err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
		backoff = min(2*backoff, retryMax)
	}
}

// roundTrip sends msg to peer on a pooled stream and reads the reply,
// which must be of type want. A failure on a reused stream is retried once
// on a fresh one.
func (n *Node) roundTrip(ctx context.Context, peer *peerRef, msg []byte, want byte) ([]byte, error) {
	for attempt := 0; ; attempt++ {
		sc, reused, err := n.getConn(ctx, peer)
		if err != nil {
			return nil, err
		}
		body, err := exchange(ctx, sc, msg, want)
		if err == nil {
			n.putConn(sc)
			return body, nil
		}
		n.dropConn(sc)
		if !reused || attempt > 0 {
			return nil, err
		}
	}
}

// exchange sends msg and reads one reply of type want.
func exchange(ctx context.Context, sc *secureConn, msg []byte, want byte) ([]byte, error) {
	if err := sc.send(msg); err != nil {
		return nil, fmt.Errorf("sending: %w", err)
	}
	timeout := ioTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, max(time.Until(dl), time.Millisecond))
	}
	typ, body, err := sc.recv(timeout)
	if err != nil {
		return nil, fmt.Errorf("reading reply: %w", err)
	}
	if typ != want {
		return nil, fmt.Errorf("%w: reply type %d, want %d", errMalformed, typ, want)
	}
	return body, nil
}

// getConn returns an idle pooled stream to peer or dials a new one.
func (n *Node) getConn(ctx context.Context, peer *peerRef) (*secureConn, bool, error) {
	n.poolMu.Lock()
	idle := n.pool[peer.Name]
	for len(idle) > 0 {
		sc := idle[len(idle)-1]
		idle = idle[:len(idle)-1]
		if time.Since(sc.lastUsed) < poolIdle {
			n.pool[peer.Name] = idle
			n.poolMu.Unlock()
			return sc, true, nil
		}
		delete(n.dialed, sc)
		sc.Close()
	}
	delete(n.pool, peer.Name)
	n.poolMu.Unlock()
	sc, err := n.dial(ctx, peer)
	return sc, false, err
}

// dial opens an authenticated stream to peer.
func (n *Node) dial(ctx context.Context, peer *peerRef) (*secureConn, error) {
	timeout := handshakeTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = min(timeout, max(time.Until(dl), time.Millisecond))
	}
	c, err := n.mux.DialAddressTimeout(memberlist.Address{Addr: peer.Address(), Name: peer.Name}, timeout)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", peer.Name, err)
	}
	n.poolMu.Lock()
	if n.ctx.Err() != nil {
		n.poolMu.Unlock()
		c.Close()
		return nil, ErrClosed
	}
	sc := &secureConn{c: c, peer: peer.Name}
	n.dialed[sc] = struct{}{} // so that Close can abort the handshake
	n.poolMu.Unlock()
	if err := sc.handshake(n.streamKey, n.wireProfile(), n.cfg.Name, true); err != nil {
		n.dropConn(sc)
		return nil, fmt.Errorf("handshake with %s: %w", peer.Name, err)
	}
	n.notePeerWire(peer.Name, sc.wire)
	return sc, nil
}

// putConn returns a healthy stream to the pool.
func (n *Node) putConn(sc *secureConn) {
	n.poolMu.Lock()
	defer n.poolMu.Unlock()
	if n.ctx.Err() != nil || len(n.pool[sc.peer]) >= poolPerPeer {
		delete(n.dialed, sc)
		sc.Close()
		return
	}
	sc.lastUsed = time.Now()
	n.pool[sc.peer] = append(n.pool[sc.peer], sc)
}

// dropConn closes an outbound stream.
func (n *Node) dropConn(sc *secureConn) {
	n.poolMu.Lock()
	delete(n.dialed, sc)
	n.poolMu.Unlock()
	sc.Close()
}

// dropPeerConns closes the idle streams to a peer that left.
func (n *Node) dropPeerConns(name string) {
	n.poolMu.Lock()
	defer n.poolMu.Unlock()
	for _, sc := range n.pool[name] {
		delete(n.dialed, sc)
		sc.Close()
	}
	delete(n.pool, name)
}

// closeAllConns closes every outbound stream (Close).
func (n *Node) closeAllConns() {
	n.poolMu.Lock()
	defer n.poolMu.Unlock()
	for sc := range n.dialed {
		sc.Close()
	}
	n.dialed = make(map[*secureConn]struct{})
	n.pool = make(map[string][]*secureConn)
}

// serveStream serves an inbound replication stream (after the magic byte)
// until it ends, fails or stays idle for idleTimeout.
func (n *Node) serveStream(c net.Conn) {
	sc := &secureConn{c: c}
	if err := sc.handshake(n.streamKey, n.wireProfile(), n.cfg.Name, false); err != nil {
		n.log.Debug("inbound stream handshake failed", "remote", c.RemoteAddr().String(), "error", err)
		return
	}
	if sc.wire.Negotiated {
		n.notePeerWire(sc.peer, sc.wire)
	}
	for {
		typ, body, err := sc.recv(idleTimeout)
		if err != nil {
			if errors.Is(err, errAuth) {
				n.log.Warn("rejected a replication stream that failed authentication (another circle secret?)", "remote", c.RemoteAddr().String())
			}
			return
		}
		switch typ {
		case msgReplicate:
			recs, err := decodeRecords(body)
			if err != nil {
				n.log.Warn("bad replication message", "remote", c.RemoteAddr().String(), "error", err)
				return
			}
			n.received.Add(uint64(len(recs)))
			held, err := n.applyRemoteHeld(recs, false)
			if err != nil {
				n.log.Error("storing replicated records", "error", err)
				return
			}
			e := newMsg(msgAck, 4)
			e.uvar(uint64(held)) // fewer than sent: refused for clock skew
			if err := sc.send(e.b); err != nil {
				return
			}
		case msgLeave:
			d := &dec{b: body}
			name := d.str(maxNodeName)
			if d.end() != nil {
				return
			}
			n.markLeft(name)
			e := newMsg(msgAck, 1)
			e.uvar(0)
			if err := sc.send(e.b); err != nil {
				return
			}
		case msgSync:
			if err := n.serveTree(sc, body); err != nil {
				n.log.Debug("tree exchange (serving) failed", "remote", c.RemoteAddr().String(), "error", err)
				return
			}
		case msgDigest:
			if err := n.serveAntiEntropy(sc, body); err != nil {
				n.log.Debug("anti-entropy (serving) failed", "remote", c.RemoteAddr().String(), "error", err)
				return
			}
		default:
			if typ >= msgHello && typ <= msgUnknown { // known, but not a request
				n.log.Warn("unexpected message on replication stream", "type", typ, "remote", c.RemoteAddr().String())
				return
			}
			if err := n.serveUnknown(sc, typ, body); err != nil {
				return
			}
		}
	}
}
