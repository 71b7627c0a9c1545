package replicator

import (
	"context"
	"crypto/rand"
	"errors"
	"time"
)

// The next-wire profile's behaviours (nextWire.extras), which exercise
// what a node of this release must tolerate from a later one. A node of
// the current profile only answers them.
const (
	msgNextGossip = 250 // gossip, version 2: random bytes; receivers of this release ignore it
	msgNextProbe  = 251 // stream request, version 2: random bytes, echoed by a node with capNextProbe
)

// nextCounters count the next-wire profile's probes, for tests.
type nextCounters struct {
	unknown  uint64 // peers answered msgUnknown
	answered uint64 // peers echoed the probe
	failed   uint64 // probes that failed otherwise
}

// startWireExtras starts the next-wire profile's background behaviours
// (nothing for other profiles).
func (n *Node) startWireExtras() {
	if !n.wireProfile().extras {
		return
	}
	n.wg.Add(1)
	go func() {
		defer n.wg.Done()
		t := time.NewTicker(n.cfg.AntiEntropyInterval)
		defer t.Stop()
		for {
			select {
			case <-n.ctx.Done():
				return
			case <-t.C:
			}
			n.gossipNext()
			if p := n.randomPeer(); p != nil {
				n.probeNext(p)
			}
		}
	}()
}

// gossipNext queues a gossip message of a type this release does not know.
func (n *Node) gossipNext() {
	e := &enc{}
	e.u8(2)
	e.u8(msgNextGossip)
	body := make([]byte, 16)
	rand.Read(body)
	e.b = append(e.b, body...)
	n.bcast.QueueBroadcast(&recordBroadcast{name: "\x00next-wire", msg: e.b})
}

// probeNext sends msgNextProbe to p if p negotiates, on a pooled stream
// that goes back to the pool after a msgUnknown reply.
func (n *Node) probeNext(p *peerRef) {
	if pw, ok := n.peerCaps(p.Name); !ok || !pw.Negotiated {
		return // a legacy peer (or unknown yet): only version-1 messages
	}
	ctx, cancel := context.WithTimeout(n.ctx, ioTimeout)
	defer cancel()
	sc, _, err := n.getConn(ctx, p)
	if err != nil {
		n.noteNext(func(c *nextCounters) { c.failed++ })
		return
	}
	e := &enc{}
	e.u8(min(2, sc.version))
	e.u8(msgNextProbe)
	e.b = append(e.b, "probe"...)
	_, err = exchange(ctx, sc, e.b, msgNextProbe)
	switch {
	case err == nil:
		n.putConn(sc)
		n.noteNext(func(c *nextCounters) { c.answered++ })
	case errors.Is(err, errUnknownRequest):
		n.putConn(sc) // the stream goes on
		n.noteNext(func(c *nextCounters) { c.unknown++ })
	default:
		n.dropConn(sc)
		n.noteNext(func(c *nextCounters) { c.failed++ })
		n.log.Debug("next-wire probe failed", "peer", p.Name, "error", err)
	}
}

func (n *Node) noteNext(f func(*nextCounters)) {
	n.wire.mu.Lock()
	f(&n.wire.next)
	n.wire.mu.Unlock()
}

// nextStats returns the next-wire probe counters.
func (n *Node) nextStats() nextCounters {
	n.wire.mu.Lock()
	defer n.wire.mu.Unlock()
	return n.wire.next
}

// serveExtra serves the requests only the next-wire profile knows; handled
// is false for any other type.
func (n *Node) serveExtra(sc *secureConn, typ byte, body []byte) (handled bool, err error) {
	if typ != msgNextProbe || !n.wireProfile().caps.has(capNextProbe) {
		return false, nil
	}
	e := &enc{}
	e.u8(min(2, sc.version))
	e.u8(msgNextProbe)
	e.b = append(e.b, body...)
	return true, sc.send(e.b)
}
