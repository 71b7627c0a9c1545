package replicator

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// memberlist's public API tells which nodes are live (alive or suspect) but
// not their precise state, nor whether a gone node left or died. So a node
// tracks:
//   - "left": the peer said so (msgLeave) just before leaving;
//   - "dead": memberlist reported it gone without such a notice;
//   - "suspect": memberlist still lists it, but no direct probe of it
//     succeeded for a while (suspectAfter);
//   - "alive": otherwise.

const announceTimeout = 500 * time.Millisecond // how long Close tells peers it leaves

// memberInfo is what a node knows of a peer. Node.membersMu guards it.
type memberInfo struct {
	addr    string
	state   MemberState // StateAlive, StateDead or StateLeft (StateSuspect is computed)
	lastAck time.Time   // last direct probe ack, or (re)join
}

// Members returns every node this node knows of, itself included, sorted
// by name.
func (n *Node) Members() []Member {
	out := []Member{{Name: n.cfg.Name, Addr: n.Addr(), State: StateAlive}}
	live := n.liveNodes()
	limit := n.suspectAfter(len(live))
	n.membersMu.Lock()
	for name, mi := range n.members {
		m := Member{Name: name, Addr: mi.addr, State: mi.state}
		if ok := live[name]; ok && mi.state != StateLeft {
			m.State = StateAlive
			if time.Since(mi.lastAck) > limit {
				m.State = StateSuspect
			}
		} else if !live[name] && mi.state == StateAlive {
			m.State = StateDead
		}
		out = append(out, m)
	}
	n.membersMu.Unlock()
	n.fillClockOffsets(out)
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// suspectAfter is how long a live peer may go without a direct probe ack
// before Members calls it suspect. memberlist probes one peer per
// ProbeInterval in a shuffled round robin, so a peer is probed at least
// every 2×peers intervals.
func (n *Node) suspectAfter(peers int) time.Duration {
	return time.Duration(2*max(peers, 1)+3) * n.probeInterval
}

// peerRef names a peer and its address (a copy: memberlist mutates the
// Nodes it hands out, so only their Name is read outside its callbacks).
type peerRef struct {
	Name string
	Addr string // host:port
}

// Address returns the peer's host:port.
func (p *peerRef) Address() string { return p.Addr }

// liveNodes returns the names of memberlist's live (alive or suspect) peers.
func (n *Node) liveNodes() map[string]bool {
	out := make(map[string]bool)
	if ml := n.ml.Load(); ml != nil {
		for _, m := range ml.Members() {
			if m.Name != n.cfg.Name {
				out[m.Name] = true
			}
		}
	}
	return out
}

// alivePeers returns the peers that are alive or suspect (not those that
// announced they leave), sorted by name.
func (n *Node) alivePeers() []*peerRef {
	live := n.liveNodes()
	var out []*peerRef
	n.membersMu.Lock()
	for name := range live {
		if mi := n.members[name]; mi != nil && mi.state != StateLeft {
			out = append(out, &peerRef{Name: name, Addr: mi.addr})
		}
	}
	n.membersMu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// peer returns the alive or suspect peer called name, or nil.
func (n *Node) peer(name string) *peerRef {
	for _, m := range n.alivePeers() {
		if m.Name == name {
			return m
		}
	}
	return nil
}

// markLeft records a peer's announcement that it leaves.
func (n *Node) markLeft(name string) {
	n.membersMu.Lock()
	if mi := n.members[name]; mi != nil {
		mi.state = StateLeft
	}
	n.membersMu.Unlock()
	n.dropPeerConns(name)
}

// announceLeave tells every alive peer that this node leaves (msgLeave), so
// that they stop waiting for its acknowledgements at once.
func (n *Node) announceLeave() {
	e := newMsg(msgLeave, len(n.cfg.Name)+1)
	e.str(n.cfg.Name)
	ctx, cancel := context.WithTimeout(n.ctx, announceTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for _, p := range n.alivePeers() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := n.roundTrip(ctx, p, e.b, msgAck); err != nil {
				n.log.Debug("could not announce leaving", "peer", p.Name, "error", err)
			}
		}()
	}
	wg.Wait()
}

// events implements memberlist.EventDelegate. memberlist calls it serially,
// sometimes with its locks held: it must not call memberlist nor block.
type events struct{ n *Node }

func (e events) NotifyJoin(m *memberlist.Node) {
	n := e.n
	if m.Name == n.cfg.Name {
		return
	}
	n.membersMu.Lock()
	n.members[m.Name] = &memberInfo{addr: m.Address(), state: StateAlive, lastAck: time.Now()}
	n.rememberLocked(m.Name, m.Address())
	n.membersMu.Unlock()
	n.log.Info("node joined", "node", m.Name, "addr", m.Address())
	n.kickAntiEntropy(m.Name)
}

func (e events) NotifyLeave(m *memberlist.Node) {
	n := e.n
	if m.Name == n.cfg.Name {
		return
	}
	n.membersMu.Lock()
	mi := n.members[m.Name]
	if mi == nil {
		mi = &memberInfo{addr: m.Address()}
		n.members[m.Name] = mi
		n.rememberLocked(m.Name, m.Address())
	}
	if mi.state != StateLeft {
		mi.state = StateDead
	}
	state := mi.state
	n.membersMu.Unlock()
	n.log.Info("node gone", "node", m.Name, "state", state)
	n.dropPeerConns(m.Name)
}

func (e events) NotifyUpdate(m *memberlist.Node) {
	n := e.n
	n.membersMu.Lock()
	if mi := n.members[m.Name]; mi != nil {
		mi.addr = m.Address()
	}
	n.rememberLocked(m.Name, m.Address()) // an advertised address change
	n.membersMu.Unlock()
}

// pings implements memberlist.PingDelegate (called from memberlist's probe
// goroutine; must not block). The ack payload carries the acker's wall
// clock, from which the prober measures its offset (skew.go).
type pings struct{ n *Node }

func (p pings) AckPayload() []byte { return p.n.clockPayload() }

func (p pings) NotifyPingComplete(other *memberlist.Node, rtt time.Duration, payload []byte) {
	p.n.membersMu.Lock()
	if mi := p.n.members[other.Name]; mi != nil {
		mi.lastAck = time.Now()
	}
	p.n.membersMu.Unlock()
	p.n.noteClock(other.Name, rtt, payload)
}
